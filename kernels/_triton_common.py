"""What the Triton attention ops share: where they may run, how dots are done, output allocation, autotuning.

Kept apart from the op files so each op file reads as math -> kernel -> launcher -> op registration.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

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


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Every tensor argument of one launch on one device: the kernel dereferences each pointer on the device of the
    first, so a CPU or other-GPU operand would be an illegal access or a cryptic launcher error."""
    named = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        torch._check(
            t.device == first.device,
            lambda: f"{name} is on {t.device} but {first_name} is on {first.device}: all operands need one device",
        )


def nothing_to_compute(*sizes) -> bool:
    """True when a size is a concrete 0 (an empty batch or query set): the op returns its empty output without a
    launch, so no zero-program grid reaches the autotuner (which would time nothing and cache a config for the
    real shapes that share its key). A symbolic size (dynamic-shape export) is never compared: no shape guard."""
    return all(isinstance(n, int) for n in sizes) and any(n == 0 for n in sizes)


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
    """Constexprs for `dot`: the interpreter's tl.dot is wrong on bf16 (Triton 3.x on CPU), so it computes every dot on
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
    running row max, denominator and unnormalised output (BM, D); exp(-inf) = 0 on the first tile.
    A row whose every score so far is -inf (an -inf bias over a whole key tile, e.g. left padding) subtracts 0
    instead of its -inf max: exp(-inf - -inf) would be NaN and poison the row's later tiles, while exp(-inf - 0)
    keeps it the empty state (l = 0, acc = 0) that the first finite score replaces."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_sub)
    p = tl.exp(s - m_sub[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, UPCAST, PRECISION)
    return m_new, l_i, acc


def autotuning() -> bool:
    """Autotune on the GPU unless EGOVLP_TRITON_AUTOTUNE=0 (quick GPU test runs); never in the interpreter, which
    has no GPU timer."""
    return not interpreting() and os.environ.get("EGOVLP_TRITON_AUTOTUNE", "1") != "0"


def tuned(kernel, configs: list[triton.Config], key: list[str]):
    """`triton.autotune` when autotuning; otherwise the plain kernel, and the launcher passes a fixed config."""
    if not autotuning():
        return kernel
    return triton.autotune(configs=configs, key=key)(kernel)


def fixed_launch(config: dict) -> dict:
    """Launch arguments for a fixed (non-autotuned) config; on the GPU with the usual 4 warps."""
    return dict(config) if interpreting() else {**config, "num_warps": 4, "num_stages": 2}


# -- split keys (flash-decoding) ----------------------------------------------------------------------------------
# A side with few query rows (the clip CLS over all 1 + F*N tokens, the text queries over 3,137 video tokens) gives
# few programs, each walking every key in series: the GPU is mostly idle. Its keys are split over several programs
# instead; each writes its partial softmax state (row max, denominator, unnormalised output, fp32) to a workspace,
# and `combine_splits` merges them by log-sum-exp. Keys per program stay above SPLIT_MIN_KEYS so each still streams
# whole tiles; the number of programs aims at SPLIT_TARGET_PROGRAMS (two waves on an H100's 132 SMs).
SPLIT_TARGET_PROGRAMS = 264
SPLIT_MIN_KEYS = 128
MAX_SPLITS = 64


def split_count(programs, keys) -> int:
    """How many key splits for `programs` unsplit programs over `keys` keys each. A symbolic size (dynamic-shape
    export, `torch.compile(dynamic=True)`) keeps one split: choosing by it would put a guard on the shape."""
    if not (isinstance(programs, int) and isinstance(keys, int)):
        return 1
    if programs < 1 or programs >= SPLIT_TARGET_PROGRAMS or keys < 2 * SPLIT_MIN_KEYS:  # < 1: an empty batch
        return 1
    return max(1, min(triton.cdiv(SPLIT_TARGET_PROGRAMS, programs), keys // SPLIT_MIN_KEYS, MAX_SPLITS))


def split_plan(keys, splits: int) -> tuple[int, int]:
    """(splits, keys per split) with no empty split: `splits` is lowered where an even share leaves one empty.
    One split is (1, keys) without arithmetic on `keys`, which may be symbolic."""
    if splits <= 1:
        return 1, keys
    per_split = triton.cdiv(keys, min(int(splits), keys))
    return triton.cdiv(keys, per_split), per_split


def split_workspace(rows: int, splits: int, block_d: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partial row max, denominator (rows*splits,) and output (rows*splits, block_d), fp32, indexed
    [(bh * splits + split) * R + r]: `rows` = B*H*R."""
    n = rows * splits
    fill = torch.full if _POISON["on"] else (lambda shape, value, **kw: torch.empty(shape, **kw))  # NaN: see _POISON
    return tuple(fill(shape, float("nan"), dtype=torch.float32, device=device) for shape in ((n,), (n,), (n, block_d)))


@triton.jit
def store_split(m_ws, l_ws, acc_ws, slot, rmask, m_i, l_i, acc, BLOCK_D: tl.constexpr):
    """Write one program's partial state: slot (BM,) int64 workspace rows. A row whose keys in this split all
    scored -inf (an -inf bias) is stored as the empty state (l = 0, acc = 0), so the merge gives it weight 0
    instead of NaN (`online_softmax_step` already keeps such a row empty; the guard holds for any key loop)."""
    empty = m_i == float("-inf")
    l_i = tl.where(empty, 0.0, l_i)
    acc = tl.where(empty[:, None], 0.0, acc)
    tl.store(m_ws + slot, m_i, mask=rmask)
    tl.store(l_ws + slot, l_i, mask=rmask)
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(acc_ws + slot[:, None] * BLOCK_D + offs_d[None, :], acc, mask=rmask[:, None])


@triton.jit
def _combine_splits_kernel(
    m_ws,
    l_ws,
    acc_ws,
    out_ptr,
    H,
    R,
    splits,
    row0,
    stride_ob,
    stride_or,
    stride_oc,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """out[b, row0 + r, h*D:(h+1)*D] = merge over the splits of (m, l, acc) for (b, h, r)."""
    pid = tl.program_id(0).to(tl.int64)
    r_tiles = tl.cdiv(R, BLOCK_R)
    rt = pid % r_tiles
    bh = pid // r_tiles
    b = bh // H
    h = bh % H
    rows = rt * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    offs_d = tl.arange(0, BLOCK_D)
    m_run = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l_run = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    for s in range(0, splits):
        slot = (bh * splits + s) * R + rows
        m = tl.load(m_ws + slot, mask=rmask, other=float("-inf"))
        den = tl.load(l_ws + slot, mask=rmask, other=0.0)
        a = tl.load(acc_ws + slot[:, None] * BLOCK_D + offs_d[None, :], mask=rmask[:, None], other=0.0)
        m_new = tl.maximum(m_run, m)
        # a row whose every score so far is -inf keeps weight 0 (exp(-inf - -inf) would be NaN)
        alpha = tl.where(m_new == float("-inf"), 0.0, tl.exp(m_run - m_new))
        beta = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))
        l_run = l_run * alpha + den * beta
        acc = acc * alpha[:, None] + a * beta[:, None]
        m_run = m_new
    out = acc / l_run[:, None]
    dmask = offs_d < HEAD_DIM
    dst = out_ptr + b * stride_ob + (row0 + rows[:, None]) * stride_or + ((h * HEAD_DIM + offs_d) * stride_oc)[None, :]
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


COMBINE_BLOCK_R = 16


def combine_splits(
    workspace,
    out: torch.Tensor,
    batch: int,
    heads: int,
    rows: int,
    splits: int,
    head_dim: int,
    block_d: int,
    row0: int = 0,
) -> None:
    """Merge the partial states into out[:, row0:row0 + rows] (out: (B, T, H*D), any strides)."""
    m_ws, l_ws, acc_ws = workspace
    grid = (batch * heads * triton.cdiv(rows, COMBINE_BLOCK_R),)
    wrap_triton(_combine_splits_kernel)[grid](
        m_ws,
        l_ws,
        acc_ws,
        out,
        heads,
        rows,
        splits,
        row0,
        *out.stride(),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_R=COMBINE_BLOCK_R,
    )
