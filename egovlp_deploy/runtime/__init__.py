"""On-device runtime: exported engines (through their manifest) -> video/text encoders and the fusion re-ranker,
the video pipeline (decode -> C++ preprocessing -> encoder), the moment index, EgoMCQ answering, feature extraction,
the one-command demo and the end-to-end benchmark. Reads only exported artifacts and their manifest."""

from .clip_pipeline import ClipPipeline, Window, plan_windows, segment_windows
from .engines import (
    BACKENDS,
    EngineError,
    EngineFolder,
    FailedValidationWarning,
    FusionScorer,
    ProviderFallbackWarning,
    QueryError,
    Runtime,
    TextEncoder,
    TextOutput,
    VideoEncoder,
)
from .index import Hit, IndexFileError, IndexSettings, MomentIndex, build_index

__all__ = [
    "BACKENDS",
    "ClipPipeline",
    "EngineError",
    "EngineFolder",
    "FailedValidationWarning",
    "FusionScorer",
    "Hit",
    "IndexFileError",
    "IndexSettings",
    "MomentIndex",
    "ProviderFallbackWarning",
    "QueryError",
    "Runtime",
    "TextEncoder",
    "TextOutput",
    "VideoEncoder",
    "Window",
    "build_index",
    "plan_windows",
    "segment_windows",
]
