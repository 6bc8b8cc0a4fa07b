"""One interface over the inference backends: an export folder (manifest.json + artifacts) -> encoders and scorer.

    rt = Runtime("engines/", backend="onnxruntime")          # or "torch", "program", "aoti", "tensorrt"
    v = rt.video_encoder.encode(clips)                       # (B, F, 3, S, S) float -> (B, P)
    t = rt.text_encoder.encode(["#C C picks up the cup"])    # .embedding (B, P), .prefix (B, L, Dt), .mask
    p = rt.video_encoder.fusion_prefix(clips)                # (B, 1 + F*N, Dv): cache it per clip
    s = rt.fusion.score_prefixes(p, t.prefix[:1], t.mask[:1])  # VTM match probability per clip (B,)

Every artifact is found through the manifest and verified before it is loaded (inside the folder, present, size,
sha256, the role and precision stored inside the file, the external data files an ONNX graph reads, the tool versions
it needs): a missing, swapped or out-of-folder file is an `EngineError` naming it. What really runs is reported per
role (`Runtime.describe()`), because ONNX Runtime silently falls back to the CPU when the CUDA/TensorRT libraries are
missing (onnxruntime-gpu without its CUDA libraries): the requested providers are compared with
`session.get_providers()` and a `ProviderFallbackWarning` is raised when they differ.

Backends, all lazily imported so a missing one is an error only when it is asked for:
- `onnxruntime`: CPU, CUDA or TensorRT execution providers; on CUDA the inputs and outputs go through IOBinding
  (device buffers, no host round trip for the outputs that stay on the device).
- `torch`: the model in eager PyTorch (optionally `torch.compile`), with the Triton attention kernels on CUDA, and
  with `graphs=True` each call captured once per input shape into a CUDA graph and replayed (runtime/graphs.py);
  `attention="tuned"` picks each attention core's implementation per shape from measurements on this device, kept
  in `attention_plan=FILE` across runs (model/attention_plan.py). It needs the weights, which an export folder
  does not hold: they come from the checkpoint the manifest names (or `checkpoint=`), and its sha256 must equal the
  manifest's, so the torch backend computes the same model.
- `program`: torch.export programs listed in the manifest (`egovlp-deploy export --format program`): no weights or
  model code needed besides the folder; `compile=True` compiles them with Inductor on this device; `graphs=True` as
  for `torch`.
- `aoti`: AOTInductor packages listed in the manifest (`egovlp-deploy export --format aoti`); `graphs=True` as for
  `torch`.
- `tensorrt`: TensorRT engines listed in the manifest (needs the tensorrt package and a GPU).
Each role session is warmed up once at load (batch 1), so the first user call does not pay for lazy allocation.

Threads: one Runtime serves any number of threads. Each role's session is created once (the first callers wait for
it), the tokenizer runs one call at a time (a fast tokenizer keeps its truncation and padding settings in itself),
and CUDA-graph captures and replays one at a time in the process (a graph has one set of static input and output
buffers, and a capture forbids other work on the device); the sessions themselves run concurrently.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import threading
import time
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..ort_session import ort_session
from ..tokenizer import has_visible_character

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from egovlp_deploy.export.manifest import ArtifactEntry
    from egovlp_deploy.model import EgoVLPv2

WARNED_QUERIES = 4096  # truncated queries a text encoder remembers having reported (see TextEncoder)
BACKENDS = ("onnxruntime", "torch", "program", "aoti", "tensorrt")
ARTIFACT_FORMATS = {"onnxruntime": "onnx", "program": "program", "aoti": "aoti", "tensorrt": "tensorrt"}
PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


class EngineError(ValueError):
    """The export folder cannot serve what was asked (no manifest, missing/corrupt artifact, backend missing)."""


class QueryError(ValueError):
    """A text query cannot be encoded (empty, or nothing left after tokenization)."""


class ProviderFallbackWarning(RuntimeWarning):
    """ONNX Runtime runs on other execution providers than requested (usually: CUDA libraries missing -> CPU)."""


class FailedValidationWarning(UserWarning):
    """An artifact the runtime loads failed its validation against PyTorch at export (exported with
    --allow-mismatch, or the export exited 1): its outputs may be wrong."""


class QueryTruncatedWarning(UserWarning):
    """A query has more tokens than the engines take: the words beyond the limit are not encoded."""


class TorchThreadsWarning(RuntimeWarning):
    """A Runtime set torch's intra-op thread count to another value than an earlier Runtime of this process: the
    count is the process's (torch.set_num_threads), so every torch-based Runtime runs on the new one."""


class UnverifiedTokenizerWarning(UserWarning):
    """ENGINES/tokenizer is used although the manifest records no tokenizer: nothing ties its files to this export."""


# -- the export folder ------------------------------------------------------------------------------------------
class EngineFolder:
    """An export directory read through its manifest; nothing else in it is trusted."""

    def __init__(self, path: str | os.PathLike) -> None:
        from egovlp_deploy.export.manifest import ManifestError, load_manifest

        self.path = Path(path)
        if not self.path.is_dir():
            raise EngineError(f"{self.path}: no such engine folder (run `egovlp-deploy export ... --out DIR`)")
        try:
            self.manifest = load_manifest(self.path)
        except ManifestError as exc:
            raise EngineError(str(exc)) from exc
        from egovlp_deploy.config import ConfigError, EgoVLPv2Config

        try:
            self.config = EgoVLPv2Config.from_dict(self.manifest.model_config)
        except ConfigError as exc:
            raise EngineError(f"{self.path}: manifest key model_config: {exc}") from exc
        self.max_batch = int(self.manifest.export.get("max_batch", 1))
        self.max_text_len = int(self.manifest.export.get("max_text_len", self.config.text.max_text_length))

    @cached_property
    def model_id(self) -> str:
        """The identity of the model behind these engines: sha256 of the source checkpoint's hash (or its name for
        seeded random weights) and the model config. An index records it and refuses engines of another model;
        re-exporting the same checkpoint in another format or precision keeps it."""
        src = self.manifest.source_checkpoint
        key = {"checkpoint": src.get("sha256") or src.get("path"), "config": self.manifest.model_config}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    @cached_property
    def manifest_sha256(self) -> str:
        """sha256 of manifest.json as stored: which export this is. Another export of the same model (another
        format or precision, or exported again) has the same `model_id` and another manifest hash."""
        from egovlp_deploy.export.manifest import MANIFEST
        from egovlp_deploy.hashing import sha256_file

        return sha256_file(self.path / MANIFEST)

    def listed(self, role: str, precision: str, format: str) -> list[ArtifactEntry]:
        """The manifest's entries of one role, precision and format; EngineError, saying what the folder holds and
        how to export the missing artifact, when there is none."""
        candidates = [
            a for a in self.manifest.artifacts if (a.role, a.precision, a.format) == (role, precision, format)
        ]
        if not candidates:
            have = sorted({f"{a.format}/{a.precision}/{a.role}" for a in self.manifest.artifacts})
            raise EngineError(
                f"{self.path}: the manifest lists no {format} {precision} artifact for role {role!r} (it has "
                f"{have}); run with what it has (--backend, --precision), or export the missing one with "
                f"`egovlp-deploy export ... --format {format} --precision {precision} --roles {role}`"
            )
        return candidates

    def artifact(self, role: str, precision: str, format: str, check_digest: bool = True) -> tuple[Path, ArtifactEntry]:
        """(verified path, manifest entry); the ORT-optimized variant of an ONNX graph is preferred (loads faster,
        same numbers: the exporter validated it). `check_digest`: as `verify_artifact`'s."""
        from egovlp_deploy.export.manifest import ArtifactError, ManifestError, verify_artifact

        candidates = self.listed(role, precision, format)
        candidates.sort(key=lambda a: a.variant != "ort-optimized")
        try:
            entry = candidates[0]
            path = verify_artifact(self.path, entry, self.manifest.tools, self.manifest.model_config, check_digest)
        except (ArtifactError, ManifestError) as exc:
            raise EngineError(f"engine folder {self.path}: {exc}") from exc
        if entry.validation.get("passed") is False:
            warnings.warn(
                FailedValidationWarning(
                    f"{self.path / entry.file}: failed its validation against PyTorch at export (see "
                    f"{self.path / 'validation.md'}): its outputs may be wrong"
                ),
                stacklevel=3,
            )
        return path, entry


# -- role runners: numpy in, numpy out ----------------------------------------------------------------------------
def _float_dtype(spec_dtype: str):
    return np.float16 if spec_dtype == "float16" else np.float32


class _Runner:
    """Runs one role; `describe` says where. Inputs: numpy arrays keyed by the role's input names."""

    role: str
    backend: str
    precision: str
    provider: str = ""
    io: dict
    load_seconds: float = 0.0

    def prepare(self, inputs: dict) -> dict:
        """Cast float inputs to the artifact's float dtype (fp16 graphs take fp16) and ints to int64."""
        out = {}
        for spec in self.io["inputs"]:
            x = np.asarray(inputs[spec["name"]]) if spec["name"] in inputs else None
            if x is None:
                raise EngineError(f"{self.role}: missing input {spec['name']!r}")
            want = np.int64 if spec["dtype"] == "int64" else _float_dtype(spec["dtype"])
            out[spec["name"]] = np.ascontiguousarray(x, dtype=want)
        return out

    def describe(self) -> dict:
        return {
            "role": self.role,
            "backend": self.backend,
            "provider": self.provider,
            "precision": self.precision,
            "load_seconds": round(self.load_seconds, 3),
        }


class OrtRunner(_Runner):
    backend = "onnxruntime"

    def __init__(self, folder: EngineFolder, role: str, precision: str, device: str, threads: int | None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise EngineError(f"the onnxruntime backend needs the onnxruntime package ({exc})") from exc
        t0 = time.perf_counter()
        path, entry = folder.artifact(role, precision, "onnx")
        self.role, self.precision, self.io, self.path = role, precision, entry.io, path
        requested = PROVIDERS.get(device)
        if requested is None:
            raise EngineError(f"onnxruntime device must be one of {list(PROVIDERS)}, got {device!r}")
        available = ort.get_available_providers()
        missing = [p for p in requested if p not in available]
        if missing and device != "cpu":
            warnings.warn(
                f"{role}: this onnxruntime build has no {missing} (available {available}); it will run on what is left",
                ProviderFallbackWarning,
                stacklevel=3,
            )
        self.session = ort_session(path, [p for p in requested if p in available], threads, error=EngineError)
        active = self.session.get_providers()
        self.provider = active[0]
        if active[0] != requested[0]:
            # The silent fallback: onnxruntime-gpu lists CUDA as available and then runs on the CPU when the CUDA
            # libraries fail to load. Say it, once per role, and report the provider that really runs.
            warnings.warn(
                f"{role}: requested {requested[0]} but ONNX Runtime runs {active} (missing CUDA/TensorRT libraries?)",
                ProviderFallbackWarning,
                stacklevel=3,
            )
        self.on_gpu = self.provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
        self.output_names = [t["name"] for t in self.io["outputs"]]
        self.load_seconds = time.perf_counter() - t0

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        from egovlp_deploy.export.session import ArtifactInputError, check_inputs

        feed = self.prepare(inputs)
        try:
            check_inputs(self.io, feed, where=f"{self.role}/{self.precision}: ")
        except ArtifactInputError as exc:
            raise EngineError(str(exc)) from exc
        if self.on_gpu:
            # IOBinding: inputs copied to the device once, outputs allocated there by ORT and copied back once.
            binding = self.session.io_binding()
            for name, x in feed.items():
                binding.bind_cpu_input(name, x)
            for name in self.output_names:
                binding.bind_output(name, "cuda")
            self.session.run_with_iobinding(binding)
            values = binding.copy_outputs_to_cpu()
        else:
            values = self.session.run(self.output_names, feed)
        return {n: np.asarray(v, dtype=np.float32) for n, v in zip(self.output_names, values)}


_graph_locks: dict[str, threading.Lock] = {}
_graph_locks_lock = threading.Lock()


def _device_graph_lock(device: str) -> threading.Lock:
    """The one lock of the CUDA-graph captures and replays on devices of kind `device` ("cuda") in this process."""
    with _graph_locks_lock:
        return _graph_locks.setdefault(device, threading.Lock())


class _TensorRunner(_Runner):
    """A torch callable over one role's tensors: numpy in, device tensors through `call` (or its CUDA graphs), numpy
    out. The torch, program and aoti backends differ only in what `call` is.

    With `graphs`, calls go through a `GraphCache`: the text length of text inputs is padded up to a bucket first
    (padding token, mask 0, zero states: the padded keys get zero attention weight), and text-length outputs are cut
    back, so one graph serves every query length of its bucket."""

    attention_plan = None

    def _setup(self, call, role: str, io: dict, precision: str, device: str, dtype, graphs: bool, max_graphs: int,
               pad_token_id: int, default_text_len: int) -> None:  # fmt: skip
        import torch

        from .graphs import GraphCache

        self.role, self.precision, self.io = role, precision, io
        self.torch, self.device, self.dtype = torch, torch.device(device), dtype
        self.call = call
        self.graphs = GraphCache(call, self.device, max_graphs) if graphs else None
        # held from a graph's capture or replay until its outputs are copied out: one set of static buffers per
        # graph, and a capture forbids other work on its device (`capture_error_mode="global"`), so one lock per
        # device kind serves every runner (every role, every Runtime) of the process
        self._replaying = _device_graph_lock(self.device.type)
        self.pad_token_id = pad_token_id
        self.max_text_len = int(io.get("dynamic", {}).get("text_len", [1, default_text_len])[1])
        self.output_names = [t["name"] for t in io["outputs"]]

    def describe(self) -> dict:
        info = super().describe()
        if self.graphs is not None:
            info["graphs"] = self.graphs.status()
        if self.attention_plan is not None:
            info["attention"] = self.attention_plan.summary()
        return info

    def _pad_text(self, args: dict) -> int | None:
        """Pads every text-length input to the bucket of its length; returns the true length (None: no text)."""
        from .graphs import bucket_length

        length = None
        for spec in self.io["inputs"]:
            if "text_len" not in spec["shape"]:
                continue
            axis = spec["shape"].index("text_len")
            x = args[spec["name"]]
            length = x.shape[axis]
            pad = bucket_length(length, self.max_text_len) - length
            if pad:
                fill = self.pad_token_id if spec["name"] == "input_ids" else 0
                shape = list(x.shape)
                shape[axis] = pad
                args[spec["name"]] = self.torch.cat((x, x.new_full(shape, fill)), dim=axis)
        return length

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        from egovlp_deploy.export.session import ArtifactInputError, check_input_shapes

        torch = self.torch
        # the names and shapes are checked as the onnxruntime backend checks them: an AOTInductor package reads its
        # inputs with the sizes it was compiled for, and a program or the eager modules would raise their own errors
        try:
            check_input_shapes(
                self.io,
                {name: np.shape(value) for name, value in inputs.items()},
                where=f"{self.role}/{self.precision}: ",
            )
        except ArtifactInputError as exc:
            raise EngineError(str(exc)) from exc
        args = {}
        for spec in self.io["inputs"]:
            x = np.ascontiguousarray(inputs[spec["name"]])
            if not x.flags.writeable:  # a broadcast view (one text prefix for K clips): torch takes writable memory
                x = x.copy()
            x = torch.from_numpy(x)
            x = x.to(self.device, torch.long if spec["dtype"] == "int64" else self.dtype, non_blocking=True)
            args[spec["name"]] = x
        # buckets only serve graphs that are captured: an eager call keeps the query's own length
        replayed = self.graphs is not None and self.graphs.capturing
        length = self._pad_text(args) if replayed else None
        plan = self.attention_plan
        if plan is not None:
            from egovlp_deploy.model.attention_plan import using as using_plan
        with self._replaying if replayed else contextlib.nullcontext():
            with torch.inference_mode(), using_plan(plan) if plan is not None else contextlib.nullcontext():
                out = (self.graphs or self.call)(**args)
            return self._host_outputs(out, length)

    def _host_outputs(self, out, length: int | None) -> dict[str, np.ndarray]:
        """The role's outputs as float32 numpy copies (a graph's outputs are its static buffers, which the next
        replay overwrites), text-length outputs cut back to the query's own `length` (None: as they are)."""
        out = out if isinstance(out, (tuple, list)) else (out,)
        result = {}
        for spec, t in zip(self.io["outputs"], out):
            if length is not None and "text_len" in spec["shape"]:
                t = t.narrow(spec["shape"].index("text_len"), 0, length)
            result[spec["name"]] = t.float().cpu().numpy()
        return result


class TorchRunner(_TensorRunner):
    """Eager PyTorch over the role modules of the export specs (the same forward the ONNX graphs were traced from),
    optionally `torch.compile`d."""

    backend = "torch"

    def __init__(
        self,
        model: EgoVLPv2,
        role: str,
        io: dict,
        precision: str,
        device: str,
        compile: bool,
        graphs: bool = False,
        max_graphs: int = 8,
        attention_plan=None,
    ) -> None:
        import torch

        from egovlp_deploy.export.specs import role_module

        t0 = time.perf_counter()
        self.module = role_module(model, role)
        call = torch.compile(self.module, dynamic=True) if compile else self.module
        dtype = next(model.parameters()).dtype  # fp16 only on CUDA (see Runtime.torch_model)
        self._setup(call, role, io, precision, device, dtype, graphs, max_graphs, model.config.text.pad_token_id,
                    model.config.text.max_text_length)  # fmt: skip
        attention = model.attention_backend
        self.provider = f"{self.device.type} eager" + (" + compile" if compile else "") + f" ({attention} attention)"
        self.attention_plan = attention_plan
        self.load_seconds = time.perf_counter() - t0


class ProgramRunner(_TensorRunner):
    """A torch.export program of the manifest (export/program.py): the module it describes, optionally compiled by
    Inductor on this device (`compile`; Inductor's on-disk cache makes the next process's compile short), optionally
    replayed from CUDA graphs."""

    backend = "program"

    def __init__(self, folder: EngineFolder, role: str, precision: str, device: str, compile: bool = False,
                 graphs: bool = False, max_graphs: int = 8) -> None:  # fmt: skip
        import torch

        from egovlp_deploy.export.program import ProgramError, program_module
        from egovlp_deploy.export.specs import TORCH_DTYPES

        t0 = time.perf_counter()
        path, entry = folder.artifact(role, precision, "program")
        if entry.device.split(":")[0] != device.split(":")[0]:
            raise EngineError(f"{path}: a torch.export program exported for {entry.device}, asked to run on {device}")
        try:
            # the manifest check above hashed the whole file: no second digest pass
            module = program_module(path, device, check_digest=False)
        except ProgramError as exc:
            raise EngineError(f"engine folder {folder.path}: {exc}") from exc
        call = torch.compile(module, dynamic=True) if compile else module
        dtype = TORCH_DTYPES.get(precision, torch.float32)
        text = folder.config.text
        self._setup(call, role, entry.io, precision, device, dtype, graphs, max_graphs, text.pad_token_id,
                    text.max_text_length)  # fmt: skip
        self.provider = f"{self.device.type} program" + (" + compile" if compile else "")
        self.load_seconds = time.perf_counter() - t0


class AotiRunner(_TensorRunner):
    backend = "aoti"

    def __init__(self, folder: EngineFolder, role: str, precision: str, device: str, graphs: bool = False,
                 max_graphs: int = 8) -> None:  # fmt: skip
        import torch

        from egovlp_deploy.export.specs import TORCH_DTYPES

        t0 = time.perf_counter()
        # the sha256 is checked once, on the bytes loaded (below), not first on the path as well
        path, entry = folder.artifact(role, precision, "aoti", check_digest=False)
        if entry.device.split(":")[0] != device.split(":")[0]:
            raise EngineError(f"{path}: an AOTInductor package for {entry.device}, asked to run on {device}")
        from egovlp_deploy.export.aoti import load_checked_package
        from egovlp_deploy.export.manifest import ArtifactError

        try:
            # a package is native code: the bytes loaded are the bytes hashed, not the path checked above
            call = load_checked_package(path, entry.sha256, entry.bytes)
        except ArtifactError as exc:
            raise EngineError(f"engine folder {folder.path}: {exc}") from exc
        except Exception as exc:  # torch raises RuntimeError with a C++ message on a package it cannot load
            raise EngineError(f"{path}: cannot load the AOTInductor package ({exc})") from exc
        dtype = TORCH_DTYPES.get(precision, torch.float32)
        text = folder.config.text
        self._setup(call, role, entry.io, precision, device, dtype, graphs, max_graphs, text.pad_token_id,
                    text.max_text_length)  # fmt: skip
        self.provider = f"aoti {device}"
        self.load_seconds = time.perf_counter() - t0


class TensorRTRunner(_Runner):
    backend = "tensorrt"

    def __init__(self, folder: EngineFolder, role: str, precision: str) -> None:
        from egovlp_deploy.export.tensorrt import TensorRTUnavailable, import_tensorrt, run_engine

        t0 = time.perf_counter()
        try:
            import_tensorrt()
        except TensorRTUnavailable as exc:
            raise EngineError(str(exc)) from exc
        path, entry = folder.artifact(role, precision, "tensorrt")
        self.role, self.precision, self.io, self.provider = role, precision, entry.io, "tensorrt cuda"
        self.run = run_engine(path, role)
        self.load_seconds = time.perf_counter() - t0

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        return self.run(self.prepare(inputs))


# -- the user-facing encoders -------------------------------------------------------------------------------------
def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _as_numpy(x, what: str = "input") -> np.ndarray:
    """A numpy view of an array, tensor or nested list; EngineError for what numpy cannot make one array of."""
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # no numpy dtype: widened, exactly
            x = x.float()
        x = x.numpy()
    try:
        return np.asarray(x)
    except (ValueError, TypeError) as exc:  # ragged nested lists
        raise EngineError(f"{what} must be one array, got {type(x).__name__} ({exc})") from None


def _finite_outputs(out: np.ndarray, what: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """`out` unless it holds NaN or inf; then EngineError naming the inputs that do. The inputs are checked only
    then: a NaN or inf input reaches every output it feeds, and checking the small outputs instead of the clips keeps
    the check off the latency of every call (a 16-frame clip is 2.4 M values; its embedding 256)."""
    if np.isfinite(out).all():
        return out
    bad = {name: int(x.size - np.count_nonzero(np.isfinite(x))) for name, x in inputs.items()}
    named = ", ".join(f"{n} of the {inputs[k].size} values in {k}" for k, n in bad.items() if n)
    cause = f"{named} are NaN or infinite" if named else "the inputs are finite: the engine itself overflowed"
    raise EngineError(f"{what} are NaN or infinite: {cause}")


def _check_mask(mask: np.ndarray, what: str = "attention_mask") -> np.ndarray:
    """An attention mask as int64, refused unless every value is 0 or 1 (a 2 or 0.5 would change the scores)."""
    if not (np.issubdtype(mask.dtype, np.number) or mask.dtype == bool) or not np.isin(mask, (0, 1)).all():
        raise EngineError(f"{what} must hold only 0 and 1, got values {np.unique(mask)[:5].tolist()}")
    return mask.astype(np.int64)


def _check_tokens(input_ids, mask, folder: EngineFolder) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) given by a caller as int64 (B, L) arrays (one query's 1-D arrays become B = 1), refused with an
    EngineError unless the ids are integer token ids of the model's vocabulary (an onnxruntime gather wraps a
    negative id around; torch raises an IndexError), the mask holds 0 and 1 in the ids' shape, and L is at most the
    engines' text length (`tokenize` truncates to it)."""
    ids, m = _as_numpy(input_ids, "input_ids"), _check_mask(_as_numpy(mask, "mask"))
    if not np.issubdtype(ids.dtype, np.integer):
        raise EngineError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
    if ids.ndim == 1:
        ids, m = ids[None], m[None]
    if ids.ndim != 2 or ids.shape != m.shape or ids.size == 0:
        raise EngineError(
            f"input_ids and mask must be non-empty (B, L) arrays of one shape (one query: (L,)), got {ids.shape} "
            f"and {m.shape}"
        )
    vocab, limit = folder.config.text.vocab_size, folder.max_text_len
    if ids.min() < 0 or ids.max() >= vocab:
        raise EngineError(
            f"input_ids must be token ids in [0, {vocab}) (the model's vocabulary), got {ids.min()}..{ids.max()}"
        )
    if ids.shape[1] > limit:
        raise EngineError(
            f"input_ids hold {ids.shape[1]} tokens per query, these engines take at most {limit} "
            "(TextEncoder.tokenize truncates to it)"
        )
    return ids.astype(np.int64), m


class VideoEncoder:
    """Preprocessed clips (B, F, 3, S, S) -> dual embeddings (B, P) and cacheable fusion prefixes (B, T, Dv)."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        cfg = runtime.folder.config.video
        self.clip_shape = (cfg.num_frames, cfg.in_chans, cfg.img_size, cfg.img_size)

    def _check(self, clips) -> np.ndarray:
        clips = _as_numpy(clips, "clips")
        if clips.ndim == 4:
            clips = clips[None]
        if clips.ndim != 5 or tuple(clips.shape[1:]) != self.clip_shape:
            raise EngineError(
                f"clips must be (B, {', '.join(map(str, self.clip_shape))}) (these engines were "
                f"exported for {self.clip_shape[0]} frames of {self.clip_shape[2]} px), got "
                f"{tuple(clips.shape)}"
            )
        if clips.shape[0] == 0:
            raise EngineError("no clips to encode")
        if not np.issubdtype(clips.dtype, np.floating):
            # uint8 frames are pixels, not the normalised clips the encoders take: encoding them would be wrong
            raise EngineError(
                f"clips must be preprocessed float arrays (normalised pixels, as ClipPipeline.preprocess gives), "
                f"got dtype {clips.dtype}"
            )
        return clips

    def _run(self, role: str, output: str, clips) -> np.ndarray:
        clips = self._check(clips)
        runner = self.rt.runner(role)
        out = np.concatenate([runner(video=clips[s])[output] for s in _batches(len(clips), self.rt.max_batch)])
        return _finite_outputs(out, f"the {role}'s outputs", {"clips": clips})

    def encode(self, clips: np.ndarray | torch.Tensor) -> np.ndarray:
        return self._run("video_encoder", "video_embedding", clips)

    def fusion_prefix(self, clips: np.ndarray | torch.Tensor) -> np.ndarray:
        return self._run("video_fusion_prefix", "video_prefix", clips)


@dataclass
class TextOutput:
    embedding: np.ndarray  # (B, P) dual text embedding
    prefix: np.ndarray  # (B, L, Dt) text states after the last unfused layer (cacheable per sentence)
    mask: np.ndarray  # (B, L) int64
    input_ids: np.ndarray  # (B, L) int64


def _query_list(texts) -> list[str]:
    """Queries as a non-empty list of str: one str, or a sequence of them (list, tuple, numpy array of str)."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)):
        raise QueryError("a query must be text (str), got bytes: decode it first (e.g. text.decode('utf-8'))")
    try:
        texts = list(texts)
    except TypeError:
        raise QueryError(f"queries must be a str or a list of str, got {type(texts).__name__}") from None
    if not texts:
        raise QueryError("no text to encode")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise QueryError(f"query {i} must be text (str), got {type(t).__name__} {t!r:.60}")
    return [str(t) for t in texts]  # numpy's str_ as plain str


class TextEncoder:
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        # digests of the queries already reported as truncated, oldest first: a long-lived Runtime (a server) holds
        # at most WARNED_QUERIES of them, 32 bytes each, however long or many its queries
        self._warned: collections.OrderedDict[bytes, None] = collections.OrderedDict()

    def tokenize(self, texts: str | list[str]) -> tuple[np.ndarray, np.ndarray]:
        texts = _query_list(texts)
        for t in texts:
            try:  # bytes that are not UTF-8 reach sys.argv as lone surrogates, which no tokenizer takes
                t.encode("utf-8")
            except UnicodeEncodeError:
                try:  # the bytes as given, the undecodable ones as \x escapes
                    shown = t.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                except UnicodeEncodeError:  # surrogates that stand for no byte
                    shown = t.encode("utf-8", "backslashreplace").decode()
                raise QueryError(f"query '{shown}' is not valid UTF-8 text: give the words in UTF-8") from None
            if not t.strip():
                raise QueryError(f"empty query {t!r}: give the words to search for")
            if not has_visible_character(t):
                raise QueryError(
                    f"query {t!r} has no visible character (only control, format or space characters): "
                    "give the words to search for"
                )
        limit = min(self.rt.folder.max_text_len, self.rt.folder.config.text.max_text_length)
        if limit < 3:  # the tokenizer cuts a text to <s> </s> at 2 tokens, and leaves it whole below
            raise EngineError(
                f"{self.rt.folder.path}: these engines take at most {limit} text tokens, no room for a word between "
                "<s> and </s> (export again with --max-text-len 3 or more)"
            )
        # One call at a time: a fast tokenizer sets its truncation and padding in itself before each call, so
        # another thread's call in between (the length check below truncates nothing) changes this one's.
        with self.rt.tokenizer_lock:
            tok = self.rt.tokenizer
            self._warn_truncated(texts, limit)
            enc = tok(list(texts), padding=True, truncation=True, max_length=limit, return_tensors="np")
        ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
        vocab = self.rt.folder.config.text.vocab_size
        if ids.max() >= vocab:
            raise QueryError(
                f"the tokenizer produced id {int(ids.max())}, the model's vocabulary has {vocab}: "
                f"wrong tokenizer for these engines?"
            )
        return ids, mask

    def _warn_truncated(self, texts: list[str], limit: int) -> None:
        """A QueryTruncatedWarning per query longer than `limit` tokens, once per query and encoder."""
        from egovlp_deploy.tokenizer import truncated_texts

        def digest(text: str) -> bytes:
            return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()

        fresh = [t for t in dict.fromkeys(texts) if digest(t) not in self._warned]
        for t in truncated_texts(self.rt.tokenizer, fresh, limit):
            self._warned[digest(t.text)] = None
            if len(self._warned) > WARNED_QUERIES:
                self._warned.popitem(last=False)
            warnings.warn(QueryTruncatedWarning(t.message()), stacklevel=4)

    def encode(self, texts: str | list[str]) -> TextOutput:
        return self.encode_tokens(*self.tokenize(texts))

    def encode_tokens(self, ids: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor) -> TextOutput:
        """`encode` of queries already tokenized by `tokenize` (its ids and mask, as it returned them; other arrays
        are checked as `_check_tokens` says)."""
        ids, mask = _check_tokens(ids, mask, self.rt.folder)
        runner = self.rt.runner("text_encoder")
        emb, pre = [], []
        for s in _batches(len(ids), self.rt.max_batch):
            out = runner(input_ids=ids[s], attention_mask=mask[s])
            emb.append(out["text_embedding"])
            pre.append(out["text_prefix"])
        return TextOutput(np.concatenate(emb), np.concatenate(pre), mask, ids)


def _match_probability(logits: np.ndarray) -> np.ndarray:
    """softmax over the two VTM classes, class 1 = match (the official fusion score)."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e[:, 1] / e.sum(axis=-1)).astype(np.float32)


class FusionScorer:
    """VTM match probabilities of one sentence against K clips.

    `score_prefixes` runs only the fused top layers over cached prefixes (the re-ranker's path: each clip's prefix
    was stored at indexing, the sentence's comes with its text encoding); `score_clips` runs the whole fusion
    graph from the clips (the monolithic path, the reference the cached one must equal)."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    def score_prefixes(
        self,
        video_prefix: np.ndarray | torch.Tensor,
        text_prefix: np.ndarray | torch.Tensor,
        mask: np.ndarray | torch.Tensor,
    ) -> np.ndarray:
        vp = _as_numpy(video_prefix, "video_prefix")
        tp, m = _as_numpy(text_prefix, "text_prefix"), _check_mask(_as_numpy(mask, "mask"))
        if vp.ndim == 2:  # one clip's prefix, as the text prefix of one sentence
            vp = vp[None]
        if tp.ndim == 2:
            tp, m = tp[None], m[None]
        if vp.ndim != 3 or tp.ndim != 3 or m.ndim != 2:
            raise EngineError(
                f"score_prefixes takes video_prefix (K, T, Dv), text_prefix (1 or K, L, Dt) and mask (1 or K, L), "
                f"got {vp.shape}, {tp.shape}, {m.shape}"
            )
        k = len(vp)
        if k == 0:
            return np.zeros(0, np.float32)
        if len(tp) == 1:  # one sentence against K clips: the text prefix is shared, broadcast without a copy
            tp, m = np.broadcast_to(tp, (k, *tp.shape[1:])), np.broadcast_to(m, (k, m.shape[1]))
        runner = self.rt.runner("fusion_head")
        logits = [
            runner(video_prefix=vp[s], text_prefix=tp[s], attention_mask=m[s])["vtm_logits"]
            for s in _batches(k, self.rt.max_batch)
        ]
        logits = _finite_outputs(np.concatenate(logits), "the VTM scores", {"video_prefix": vp, "text_prefix": tp})
        return _match_probability(logits)

    def score_clips(
        self, clips: np.ndarray | torch.Tensor, input_ids: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor
    ) -> np.ndarray:
        clips = self.rt.video_encoder._check(clips)
        ids, m = _check_tokens(input_ids, mask, self.rt.folder)
        k = len(clips)
        if len(ids) == 1:
            ids, m = np.broadcast_to(ids, (k, ids.shape[1])), np.broadcast_to(m, (k, m.shape[1]))
        runner = self.rt.runner("fusion")
        logits = [
            runner(video=clips[s], input_ids=ids[s], attention_mask=m[s])["vtm_logits"]
            for s in _batches(k, self.rt.max_batch)
        ]
        return _match_probability(_finite_outputs(np.concatenate(logits), "the VTM scores", {"clips": clips}))


# -- the runtime ----------------------------------------------------------------------------------------------------
def find_tokenizer(folder: EngineFolder, explicit: str | os.PathLike | None = None) -> Path:
    """The tokenizer directory: `explicit`, else the one the export copied in (its files hash-checked against the
    manifest), else ENGINES/tokenizer, else the training run's RUN/tokenizer next to the checkpoint the manifest
    names (exports made before tokenizers were copied in)."""
    if explicit:
        return Path(explicit)
    if folder.manifest.tokenizer:
        from egovlp_deploy.export.manifest import ArtifactError, ManifestError, verify_tokenizer

        try:
            return verify_tokenizer(folder.path, folder.manifest.tokenizer)
        except (ArtifactError, ManifestError) as exc:
            raise EngineError(f"engine folder {folder.path}: {exc}") from exc
    from egovlp_deploy.tokenizer import is_tokenizer_dir, tokenizer_beside

    if is_tokenizer_dir(folder.path / "tokenizer"):
        return _unrecorded_tokenizer(folder)
    src = folder.manifest.source_checkpoint.get("path")
    beside = tokenizer_beside(src) if src and not str(src).startswith("random:") else None
    if beside is not None:
        return beside
    raise EngineError(
        f"no tokenizer found for {folder.path} (looked in {folder.path / 'tokenizer'} and beside the "
        f"checkpoint {src}); pass --tokenizer DIR (a training run keeps its tokenizer in RUN/tokenizer)"
    )


def _unrecorded_tokenizer(folder: EngineFolder) -> Path:
    """ENGINES/tokenizer of an export that did not record it (put there by hand, or left by an export made before
    tokenizers were recorded): no hashes to check, so it is used with an UnverifiedTokenizerWarning, and the folder
    and its files must be inside the engines folder (no symlink out of it). The exporter removes the tokenizer an
    earlier export recorded when it copies none, so this is never another model's tokenizer left by a re-export."""
    from egovlp_deploy.export.manifest import ManifestError, inside

    try:
        path = inside(folder.path, "tokenizer", "the tokenizer folder")
        for file in sorted(path.iterdir()):
            inside(folder.path, file.name, "tokenizer file", base=path)
    except ManifestError as exc:
        raise EngineError(f"engine folder {folder.path}: {exc}") from exc
    warnings.warn(
        f"{path}: this tokenizer is not recorded in the engines' manifest, so nothing checks that it belongs to "
        f"these engines; pass --tokenizer DIR, or export again with --tokenizer DIR to record it",
        UnverifiedTokenizerWarning,
        stacklevel=4,
    )
    return path


_torch_threads: int | None = None  # the intra-op thread count a Runtime of this process set last


def _use_torch_threads(threads: int) -> None:
    """torch.set_num_threads(threads), which holds for the whole process (an onnxruntime session has its own): a
    TorchThreadsWarning where an earlier Runtime set another count, since its calls run on this one from now on."""
    import torch

    global _torch_threads
    if _torch_threads not in (None, threads):
        warnings.warn(
            f"torch's intra-op threads are set for the whole process: {threads} now, for every torch-based Runtime "
            f"of this process (another Runtime asked for {_torch_threads})",
            TorchThreadsWarning,
            stacklevel=4,
        )
    _torch_threads = threads
    torch.set_num_threads(threads)


class Runtime:
    """The engines of one export folder on one backend. Role sessions are created on first use and warmed up."""

    def __init__(
        self,
        engines: str | os.PathLike,
        backend: str = "onnxruntime",
        precision: str = "fp32",
        device: str = "cpu",
        threads: int | None = None,
        tokenizer: str | os.PathLike | None = None,
        checkpoint: str | None = None,
        compile: bool = False,
        warmup: bool = True,
        attention: str = "auto",
        graphs: bool = False,
        max_graphs: int = 8,
        attention_plan: str | os.PathLike | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise EngineError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if graphs and backend not in ("torch", "program", "aoti"):
            raise EngineError(
                f"CUDA graphs are for the torch, program and aoti backends (runtime/graphs.py), not {backend!r}"
            )
        if compile and backend not in ("torch", "program"):
            raise EngineError(f"compile is for the torch and program backends, not {backend!r}")
        if max_graphs < 1:
            raise EngineError(f"max_graphs must be >= 1, got {max_graphs}")
        self.graphs, self.max_graphs = graphs, max_graphs
        from egovlp_deploy.config import ATTENTION_BACKENDS

        if attention not in ATTENTION_BACKENDS:
            raise EngineError(f"attention must be one of {ATTENTION_BACKENDS}, got {attention!r}")
        self.attention = attention  # the torch backend's attention path (model/attention.py)
        if attention != "auto" and backend != "torch":
            raise EngineError(f"attention {attention!r} is a torch-backend option, not {backend!r}'s")
        if backend == "torch" and precision == "fp16" and not str(device).startswith("cuda"):
            # the eager model runs fp16 on CUDA only (`torch_model`): on a CPU it would run fp32 under an fp16 label,
            # which the index and the benchmarks record
            raise EngineError(
                f"the torch backend runs fp16 on CUDA only, not on {device!r}: use precision fp32 there, or the fp16 "
                "artifacts of another backend (onnxruntime)"
            )
        if attention_plan is not None and (backend != "torch" or attention != "tuned"):
            raise EngineError("an attention plan file is for the torch backend with attention 'tuned'")
        self.attention_plan_path = attention_plan
        self.attention_plan = None  # the torch backend's AttentionPlan when attention is 'tuned'
        self.folder = EngineFolder(engines)
        self.backend, self.precision, self.device, self.threads = backend, precision, device, threads
        self.checkpoint, self.compile, self.warmup = checkpoint, compile, warmup
        self._tokenizer_dir = tokenizer
        self._runners: dict[str, _Runner] = {}
        self._closed = False
        self._loading = threading.RLock()  # held while a role's session (and the model it needs) is created
        self.tokenizer_lock = threading.Lock()  # held by each use of `tokenizer` (TextEncoder.tokenize)
        self.max_batch = max(1, self.folder.max_batch)
        self.video_encoder = VideoEncoder(self)
        self.text_encoder = TextEncoder(self)
        self.fusion = FusionScorer(self)

    @property
    def model_id(self) -> str:
        return self.folder.model_id

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        from egovlp_deploy.tokenizer import TokenizerError, check_tokenizer_fits, load_tokenizer

        self._check_open()
        path = find_tokenizer(self.folder, self._tokenizer_dir)
        try:
            tok = load_tokenizer(path)
            t = self.folder.config.text
            check_tokenizer_fits(tok, t.vocab_size, t.pad_token_id, t.bos_token_id, t.eos_token_id)
        except TokenizerError as exc:
            raise EngineError(str(exc)) from exc
        return tok

    @cached_property
    def torch_model(self) -> EgoVLPv2:
        """The eager model for the torch backend, from the checkpoint the manifest names (hash-checked)."""
        import torch

        from egovlp_deploy.model.factory import load_model

        src = self.folder.manifest.source_checkpoint
        path = self.checkpoint or src.get("path")
        if not path:
            raise EngineError(f"{self.folder.path}: the manifest names no source checkpoint; pass checkpoint=")
        try:
            model, info = load_model(str(path), self.folder.config.video.num_frames)
        except (OSError, ValueError) as exc:
            raise EngineError(f"torch backend: cannot load the checkpoint {path} ({exc})") from exc
        if info.get("sha256") != src.get("sha256") or (info["sha256"] is None and str(path) != src.get("path")):
            raise EngineError(
                f"torch backend: checkpoint {path} (sha256 {info.get('sha256')}) is not the one these "
                f"engines were exported from ({src.get('path')}, sha256 {src.get('sha256')})"
            )
        cuda = self.device.startswith("cuda")
        # 'auto' picks the Triton kernels on CUDA and the reference math on the CPU (model/attention.py);
        # 'reference' is plain eager PyTorch everywhere (the GPU baseline of `bench e2e --torch-attention`).
        model.set_attention_backend(self.attention)
        if self.attention == "tuned":
            # per shape the fastest measured implementation (model/attention_plan.py), timed as this runtime runs:
            # CUDA graph replays with graphs on, eager calls otherwise
            from egovlp_deploy.model.attention_plan import AttentionPlan, AttentionPlanError

            try:
                self.attention_plan = AttentionPlan(
                    self.attention_plan_path, metric="graph" if self.graphs and cuda else "wall"
                )
            except AttentionPlanError as exc:
                raise EngineError(str(exc)) from exc
        model = model.to(self.device, torch.float16 if self.precision == "fp16" and cuda else torch.float32)
        from egovlp_deploy.export.specs import skip_input_checks

        # The role modules skip the model's data-dependent input checks (the runner checks shapes instead), as the
        # exporters trace them; this model belongs to the runtime, so nothing is restored (a context held open for
        # the runtime's lifetime would be closed during interpreter shutdown, when its imports no longer work).
        skip_input_checks(model)
        return model.eval()

    def runner(self, role: str) -> _Runner:
        """The role's session, created (and warmed up) on first use, once: threads asking for it meanwhile wait for
        that one."""
        runner = self._runners.get(role)
        if runner is not None:
            return runner
        with self._loading:
            self._check_open()
            if role not in self._runners:
                self._runners[role] = self._new_runner(role)
            return self._runners[role]

    def close(self) -> None:
        """Frees the sessions, the torch model and the tokenizer now, not whenever the garbage collector finds them
        (the encoders refer back to this Runtime, a cycle); a later use raises EngineError. Closing again does
        nothing. `with Runtime(...) as rt:` closes it at the end of the block."""
        with self._loading:
            self._closed = True
            self._runners = {}
            for cached in ("torch_model", "tokenizer"):  # cached_property values
                self.__dict__.pop(cached, None)
            self.attention_plan = None

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError(f"this Runtime ({self.folder.path}, {self.backend}) is closed")

    def _new_runner(self, role: str) -> _Runner:
        if self.threads and self.backend in ("torch", "program", "aoti"):
            _use_torch_threads(self.threads)
        if self.backend == "onnxruntime":
            r = OrtRunner(self.folder, role, self.precision, self.device, self.threads)
        elif self.backend == "torch":
            from egovlp_deploy.export.manifest import io_entry

            io = io_entry(role, self.folder.config, self.precision, self.folder.max_batch, self.folder.max_text_len)
            r = TorchRunner(
                self.torch_model,
                role,
                io,
                self.precision,
                self.device,
                self.compile,
                graphs=self.graphs,
                max_graphs=self.max_graphs,
                attention_plan=self.attention_plan,
            )
        elif self.backend == "program":
            r = ProgramRunner(
                self.folder, role, self.precision, self.device, self.compile, self.graphs, self.max_graphs
            )
        elif self.backend == "aoti":
            r = AotiRunner(self.folder, role, self.precision, self.device, self.graphs, self.max_graphs)
        else:
            r = TensorRTRunner(self.folder, role, self.precision)
        if self.warmup:
            t0 = time.perf_counter()
            r(**self.example(role, text_len=min(8, self.folder.max_text_len)))
            r.warmup_seconds = time.perf_counter() - t0
        return r

    def example(self, role: str, batch: int = 1, text_len: int = 8) -> dict[str, np.ndarray]:
        """Deterministic inputs of a role at the given sizes (warm-up, benchmarks)."""
        from egovlp_deploy.export.specs import ROLES, static_dims

        sizes = {**static_dims(self.folder.config), "batch": batch, "text_len": text_len}
        rng = np.random.default_rng(0)
        out = {}
        for t in ROLES[role].inputs:
            shape = t.shape(sizes)
            if t.dtype == "int64":
                out[t.name] = (
                    np.ones(shape, np.int64)
                    if t.name == "attention_mask"
                    else rng.integers(5, self.folder.config.text.vocab_size, shape).astype(np.int64)
                )
            else:
                out[t.name] = rng.standard_normal(shape).astype(np.float32)
        return out

    def check_roles(self, *roles: str) -> None:
        """EngineError unless the export lists every role for this backend and precision: checked from the manifest
        alone (nothing loaded), before a command writes anything. The torch backend runs every role from the
        checkpoint."""
        format = ARTIFACT_FORMATS.get(self.backend)
        if format is not None:
            for role in roles:
                self.folder.listed(role, self.precision, format)

    def load(self, *roles: str) -> Runtime:
        for role in roles:
            self.runner(role)
        return self

    def describe(self) -> list[dict]:
        return [r.describe() for r in list(self._runners.values())]  # a copy: another thread may add a role

    def summary(self) -> str:
        rows = self.describe()
        if not rows:
            return f"{self.backend} ({self.precision}), no role loaded yet"
        return "; ".join(f"{r['role']}: {r['backend']} {r['provider']} {r['precision']}" for r in rows)
