"""The one way the project opens an ONNX Runtime session: the exporters' validation and benchmarks, the offline
graph optimization, and the runtime's onnxruntime backend."""

from __future__ import annotations

import os

OPTIMIZATION_LEVELS = ("basic", "extended", "all")


def ort_session(
    path: str | os.PathLike,
    providers: list[str] | None = None,
    threads: int | None = None,
    *,
    error: type[Exception] = RuntimeError,
    optimize: str | None = None,
    optimized_path: str | os.PathLike | None = None,
):
    """An `onnxruntime.InferenceSession` of the model at `path` on `providers` (default: the CPU) with
    `threads` intra-op threads (None: ONNX Runtime's default). `optimize` sets the graph optimization level
    (basic, extended, all) and `optimized_path` where ONNX Runtime saves the optimized graph. A model ONNX Runtime
    cannot load raises `error`, naming the file (ONNX Runtime raises types of its own: Fail, InvalidGraph, ...)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    if optimize is not None:
        if optimize not in OPTIMIZATION_LEVELS:
            raise ValueError(f"optimize must be one of {OPTIMIZATION_LEVELS}, got {optimize!r}")
        opts.graph_optimization_level = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimize]
    if optimized_path is not None:
        opts.optimized_model_filepath = os.fspath(optimized_path)
    try:
        return ort.InferenceSession(os.fspath(path), opts, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:
        raise error(f"{path}: ONNX Runtime cannot load it ({exc})") from exc
