"""Fused cross-attention (both gated cross-attention branches) vs its plain-torch reference."""

import pytest
import torch

from egovlp_deploy.kernels import gated_cross_attention as gca
from egovlp_deploy.kernels._triton_common import autotuning, poisoned_outputs

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}
NEG = torch.finfo(torch.float32).min  # the HF extended mask value


def rel_err(out, ref):
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def inputs(B, H, D, Lq, Lk, dtype, mask=None, seed=0):
    """q (B, Lq, HD); k, v the two halves of one (B, Lk, 2HD) Linear output (strided views); additive bias."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, H * D, generator=g).to(DEVICE, dtype)
    k, v = torch.randn(B, Lk, 2 * H * D, generator=g).to(DEVICE, dtype).chunk(2, dim=-1)
    bias = None
    if mask is not None:
        m = torch.ones(B, Lk)
        if mask == "one":  # a single valid token per row
            m[:, 1:] = 0
        else:  # the last sentence padded
            m[-1, max(1, Lk // 2) :] = 0
        bias = ((1 - m) * NEG).to(DEVICE)
    return q, k, v, bias


def check(q, k, v, bias, H, dtype):
    D = q.shape[-1] // H
    with poisoned_outputs():
        out = gca.cross_attention(q, k, v, H, bias=bias)
    assert out.shape == q.shape and out.dtype == dtype
    assert not torch.isnan(out).any(), "unwritten (NaN-poisoned) output elements"
    ref = gca.cross_attention_ref(q.float(), k.float(), v.float(), H, D**-0.5, bias)
    err = rel_err(out, ref)
    assert err <= TOLERANCE[dtype], f"max rel err {err:.2e} > {TOLERANCE[dtype]:.0e}"


# (B, H, D, Lq, Lk, mask): video side (many queries, few masked text keys), text side (few queries, many unmasked
# video keys), L = 1, a single valid key, head dim below the dot tile
CASES = [
    (2, 3, 16, 37, 7, "pad"),
    (2, 2, 16, 70, 15, "one"),
    (1, 2, 16, 5, 133, None),
    (2, 2, 64, 1, 1, "pad"),
    (1, 2, 8, 3, 20, None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,H,D,Lq,Lk,mask", CASES)
def test_matches_reference(B, H, D, Lq, Lk, mask, dtype):
    q, k, v, bias = inputs(B, H, D, Lq, Lk, dtype, mask)
    check(q, k, v, bias, H, dtype)


def test_non_contiguous_query_and_bias():
    q, k, v, _ = inputs(2, 2, 16, 12, 9, torch.float32, seed=2)
    q = torch.randn(12, 2, 2 * 16).to(DEVICE).transpose(0, 1)  # token-major storage
    m = torch.ones(2, 1, 1, 9)
    m[1, ..., 4:] = 0
    bias = ((1 - m) * NEG).to(DEVICE)[:, 0, 0, :]  # a strided view of the (B, 1, 1, L) extended mask
    check(q, k, v, bias, 2, torch.float32)


def test_all_keys_masked_matches_the_official_uniform_average():
    q, k, v, _ = inputs(1, 2, 16, 4, 5, torch.float32)
    check(q, k, v, torch.full((1, 5), NEG, device=DEVICE), 2, torch.float32)


@pytest.mark.skipif(autotuning(), reason="autotuning picks the tiles (EGOVLP_TRITON_AUTOTUNE=0 pins them)")
def test_several_key_tiles(monkeypatch):
    monkeypatch.setattr(gca, "FIXED_CONFIG", lambda lq, lk: {"BLOCK_M": 16, "BLOCK_N": 16})
    q, k, v, bias = inputs(2, 2, 16, 20, 45, torch.float32, "pad", seed=4)
    check(q, k, v, bias, 2, torch.float32)


def test_gated_residual_is_h_plus_alpha_y():
    h, y, alpha = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.tensor([0.3])
    torch.testing.assert_close(gca.gated_residual(h, alpha, y), h + alpha * y)


def test_argument_errors():
    q, k, v, bias = inputs(2, 2, 16, 4, 5, torch.float32, "pad")
    with pytest.raises(RuntimeError, match="bias"):
        gca.cross_attention(q, k, v, 2, bias=bias[:, :3])
    with pytest.raises(RuntimeError, match="k .* and v"):
        gca.cross_attention(q, k[:, :, :-1], v, 2)
    with pytest.raises(RuntimeError, match="dtype"):
        gca.cross_attention(q, k.half(), v.half(), 2)


def test_backward_raises_instead_of_a_wrong_gradient():
    q, k, v, _ = inputs(1, 2, 16, 4, 5, torch.float32)
    out = gca.cross_attention(q.requires_grad_(), k, v, 2)
    with pytest.raises(RuntimeError, match="no backward"):
        out.sum().backward()


def test_opcheck_and_export():
    q, k, v, bias = inputs(1, 2, 16, 4, 5, torch.float32, "pad")
    torch.library.opcheck(
        torch.ops.egovlp.cross_attention.default,
        (q, k, v, bias, 2, 0.25),
        test_utils=("test_schema", "test_faketensor"),
    )

    class Cross(torch.nn.Module):
        def forward(self, q, kv, bias):
            k, v = kv.chunk(2, dim=-1)
            return gca.cross_attention(q, k, v, 2, bias=bias)

    kv = torch.cat((k, v), dim=-1)
    ep = torch.export.export(Cross(), (q, kv, bias))
    assert any(str(n.target) == "egovlp.cross_attention.default" for n in ep.graph.nodes)
    with poisoned_outputs():
        torch.testing.assert_close(ep.module()(q, kv, bias), Cross()(q, kv, bias))


gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the interpreter's bf16 tl.dot is wrong)")


@gpu
@pytest.mark.parametrize("Lq,Lk,mask", [(3137, 15, "pad"), (30, 3137, None)])
def test_bf16(Lq, Lk, mask):
    q, k, v, bias = inputs(2, 12, 64, Lq, Lk, torch.bfloat16, mask, seed=6)
    with poisoned_outputs():
        out = gca.cross_attention(q, k, v, 12, bias=bias)
    ref32 = gca.cross_attention_ref(q.float(), k.float(), v.float(), 12, 0.125, bias)
    torch_bf16 = gca.cross_attention_ref(q, k, v, 12, 0.125, None if bias is None else bias.bfloat16())
    assert not torch.isnan(out).any()
    assert rel_err(out, ref32) <= max(2 * rel_err(torch_bf16, ref32), 1e-2)


@gpu
def test_grid_beyond_65535():
    q, k, v, bias = inputs(400, 12, 64, 1 + 4 * 196, 15, torch.float16, "pad", seed=7)  # 400*12*13 tiles > 65,535
    check(q, k, v, bias, 12, torch.float16)


# -- split keys (flash-decoding): forced split counts, partial results merged by log-sum-exp -----------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("splits", [1, 2, 3, 7])
@pytest.mark.parametrize(
    "B,H,D,Lq,Lk,mask",
    [(1, 2, 16, 5, 133, None), (2, 2, 16, 3, 61, "pad"), (2, 2, 64, 1, 37, "one"), (1, 2, 8, 17, 50, None)],
)
def test_split_keys_match_reference(monkeypatch, B, H, D, Lq, Lk, mask, splits, dtype):
    """Odd split counts, a last split shorter than the others and than a key tile, a masked tail, a single valid key
    (every other split sees only masked keys), several query tiles, one split (the unsplit path)."""
    monkeypatch.setattr(gca, "KEY_SPLITS", lambda programs, keys: splits)
    q, k, v, bias = inputs(B, H, D, Lq, Lk, dtype, mask, seed=splits)
    check(q, k, v, bias, H, dtype)


def test_split_keys_with_every_key_masked(monkeypatch):
    monkeypatch.setattr(gca, "KEY_SPLITS", lambda programs, keys: 3)
    q, k, v, _ = inputs(1, 2, 16, 4, 40, torch.float32)
    check(q, k, v, torch.full((1, 40), NEG, device=DEVICE), 2, torch.float32)


def test_text_side_splits_by_default():
    """The text side at batch 1 (few query tiles, thousands of keys) is split without being told to."""
    from egovlp_deploy.kernels._triton_common import split_count, split_plan

    splits, per_split = split_plan(3137, split_count(1 * 12 * 1, 3137))
    assert splits > 1 and (splits - 1) * per_split < 3137 <= splits * per_split
    assert split_count(12 * 200, 3137) == 1  # the video side: enough programs already
    q, k, v, _ = inputs(1, 2, 16, 3, 300, torch.float32, seed=9)
    assert split_count(2, 300) == 2
    check(q, k, v, None, 2, torch.float32)


_DYNAMIC_EXPORT = """
import torch
from egovlp_deploy.kernels import divided_attention as da, gated_cross_attention as gca
from egovlp_deploy.kernels._triton_common import autotuning
assert autotuning()  # the GPU's launch path (the interpreter returns before planning splits)

class Both(torch.nn.Module):
    def forward(self, video_q, text_kv, bias, text_q, video_kv, qkv):
        video_side = gca.cross_attention(video_q, *text_kv.chunk(2, dim=-1), 2, bias=bias)
        text_side = gca.cross_attention(text_q, *video_kv.chunk(2, dim=-1), 2)
        return video_side, text_side, da.divided_attention(qkv, 2, 4, "space")

B, L = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("text_len", min=1, max=64)
args = (torch.randn(2, 37, 32), torch.randn(2, 7, 64), torch.zeros(2, 7), torch.randn(2, 7, 32),
        torch.randn(2, 301, 64), torch.randn(2, 1 + 4 * 75, 96))
shapes = ({0: B}, {0: B, 1: L}, {0: B, 1: L}, {0: B, 1: L}, {0: B}, {0: B})
ep = torch.export.export(Both(), args, dynamic_shapes=shapes, strict=False)
print("ops", sum("egovlp" in str(n.target) for n in ep.graph.nodes))
"""


def test_dynamic_shape_export_plans_no_splits_on_symbolic_sizes():
    """With a symbolic batch and text length, the ops trace without a guard on them (one split is chosen without
    comparing symbolic sizes). Runs the GPU's launch path, i.e. without the interpreter, in a fresh process."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "EGOVLP_TRITON_AUTOTUNE")}
    out = subprocess.run([sys.executable, "-c", _DYNAMIC_EXPORT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "ops 3"


def test_split_keys_with_minus_infinity_bias(monkeypatch):
    """An -inf bias (the op accepts any float mask) over whole splits: those splits are empty states, not NaN."""
    monkeypatch.setattr(gca, "KEY_SPLITS", lambda programs, keys: 4)
    q, k, v, _ = inputs(2, 2, 16, 5, 80, torch.float32, seed=8)
    bias = torch.zeros(2, 80, device=DEVICE)
    bias[:, 30:] = float("-inf")  # splits 2-4 (keys 20-79) are masked from key 30 on, the last two entirely
    check(q, k, v, bias, 2, torch.float32)


@pytest.mark.parametrize("splits", [1, 2])
def test_minus_infinity_bias_over_a_whole_leading_key_tile(monkeypatch, splits):
    """An -inf bias over the first 64-key tile of a program (left padding, one split or the start of each of two)
    with valid keys after it: the tile's exp(-inf - -inf) must not turn the whole row NaN."""
    monkeypatch.setattr(gca, "KEY_SPLITS", lambda programs, keys: splits)
    q, k, v, _ = inputs(2, 2, 16, 5, 300, torch.float32, seed=10)
    bias = torch.zeros(2, 300, device=DEVICE)
    bias[:, :70] = float("-inf")  # keys 0-69: the whole first tile of split 0
    bias[:, 150:220] = float("-inf")  # keys 150-219: the whole first tile of split 1 when there are two
    bias[1, 70:] = torch.finfo(torch.float32).min  # row 1: finite HF padding after it, every key masked one way
    check(q, k, v, bias, 2, torch.float32)


def test_empty_batch_and_empty_query_set():
    """B = 0 or Lq = 0 over enough keys to be split: an empty result, no division by the zero program count."""
    for B, Lq in [(0, 3), (1, 0)]:
        q = torch.randn(B, Lq, 32, device=DEVICE)
        k, v = torch.randn(B, 300, 64, device=DEVICE).chunk(2, dim=-1)
        out = gca.cross_attention(q, k, v, 2, bias=torch.zeros(B, 300, device=DEVICE))
        assert out.shape == (B, Lq, 32)


def test_operands_on_another_device_and_bad_head_counts_raise():
    q, k, v, bias = inputs(1, 2, 16, 4, 5, torch.float32, "pad")
    with pytest.raises(RuntimeError, match="k is on meta but q is on"):
        gca.cross_attention(q, k.to("meta"), v, 2, bias=bias)
    with pytest.raises(RuntimeError, match="bias is on meta but q is on"):
        gca.cross_attention(q, k, v, 2, bias=bias.to("meta"))
    for heads in (0, 64):  # no head, and more heads than channels (head dim 0): the op's message, not 0 ** -0.5
        with pytest.raises(RuntimeError, match=f"not divisible by heads={heads}"):
            gca.cross_attention(q, k, v, heads)
