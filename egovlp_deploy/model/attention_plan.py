"""The "tuned" attention backend: each attention call's implementation is picked per shape from measurements.

No implementation wins everywhere. On a GPU the fused Triton kernels win the large video shapes, while at batch 1
the short text self-attention and the cross-attention cores can run faster through SDPA or plain torch
(BENCHMARKS.md). With `attention_backend="tuned"`, every attention core looks up its shape key (op, sizes, dtype,
device, timing method) in the active `AttentionPlan`:

- a key seen before runs the implementation recorded for it;
- a new key is measured on the call's own inputs: every candidate ("triton", "sdpa", "reference") runs, those whose
  output differs from the reference's beyond the dtype's tolerance (or fails) are rejected, the others are timed, and
  the fastest is recorded and used from then on;
- where nothing can be timed (inside a CUDA graph capture, under torch.export / ONNX tracing, on fake or symbolic
  shapes) an unmeasured key runs the default choice (`auto`'s) and is reported as unmeasured; inside torch.compile
  every call takes `auto`'s choice (model/attention.py `tuned_backend`).

Timing method ("metric"): "graph" times replays of the call captured in a CUDA graph (GPU time only: what a
runtime that replays CUDA graphs pays), "wall" times back-to-back eager calls (host launch cost included: what an
eager caller pays; the only method on a CPU).

A plan may be backed by a JSON file, so measurements persist across processes. Every entry carries the device name
and the torch / Triton versions it was measured with; entries measured elsewhere stay in the file but are never
used here. The file is rewritten atomically after each new measurement, merged with what another process may have
added meanwhile. `report()` lists what was picked, with the times.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import atomic_write_bytes
from ..errors import error_line

PLAN_KIND = "egovlp-attention-plan"
FORMAT_VERSION = 1
IMPLEMENTATIONS = ("triton", "sdpa", "reference")
METRICS = ("graph", "wall")
# An implementation is accepted when its largest difference from the reference output, relative to the reference's
# largest magnitude, stays within this bound: a guard against a broken path, far above the kernels' tested errors
# (~1e-3 relative in fp16, ~1e-6 in fp32; tests/kernels).
ACCEPT_RELATIVE = {torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float32: 1e-3, torch.float64: 1e-6}
TIMED_CALLS = 20  # per candidate, after warm-up calls (Triton compiles and autotunes in the warm-up)
WARMUP_CALLS = 3


class AttentionPlanError(ValueError):
    """A plan file is unusable (not ours, malformed, unwritable), or a plan is asked for something it cannot do."""


@dataclass
class Entry:
    """The measurement of one shape key: milliseconds per candidate, why others were rejected, and the pick."""

    context: dict  # device, torch, triton, metric
    op: str
    shape: dict
    dtype: str
    ms: dict[str, float]
    pick: str
    rejected: dict[str, str] = field(default_factory=dict)
    relative_error: dict[str, float] = field(default_factory=dict)

    def key(self) -> tuple:
        return _key(_context_text(self.context), self.op, self.shape, self.dtype)

    def as_json(self) -> dict:
        return {
            **self.context,
            "op": self.op,
            "shape": self.shape,
            "dtype": self.dtype,
            "ms": self.ms,
            "pick": self.pick,
            "rejected": self.rejected,
            "relative_error": self.relative_error,
        }

    def describe(self) -> str:
        shape = " ".join(f"{k}={v}" for k, v in self.shape.items())
        others = ", ".join(f"{name} {ms:.3f}" for name, ms in sorted(self.ms.items(), key=lambda kv: kv[1]))
        rejected = "".join(f"; {name} rejected ({why})" for name, why in self.rejected.items())
        return f"{self.op} {shape} {self.dtype} [{self.context['metric']}]: {self.pick} (ms: {others}{rejected})"


def _context_text(context: dict) -> str:
    return json.dumps(context, sort_keys=True)


def _key(context_text: str, op: str, shape: dict, dtype: str) -> tuple:
    """A shape key: cheap to build and hash, as it is looked up on every attention call."""
    return context_text, op, tuple(sorted(shape.items())), dtype


def _entry_from_json(item: Any, where: str) -> Entry:
    if not isinstance(item, dict):
        raise AttentionPlanError(f"{where}: an entry must be a JSON object")
    try:
        context = {name: item[name] for name in ("device", "torch", "triton", "metric")}
        entry = Entry(
            context, item["op"], item["shape"], item["dtype"], item["ms"], item["pick"],
            item.get("rejected", {}), item.get("relative_error", {}),
        )  # fmt: skip
    except KeyError as exc:
        raise AttentionPlanError(f"{where}: an entry lacks {exc}") from exc
    ok = (
        all(isinstance(v, str) for v in context.values())
        and isinstance(entry.op, str)
        and isinstance(entry.shape, dict)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in entry.shape.values())
        and isinstance(entry.dtype, str)
        and isinstance(entry.ms, dict)
        and all(k in IMPLEMENTATIONS and isinstance(v, (int, float)) and math.isfinite(v) for k, v in entry.ms.items())
        and entry.pick in entry.ms
        and isinstance(entry.rejected, dict)
        and isinstance(entry.relative_error, dict)
    )
    if not ok:
        raise AttentionPlanError(f"{where}: a malformed entry ({json.dumps(item)[:200]})")
    return entry


def read_plan_file(path: str | os.PathLike) -> list[Entry]:
    """The entries of a plan file ([] when it does not exist); AttentionPlanError for anything else that is wrong."""
    from ..jsonfile import read_json

    path = Path(path)
    if not path.exists():
        return []
    data = read_json(path, AttentionPlanError, expect=dict)
    if data.get("kind") != PLAN_KIND:
        raise AttentionPlanError(f"{path}: not an attention plan (kind {data.get('kind')!r}, expected {PLAN_KIND!r})")
    if data.get("format_version") != FORMAT_VERSION:
        raise AttentionPlanError(f"{path}: format_version {data.get('format_version')!r}, expected {FORMAT_VERSION}")
    entries = data.get("entries")
    if not isinstance(entries, list):
        raise AttentionPlanError(f"{path}: 'entries' must be a JSON array")
    return [_entry_from_json(item, str(path)) for item in entries]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from ..benchmarking import cpu_model

    return f"{device.type}: {cpu_model()}"


def _versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"torch": torch.__version__, "triton": triton_version}


def can_measure(*tensors: torch.Tensor) -> bool:
    """Whether these tensors can be timed now: concrete sizes on a real device, outside tracing and graph capture."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    t = tensors[0]
    if t.device.type not in ("cpu", "cuda") or isinstance(t, torch._subclasses.FakeTensor):
        return False
    if not all(isinstance(s, int) for x in tensors for s in x.shape):
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _time_wall(fn: Callable[[], Any], device: torch.device, calls: int) -> float:
    """Milliseconds per call of back-to-back eager calls (host launch cost included)."""
    for _ in range(WARMUP_CALLS):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


def _time_graph(fn: Callable[[], Any], device: torch.device, calls: int) -> float:
    """Milliseconds per replay of the call captured in a CUDA graph (GPU time only)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(WARMUP_CALLS):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        graph.replay()
    end.record()
    end.synchronize()
    del graph
    return start.elapsed_time(end) / calls


def default_candidates(device: torch.device) -> tuple[str, ...]:
    """Triton on CUDA when it imports; on a CPU only the torch paths (Triton runs there only as a test interpreter)."""
    if device.type == "cuda":
        try:
            import triton  # noqa: F401

            return IMPLEMENTATIONS
        except ImportError:
            pass
    return ("sdpa", "reference")


def _runs_on(name: str, t: torch.Tensor) -> bool:
    """Whether implementation `name` can run on `t`'s device: Triton needs CUDA, or its interpreter on a CPU."""
    if name != "triton" or t.is_cuda:
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


def _relative_error(out: torch.Tensor, reference: torch.Tensor, scale: float) -> float:
    """Largest |out - reference| / scale, where NaN or inf in the same place on both sides counts as equal (the
    reference's own NaN, from NaN inputs, must not reject every candidate) and anywhere else as infinite."""
    if out.shape != reference.shape:
        return math.inf
    if not out.numel():
        return 0.0
    same = (out == reference) | (out.isnan() & reference.isnan())
    diff = torch.where(same, 0.0, (out - reference).abs().nan_to_num(nan=math.inf))
    return float(diff.max()) / scale


class AttentionPlan:
    """Measured picks per attention shape key; see the module docstring.

    path: a JSON file to read picks from and to record new measurements in (None: this process only).
    metric: "graph" or "wall" (see the module docstring); CPU calls are always timed "wall".
    candidates: the implementations to try (default: `default_candidates` of each call's device).
    timer: (name, fn, device, calls, metric) -> ms per call of candidate `name` (fn runs it); replaceable in tests.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        metric: str = "wall",
        candidates: tuple[str, ...] | None = None,
        calls: int = TIMED_CALLS,
        timer: Callable[[str, Callable[[], Any], torch.device, int, str], float] | None = None,
    ) -> None:
        if metric not in METRICS:
            raise AttentionPlanError(f"metric must be one of {METRICS}, got {metric!r}")
        if candidates is not None:
            unknown = [c for c in candidates if c not in IMPLEMENTATIONS]
            if unknown or not candidates:
                raise AttentionPlanError(
                    f"candidates must be a non-empty subset of {IMPLEMENTATIONS}, got {candidates}"
                )
        self.path = None if path is None else Path(path)
        if self.path is not None and not self.path.parent.is_dir():
            raise AttentionPlanError(f"{self.path}: its folder {self.path.parent} does not exist")
        self.metric, self.candidates, self.calls = metric, candidates, calls
        self._timer = timer
        self.entries: dict[tuple, Entry] = {e.key(): e for e in read_plan_file(self.path)} if self.path else {}
        self.used: dict[tuple, int] = {}  # key -> calls resolved through it in this process
        self.unmeasured: dict = {}  # key -> description, for calls that ran the default
        self.measured = 0  # entries measured by this process
        self._lock = threading.RLock()
        self._contexts: dict[torch.device, tuple[dict, str]] = {}

    # -- lookup -----------------------------------------------------------------------------------------------------
    def context(self, device: torch.device) -> tuple[dict, str]:
        """What a measurement depends on besides the shape (device name, torch/Triton versions, timing method), and
        its key text; built once per device, as the lookup runs on every attention call."""
        if device not in self._contexts:
            metric = self.metric if device.type == "cuda" else "wall"  # no CUDA graphs on a CPU
            context = {"device": device_name(device), **_versions(), "metric": metric}
            self._contexts[device] = context, _context_text(context)
        return self._contexts[device]

    def choose(self, op: str, shape: dict, run: Callable[[str], torch.Tensor], *tensors: torch.Tensor) -> str:
        """The implementation for this call: recorded, else measured now with `run(name)` (which returns that
        implementation's output for the call's inputs), else (nothing can be timed) the default choice."""
        t = tensors[0]
        if not all(type(v) is int for v in shape.values()):
            with self._lock:  # symbolic sizes (tracing): no key can name this call
                self.unmeasured.setdefault(f"{op} symbolic", f"{op} with symbolic sizes")
            return "auto"
        context, context_text = self.context(t.device)
        dtype = str(t.dtype).removeprefix("torch.")
        key = _key(context_text, op, shape, dtype)
        with self._lock:
            entry = self.entries.get(key)
            if entry is not None and not _runs_on(entry.pick, t):
                # a file edited or written under the Triton interpreter: the pick cannot run here, so this key is
                # measured again (the new entry replaces it in the file)
                entry = None
            if entry is None and can_measure(*tensors):  # checked only for a new key: not on the hot path
                entry = self._measure(context, op, shape, dtype, run, t.device)
                self.entries[key] = entry
                self.measured += 1
                self._save()
            if entry is None:
                self.unmeasured.setdefault(key, f"{op} {shape} {dtype}")
                return "auto"
            self.used[key] = self.used.get(key, 0) + 1
            return entry.pick

    def _measure(self, context, op, shape, dtype, run, device) -> Entry:
        candidates = self.candidates or default_candidates(device)
        with torch.inference_mode():
            reference = run("reference").float()
            scale = max(float(reference.nan_to_num().abs().max()), 1e-30) if reference.numel() else 1.0
            bound = ACCEPT_RELATIVE.get(getattr(torch, dtype, None), 1e-3)
            ms, rejected, errors = {}, {}, {}
            for name in candidates:
                try:
                    out = reference if name == "reference" else run(name).float()
                    err = _relative_error(out, reference, scale)
                    if name != "reference" and not err <= bound:  # the reference is its own yardstick
                        rejected[name] = f"relative error {err:.2e} > {bound:.0e}"
                        continue
                    errors[name] = err
                    ms[name] = self._time(name, lambda name=name: run(name), device, context["metric"])
                except Exception as exc:  # a candidate that cannot run this shape is rejected, with the reason
                    rejected[name] = error_line(exc, 160)
        if not ms:
            raise AttentionPlanError(f"no attention implementation ran {op} {shape} {dtype}: {rejected}")
        pick = min(ms, key=ms.get)
        return Entry(context, op, shape, dtype, ms, pick, rejected, errors)

    def _time(self, name, fn, device, metric) -> float:
        if self._timer is not None:
            return self._timer(name, fn, device, self.calls, metric)
        if metric == "graph" and device.type == "cuda":
            return _time_graph(fn, device, self.calls)
        return _time_wall(fn, device, self.calls)

    # -- persistence and report ---------------------------------------------------------------------------------
    def _save(self) -> None:
        if self.path is None:
            return
        merged = {e.key(): e for e in read_plan_file(self.path)}
        merged.update(self.entries)
        text = json.dumps(
            {"kind": PLAN_KIND, "format_version": FORMAT_VERSION, "entries": [e.as_json() for e in merged.values()]},
            indent=1,
        )
        try:
            atomic_write_bytes(self.path, (text + "\n").encode())
        except OSError as exc:
            raise AttentionPlanError(f"{self.path}: cannot record the attention plan ({exc})") from exc

    def report(self) -> list[str]:
        """One line per shape key this process resolved: the pick and every candidate's time (or why it was
        rejected); unmeasured keys (default choice) last."""
        lines = [self.entries[k].describe() for k in self.used]
        lines += [f"{text}: unmeasured, ran the default" for k, text in self.unmeasured.items() if k not in self.used]
        return lines

    def summary(self) -> str:
        picks: dict[str, int] = {}
        for k in self.used:
            picks[self.entries[k].pick] = picks.get(self.entries[k].pick, 0) + 1
        text = ", ".join(f"{n} {name}" for name, n in sorted(picks.items())) or "no shape resolved yet"
        where = f"{self.path}" if self.path else "this process only"
        extra = f"; {len(self.unmeasured)} unmeasured (default)" if self.unmeasured else ""
        return f"tuned attention ({self.metric}): {text} of {len(self.used)} shape(s){extra}; plan: {where}"


# The plan `activate` set, per thread (and asyncio task): two runtimes with their own plans may run in two threads
# of one process, each consulting its own.
_active: contextvars.ContextVar[AttentionPlan | None] = contextvars.ContextVar("attention_plan", default=None)
_default: AttentionPlan | None = None  # where no plan is active: one in-memory plan for the whole process
_default_lock = threading.Lock()


def active_plan() -> AttentionPlan:
    """The plan "tuned" calls consult: the one `activate` set in this thread, else a process-wide in-memory plan
    (wall metric)."""
    global _default
    plan = _active.get()
    if plan is not None:
        return plan
    with _default_lock:
        if _default is None:
            _default = AttentionPlan()
        return _default


def activate(plan: AttentionPlan | None) -> AttentionPlan | None:
    """Makes `plan` the one "tuned" calls of this thread consult (None: the process-wide in-memory plan); returns
    the previous."""
    previous = _active.get()
    _active.set(plan)
    return previous


@contextlib.contextmanager
def using(plan: AttentionPlan) -> Iterator[AttentionPlan]:
    previous = activate(plan)
    try:
        yield plan
    finally:
        activate(previous)
