"""egovlp-deploy: EgoVLPv2 from training to low-latency inference, as a dual or a fusion encoder."""

from .checkpoint import CheckpointError
from .config import ConfigError, EgoVLPv2Config
from .model import EgoVLPv2, FusionOutput, InputError

__version__ = "0.1.0"
__all__ = ["EgoVLPv2", "EgoVLPv2Config", "FusionOutput", "InputError", "CheckpointError", "ConfigError"]
