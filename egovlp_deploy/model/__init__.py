"""The EgoVLPv2 model: video tower, text tower, heads, and the dual/fusion switch."""

from .egovlp import EgoVLPv2, FusionOutput, InputError

__all__ = ["EgoVLPv2", "FusionOutput", "InputError"]
