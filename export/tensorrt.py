"""TensorRT engines built from the exported ONNX with the tensorrt Python API (TensorRT >= 10).

- Optimization profiles from the requested ranges: batch [1, max_batch] (opt: `opt_batch`), text length
  [1, max_text_len] (opt: `opt_text_len`); `profile_shapes` is pure Python and tested everywhere.
- Precision: 'fp32'; 'fp16'/'bf16' either as builder flags over the fp32 ONNX with LayerNorm, softmax and reduce
  layers pinned to fp32 (OBEY_PRECISION_CONSTRAINTS), or `strongly_typed=True` over the fp16 ONNX, whose Casts
  already keep norms in fp32 (export/precision.py): TensorRT then follows the graph's types exactly. Peers' plain
  `--fp16` builds break RoBERTa/ViT LayerNorms silently (TensorRT #3101, #2709).
- A timing cache persisted beside the engines (`timing.cache`), reused and updated by every build.
- `refit=True` builds with REFIT_IDENTICAL: the engine can take new weights of the same model without a rebuild.
- Build progress through an `IProgressMonitor`.
- Validation runs the engine and ONNX Runtime on the same inputs (`run_engine`).

tensorrt cannot be installed on the project's machines (too large for them): it is imported lazily, and every entry
point that needs it raises `TensorRTUnavailable` with that reason.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .specs import ROLES, static_dims

TRT_PRECISIONS = ("fp32", "fp16", "bf16")
# layers pinned to fp32 in a weakly typed fp16/bf16 build (names of trt.LayerType members)
FP32_LAYER_TYPES = ("NORMALIZATION", "SOFTMAX", "REDUCE")


class TensorRTUnavailable(RuntimeError):
    """The tensorrt package (or a GPU) is missing."""


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailable(
            "Building or running TensorRT engines needs the `tensorrt` Python package (>= 10) and an NVIDIA GPU. "
            "It is not installable on this project's CPU or GPU machines (PyPI's tensorrt downloads NVIDIA's "
            f"libraries from NVIDIA's server); install it from NVIDIA on the target (e.g. JetPack on Jetson), then "
            f"rerun. ({exc})"
        ) from exc
    major = int(trt.__version__.split(".")[0])
    if major < 10:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} found, the builder needs >= 10")
    return trt


@dataclass(frozen=True)
class BuildOptions:
    precision: str = "fp16"
    strongly_typed: bool = False
    refit: bool = False
    max_batch: int = 8
    opt_batch: int = 1
    max_text_len: int = 32
    opt_text_len: int = 16
    workspace_gib: float = 4.0
    timing_cache: str | None = None
    builder_optimization_level: int = 3

    def check(self) -> None:
        if self.precision not in TRT_PRECISIONS:
            raise ValueError(f"TensorRT precision must be one of {TRT_PRECISIONS}, got {self.precision!r}")
        if not 1 <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need 1 <= opt_batch ({self.opt_batch}) <= max_batch ({self.max_batch})")
        if not 1 <= self.opt_text_len <= self.max_text_len:
            raise ValueError(f"need 1 <= opt_text_len ({self.opt_text_len}) <= max_text_len ({self.max_text_len})")


def profile_shapes(role: str, config, opts: BuildOptions) -> dict[str, tuple[tuple[int, ...], ...]]:
    """{input name: (min, opt, max) shape} of the role's single optimization profile."""
    opts.check()
    fixed = static_dims(config)
    ranges = {"batch": (1, opts.opt_batch, opts.max_batch), "text_len": (1, opts.opt_text_len, opts.max_text_len)}
    out = {}
    for t in ROLES[role].inputs:
        shapes = []
        for k in range(3):
            shapes.append(tuple(d if isinstance(d, int) else ranges[d][k] if d in ranges else fixed[d] for d in t.dims))
        out[t.name] = tuple(shapes)
    return out


def _progress_monitor(trt, stream=sys.stderr):
    class Progress(trt.IProgressMonitor):
        """Prints each build phase with its step count (engine builds of the paper model take minutes)."""

        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.t0 = time.perf_counter()

        def phase_start(self, phase_name, parent_phase, num_steps):
            indent = "  " if parent_phase else ""
            print(
                f"[trt {time.perf_counter() - self.t0:7.1f}s] {indent}{phase_name} ({num_steps} steps)",
                file=stream,
                flush=True,
            )

        def step_complete(self, phase_name, step):
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            pass

    return Progress()


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    role: str,
    config,
    opts: BuildOptions,
    progress: bool = True,
) -> dict:
    """Build and serialize an engine; returns build facts for the manifest."""
    trt = import_tensorrt()
    opts.check()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if opts.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")

    cfg = builder.create_builder_config()
    cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_gib * 2**30))
    cfg.builder_optimization_level = opts.builder_optimization_level
    if not opts.strongly_typed and opts.precision != "fp32":
        cfg.set_flag(trt.BuilderFlag.FP16 if opts.precision == "fp16" else trt.BuilderFlag.BF16)
        cfg.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = {getattr(trt.LayerType, name) for name in FP32_LAYER_TYPES if hasattr(trt.LayerType, name)}
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type in pinned:
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
    if opts.refit:
        cfg.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
    if progress and hasattr(cfg, "progress_monitor"):
        cfg.progress_monitor = _progress_monitor(trt)

    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes(role, config, opts).items():
        profile.set_shape(name, lo, opt, hi)
    cfg.add_optimization_profile(profile)

    cache_path = Path(opts.timing_cache) if opts.timing_cache else None
    cache = cfg.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    cfg.set_timing_cache(cache, ignore_mismatch=False)

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, cfg)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {role} ({onnx_path}); see the log above")
    seconds = time.perf_counter() - t0
    engine_path = Path(engine_path)
    tmp = engine_path.with_name(f".{engine_path.name}.tmp{os.getpid()}")
    tmp.write_bytes(bytes(serialized))
    os.replace(tmp, engine_path)
    if cache_path:
        data = cfg.get_timing_cache().serialize()
        tmp = cache_path.with_name(f".{cache_path.name}.tmp{os.getpid()}")
        tmp.write_bytes(bytes(data))
        os.replace(tmp, cache_path)
    return {
        "tensorrt": trt.__version__,
        "build_seconds": seconds,
        "precision": opts.precision,
        "strongly_typed": opts.strongly_typed,
        "refit": opts.refit,
        "profile": {k: [list(s) for s in v] for k, v in profile_shapes(role, config, opts).items()},
    }


def run_engine(engine_path: str | os.PathLike, role: str):
    """A callable `run(numpy inputs) -> {output name: numpy}` over a serialized engine (torch CUDA buffers)."""
    import numpy as np
    import torch

    trt = import_tensorrt()
    if not torch.cuda.is_available():
        raise TensorRTUnavailable("running a TensorRT engine needs a CUDA device")
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise RuntimeError(f"{engine_path}: TensorRT cannot deserialize it (corrupt, or another TensorRT version)")
    context = engine.create_execution_context()
    spec = ROLES[role]
    to_torch = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.bfloat16: torch.bfloat16,
        trt.int64: torch.int64,
        trt.int32: torch.int32,
    }

    def run(inputs: dict) -> dict:
        stream = torch.cuda.current_stream()
        keep = []
        for name in spec.input_names:
            x = torch.from_numpy(np.ascontiguousarray(inputs[name])).cuda()
            keep.append(x)
            context.set_input_shape(name, tuple(x.shape))
            context.set_tensor_address(name, x.data_ptr())
        outputs = {}
        for name in spec.output_names:
            shape = tuple(context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=to_torch[engine.get_tensor_dtype(name)], device="cuda")
            context.set_tensor_address(name, out.data_ptr())
            outputs[name] = out
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {role} failed")
        stream.synchronize()
        return {k: v.float().cpu().numpy() for k, v in outputs.items()}

    return run
