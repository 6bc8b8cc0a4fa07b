"""CUDA graphs for the torch backend: each role call is captured once per input signature and replayed.

At batch 1 the encoders are bound by the host: Python, op dispatch and Triton's launcher issue hundreds of small
kernels, each costing more CPU time than GPU time. A CUDA graph records the kernels of one call and replays them
with a single launch. Replay reads its inputs from, and writes its outputs to, the fixed buffers of the capture, so
every signature (input names, shapes, dtypes) gets its own graph with its own static buffers:

    graphs = GraphCache(fn, device)          # fn(**tensors) -> tensor or tuple of tensors
    out = graphs(video=x)                    # capture on the first call of this signature, replay after

The outputs are the static buffers: valid until the next call (copy them before calling again), so a cache takes one
caller at a time (`TorchRunner` holds a lock from the call until its outputs are copied out). The graphs of one
cache share one memory pool (replays never overlap), and at most `max_graphs` signatures are kept (least recently
used first out); a signature whose capture failed runs eagerly from then on, and `status()` says why. On a CPU
device nothing is captured. The text length varies with every query: `bucket_length` pads it to a multiple of
`TEXT_BUCKET` so a few graphs serve all queries (`TorchRunner` pads and cuts back).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable

from ..errors import error_line

# Text lengths are padded up to a multiple of this many tokens before capture.
TEXT_BUCKET = 8
# Calls before capture: autotuning, lazy initialisation and the allocator's first blocks happen outside the graph.
WARMUP_CALLS = 2


class GraphCaptureWarning(RuntimeWarning):
    """A call could not be captured into a CUDA graph; it runs eagerly (the reason is in the message)."""


def bucket_length(length: int, limit: int) -> int:
    """`length` rounded up to a multiple of TEXT_BUCKET, at most `limit` (and never below `length`)."""
    return max(length, min(limit, -(-length // TEXT_BUCKET) * TEXT_BUCKET))


def cuda_capture(fn: Callable, inputs: dict, pool=None):
    """(replay, static outputs) of fn(**inputs) captured into a CUDA graph after WARMUP_CALLS calls on a side stream
    (the capture rule of torch.cuda.graphs); `pool` shares one memory pool between the graphs of one runner."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(WARMUP_CALLS):
            fn(**inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = fn(**inputs)
    return graph.replay, outputs


class _Captured:
    def __init__(self, inputs: dict, replay: Callable, outputs):
        self.inputs, self.replay, self.outputs = inputs, replay, outputs


class GraphCache:
    """fn captured per input signature, replayed with its inputs copied into the static buffers."""

    def __init__(self, fn: Callable, device, max_graphs: int = 8, capture: Callable | None = None):
        import torch

        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.fn, self.max_graphs = fn, max_graphs
        self.device = torch.device(device)
        self.graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self.failed: dict[tuple, str] = {}
        self.counts = {"captures": 0, "replays": 0, "eager": 0, "evictions": 0}
        self.disabled = None
        if capture is None:
            if self.device.type != "cuda":
                self.disabled = f"no CUDA graphs on {self.device.type}: runs eagerly"
            capture = cuda_capture
        self._capture = capture
        self._pool = None

    @staticmethod
    def signature(inputs: dict) -> tuple:
        return tuple((name, tuple(t.shape), str(t.dtype)) for name, t in sorted(inputs.items()))

    @property
    def capturing(self) -> bool:
        """Whether calls can be captured at all (False on a CPU device)."""
        return self.disabled is None

    def __call__(self, **inputs):
        entry = None
        if self.capturing:
            key = self.signature(inputs)
            entry = self.graphs.get(key)
            if entry is not None:
                self.graphs.move_to_end(key)
            elif key not in self.failed:
                entry = self._new_graph(key, inputs)
        if entry is None:  # no CUDA device, or this signature's capture failed
            self.counts["eager"] += 1
            return self.fn(**inputs)
        for name, x in inputs.items():
            entry.inputs[name].copy_(x)
        entry.replay()
        self.counts["replays"] += 1
        return entry.outputs

    def _new_graph(self, key: tuple, inputs: dict) -> _Captured | None:
        while len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)
            self.counts["evictions"] += 1
        if not self.graphs:
            # A pool whose graphs are all gone cannot take a new capture while a block of it is still held (e.g.
            # by a caller keeping the last outputs): start a new one.
            self._pool = None
        static = {name: x.clone() for name, x in inputs.items()}
        try:
            if self._pool is None and self.device.type == "cuda":
                import torch

                self._pool = torch.cuda.graph_pool_handle()
            replay, outputs = self._capture(self.fn, static, self._pool)
        except Exception as exc:  # any capture failure: this signature runs eagerly, and says why
            reason = error_line(exc)
            self.failed[key] = reason
            warnings.warn(
                f"CUDA graph capture failed for {key} ({reason}); running it eagerly", GraphCaptureWarning, stacklevel=3
            )
            return None
        self.counts["captures"] += 1
        entry = self.graphs[key] = _Captured(static, replay, outputs)
        return entry

    def status(self) -> str:
        """One line for `describe()`: what is captured, replayed, and why anything is not."""
        if not self.capturing:
            return self.disabled
        c = self.counts
        text = (
            f"CUDA graphs: {len(self.graphs)} captured (max {self.max_graphs}), {c['replays']} replays, "
            f"{c['evictions']} evicted"
        )
        if self.failed:
            text += f"; {len(self.failed)} signature(s) eager: {next(iter(self.failed.values()))}"
        return text
