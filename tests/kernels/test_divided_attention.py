"""Fused divided space-time attention vs its plain-torch reference (CPU: Triton interpreter; GPU: compiled)."""

import pytest
import torch

from egovlp_deploy.kernels import divided_attention as da
from egovlp_deploy.kernels._triton_common import autotuning, poisoned_outputs

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# dtype -> max relative error (max |out - ref| / max |ref|) against the fp32 reference on the same rounded inputs
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}

# (B, H, D, F, N): F = 1; N not a multiple of any block; head dim below the 16-wide dot tile; 16 frames (full pack)
SHAPES = [(2, 3, 16, 4, 5), (1, 2, 16, 1, 9), (2, 2, 16, 3, 70), (1, 2, 64, 16, 7), (1, 1, 8, 5, 3)]


def rel_err(out, ref):
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def qkv_input(B, H, D, F, N, dtype, layout="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)
    S, C = 1 + F * N, 3 * H * D

    def rnd(*shape):  # moved to the device BEFORE the view is taken: `.to(device)` of a view copies it densely
        return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)

    if layout == "contiguous":
        return rnd(B, S, C)
    if layout == "sliced":  # a column window of a wider buffer: row stride > C
        return rnd(B, S, C + 24)[:, :, 8 : 8 + C]
    return rnd(S, B, C).transpose(0, 1)  # "transposed": token-major storage (S, B, C) seen as (B, S, C)


def check(qkv, H, F, mode, dtype):
    D = qkv.shape[-1] // (3 * H)
    with poisoned_outputs():
        out = da.divided_attention(qkv, H, F, mode)
    assert out.shape == (qkv.shape[0], qkv.shape[1], H * D) and out.dtype == dtype
    assert not torch.isnan(out).any(), "unwritten (NaN-poisoned) output elements"
    ref = da.divided_attention_ref(qkv.float(), H, F, mode, D**-0.5)
    err = rel_err(out, ref)
    assert err <= TOLERANCE[dtype], f"max rel err {err:.2e} > {TOLERANCE[dtype]:.0e}"
    return err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", ["time", "space"])
@pytest.mark.parametrize("B,H,D,F,N", SHAPES)
def test_matches_reference(B, H, D, F, N, mode, dtype):
    check(qkv_input(B, H, D, F, N, dtype), H, F, mode, dtype)


@pytest.mark.parametrize("layout", ["sliced", "transposed"])
@pytest.mark.parametrize("mode", ["time", "space"])
def test_non_contiguous_input(layout, mode):
    qkv = qkv_input(2, 2, 16, 3, 6, torch.float32, layout)
    assert not qkv.is_contiguous()
    check(qkv, 2, 3, mode, torch.float32)


def test_fp16_error_at_most_twice_torch_fp16():
    """flash-attention's rule: the kernel's fp16 error vs fp32 is at most 2x that of the torch math in fp16."""
    qkv = qkv_input(1, 2, 64, 4, 30, torch.float16, seed=3)
    ref32 = da.divided_attention_ref(qkv.float(), 2, 4, "space", 0.125)
    torch16 = da.divided_attention_ref(qkv, 2, 4, "space", 0.125)
    with poisoned_outputs():
        out = da.divided_attention(qkv, 2, 4, "space")
    assert rel_err(out, ref32) <= 2 * rel_err(torch16, ref32) + 1e-4


@pytest.mark.skipif(autotuning(), reason="autotuning picks the tiles (EGOVLP_TRITON_AUTOTUNE=0 pins them)")
@pytest.mark.parametrize(
    "mode,F,N,blocks",
    [("space", 3, 70, (16, 16)), ("time", 4, 9, (32, 32)), ("time", 3, 11, (16, 16)), ("space", 2, 40, (32, 16))],
)
def test_other_tile_sizes(monkeypatch, mode, F, N, blocks):
    """Several query tiles and key tiles per group (flash loop), and 8 time groups packed into one tile."""
    monkeypatch.setattr(da, "FIXED_CONFIG", lambda size: {"BLOCK_M": blocks[0], "BLOCK_N": blocks[1]})
    check(qkv_input(2, 2, 16, F, N, torch.float32, seed=5), 2, F, mode, torch.float32)


def test_argument_errors():
    qkv = qkv_input(1, 2, 16, 2, 3, torch.float32)
    with pytest.raises(ValueError, match="mode"):
        da.divided_attention(qkv, 2, 2, "spacetime")
    with pytest.raises(RuntimeError, match="3 \\* heads"):
        da.divided_attention(qkv[..., :-1], 2, 2, "time")
    with pytest.raises(RuntimeError, match="num_frames"):
        da.divided_attention(qkv, 2, 4, "time")  # 7 tokens is not 1 + 4 N


def test_backward_raises_instead_of_a_wrong_gradient():
    qkv = qkv_input(1, 2, 16, 2, 3, torch.float32).requires_grad_()
    out = da.divided_attention(qkv, 2, 2, "time")
    with pytest.raises(RuntimeError, match="no backward"):
        out.sum().backward()


def test_fake_tensor_shapes_and_export():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.empty(3, 1 + 4 * 5, 3 * 2 * 16, dtype=torch.float16, device=DEVICE)
        out = da.divided_attention(fake, 2, 4, "space")
        assert out.shape == (3, 21, 32) and out.dtype == torch.float16

    class Block(torch.nn.Module):
        def forward(self, qkv):
            return da.divided_attention(qkv, 2, 4, "time") * 2

    qkv = qkv_input(2, 2, 16, 4, 5, torch.float32)
    ep = torch.export.export(Block(), (qkv,))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert "egovlp.divided_attention.default" in targets  # kept as one custom op node
    with poisoned_outputs():
        torch.testing.assert_close(ep.module()(qkv), Block()(qkv))


def test_opcheck():
    qkv = qkv_input(1, 2, 16, 2, 3, torch.float32)
    torch.library.opcheck(
        torch.ops.egovlp.divided_attention.default,
        (qkv, 2, 2, "space", 0.25),
        test_utils=("test_schema", "test_faketensor"),
    )


# -- GPU only ----------------------------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(
    not CUDA, reason="needs a CUDA GPU (the interpreter's bf16 tl.dot is wrong, and large grids take minutes there)"
)


@gpu
@pytest.mark.parametrize("mode", ["time", "space"])
def test_bf16(mode):
    qkv = qkv_input(2, 12, 64, 4, 196, torch.bfloat16, seed=7)
    with poisoned_outputs():
        out = da.divided_attention(qkv, 12, 4, mode)
    ref32 = da.divided_attention_ref(qkv.float(), 12, 4, mode, 0.125)
    torch_bf16 = da.divided_attention_ref(qkv, 12, 4, mode, 0.125)
    assert not torch.isnan(out).any()
    assert rel_err(out, ref32) <= max(2 * rel_err(torch_bf16, ref32), 1e-2)


@gpu
@pytest.mark.parametrize("mode", ["time", "space"])
def test_grid_beyond_65535(mode):
    """B*N*H = 32*196*12 = 75,264 > 65,535: the batch SDPA and xformers reject (pytorch #146704)."""
    qkv = qkv_input(32, 12, 64, 4, 196, torch.float16, seed=8)
    check(qkv, 12, 4, mode, torch.float16)


@gpu
def test_torch_compile():
    qkv = qkv_input(2, 12, 64, 4, 196, torch.float16, seed=9)
    compiled = torch.compile(lambda x: da.divided_attention(x, 12, 4, "time") + 1, fullgraph=True)
    torch.testing.assert_close(compiled(qkv), da.divided_attention(qkv, 12, 4, "time") + 1)


# -- split CLS keys (flash-decoding): the CLS row's keys over several programs, merged by log-sum-exp ----------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("splits", [1, 2, 5, 9])
@pytest.mark.parametrize("mode", ["time", "space"])
def test_split_cls_matches_reference(monkeypatch, mode, splits, dtype):
    """S = 1 + 3*70 = 211 keys: odd split counts, a last split shorter than the rest, one split (the unsplit path)."""
    monkeypatch.setattr(da, "CLS_SPLITS", lambda programs, keys: splits)
    check(qkv_input(2, 2, 16, 3, 70, dtype, seed=splits), 2, 3, mode, dtype)


def test_split_cls_more_splits_than_keys(monkeypatch):
    monkeypatch.setattr(da, "CLS_SPLITS", lambda programs, keys: 64)
    check(qkv_input(1, 2, 16, 2, 3, torch.float32), 2, 2, "space", torch.float32)  # S = 7: 7 splits of one key


def test_split_plan_leaves_no_split_empty():
    from egovlp_deploy.kernels._triton_common import split_plan

    assert split_plan(9, 4) == (3, 3)  # 3 + 3 + 3: a fourth split of 3 would start past the end
    assert split_plan(10, 4) == (4, 3)  # 3 + 3 + 3 + 1
    assert split_plan(7, 64) == (7, 1)
    assert split_plan(3137, 1) == (1, 3137)
    for keys in range(1, 60):
        for want in range(1, 12):
            splits, per = split_plan(keys, want)
            assert 1 <= splits <= want and (splits - 1) * per < keys <= splits * per


def test_empty_batch():
    """B = 0 with S = 257 keys, enough for the CLS row to be split: an empty result, not a division by zero."""
    out = da.divided_attention(qkv_input(0, 2, 16, 4, 64, torch.float32), 2, 4, "space")
    assert out.shape == (0, 257, 32)


def test_bad_head_count_raises_the_ops_message():
    qkv = qkv_input(1, 2, 16, 2, 3, torch.float32)
    for heads in (0, 64):  # no head; more heads than channels (head dim 0)
        with pytest.raises(RuntimeError, match=f"3 \\* heads \\* head_dim for heads={heads}"):
            da.divided_attention(qkv, heads, 2, "time")
