"""What the Triton attention ops share: where they may run, how dots are done, output allocation, autotuning.

Kept apart from the op files so each op file reads as math -> kernel -> launcher -> op registration.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

# dtypes the kernels accept; accumulation is always fp32.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# tl.dot needs every dimension >= 16.
MIN_DOT = 16


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, read when @triton.jit runs)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def head_block(head_dim: int) -> int:
    """The padded head-dim tile: a power of two, >= 16 for tl.dot."""
    return max(MIN_DOT, next_pow2(head_dim))


def check_tensor(name: str, t: torch.Tensor, dims: int) -> None:
    """Argument checks at the op boundary: rank, dtype, device (CUDA, or CPU under the interpreter)."""
    torch._check(t.dim() == dims, lambda: f"{name} must have {dims} dims, got shape {tuple(t.shape)}")
    torch._check(t.dtype in SUPPORTED_DTYPES, lambda: f"{name} dtype must be fp32/fp16/bf16, got {t.dtype}")
    # Fake and meta tensors (export, compile tracing) carry no data; real CPU ones need the interpreter.
    if t.device.type == "cpu" and not interpreting() and not _is_fake(t):
        raise ValueError(
            f"{name} is on the CPU: the Triton kernels need a CUDA device, or TRITON_INTERPRET=1 set before "
            "egovlp_deploy.kernels is imported (the slow CPU interpreter, for tests)"
        )


def launch_skipped(*tensors: torch.Tensor) -> bool:
    """Under the interpreter a traced (fake) call would hand fake tensors to the CPU interpreter, which reads their
    data; shape propagation only needs the output allocation, so the launch is skipped. On the GPU the launch is
    always traced, so torch.compile sees the kernel."""
    return interpreting() and any(_is_fake(t) or t.device.type == "meta" for t in tensors)


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


# -- output allocation -------------------------------------------------------------------------------------------
# Tests switch this on so every output starts as NaN: an element the kernel forgot to write fails the comparison
# (with torch.empty a stale buffer could hold the right answer by chance).
_POISON = {"on": False}


@contextlib.contextmanager
def poisoned_outputs():
    """Within this block the ops allocate their outputs NaN-filled instead of uninitialised."""
    previous = _POISON["on"]
    _POISON["on"] = True
    try:
        yield
    finally:
        _POISON["on"] = previous


def new_output(shape, like: torch.Tensor) -> torch.Tensor:
    if _POISON["on"]:
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)
    return torch.empty(shape, dtype=like.dtype, device=like.device)


# -- dot products --------------------------------------------------------------------------------------------------
def dot_flags(dtype: torch.dtype) -> dict:
    """Constexprs for `dot`: the interpreter's tl.dot is wrong on bf16 (TOOLCHAIN.md), so it computes every dot on
    fp32 copies of the operands (rounded to the input dtype first, as the GPU sees them); on the GPU fp32 inputs use
    IEEE fp32 dots, because TF32's ~3e-4 error would break the 1e-5 fp32 contract."""
    return {"UPCAST": interpreting(), "PRECISION": "ieee" if dtype == torch.float32 else "tf32"}


@triton.jit
def dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b with fp32 accumulation."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def online_softmax_step(s, v, m_i, l_i, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One key/value tile of the streaming softmax. s (BM, BN) scores, -inf where masked; v (BN, D). Returns the
    running row max, denominator and unnormalised output (BM, D); exp(-inf) = 0 on the first tile."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, UPCAST, PRECISION)
    return m_new, l_i, acc


def autotuning() -> bool:
    """Autotune on the GPU unless EGOVLP_TRITON_AUTOTUNE=0 (quick GPU test runs); never in the interpreter, which
    has no GPU timer (TOOLCHAIN.md)."""
    return not interpreting() and os.environ.get("EGOVLP_TRITON_AUTOTUNE", "1") != "0"


def tuned(kernel, configs: list[triton.Config], key: list[str]):
    """`triton.autotune` when autotuning; otherwise the plain kernel, and the launcher passes a fixed config."""
    if not autotuning():
        return kernel
    return triton.autotune(configs=configs, key=key)(kernel)


def fixed_launch(config: dict) -> dict:
    """Launch arguments for a fixed (non-autotuned) config; on the GPU with the usual 4 warps."""
    return dict(config) if interpreting() else {**config, "num_warps": 4, "num_stages": 2}
