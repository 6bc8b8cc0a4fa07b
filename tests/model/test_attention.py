"""Divided attention against an independent, per-query implementation of the official token sets."""

import pytest
import torch

from egovlp_deploy.model.attention import divided_attention, extended_attention_mask, merge_heads, split_heads


def naive_divided_attention(q, k, v, F, mode):
    """Loop over every query and list its keys explicitly: CLS sees all; a patch sees CLS + its time/space group."""
    B, h, T, d = q.shape
    N = (T - 1) // F
    out = torch.empty_like(q)
    for t in range(T):
        if t == 0:
            keys = list(range(T))
        else:
            f, n = divmod(t - 1, N)
            group = [1 + g * N + n for g in range(F)] if mode == "time" else [1 + f * N + m for m in range(N)]
            keys = [0] + group
        kk, vv = k[:, :, keys], v[:, :, keys]
        w = torch.softmax(torch.einsum("bhd,bhkd->bhk", q[:, :, t], kk), dim=-1)
        out[:, :, t] = torch.einsum("bhk,bhkd->bhd", w, vv)
    return out


@pytest.mark.parametrize("mode", ["time", "space"])
@pytest.mark.parametrize("F,N", [(4, 4), (3, 5), (1, 9)])  # includes an odd shape and a single frame
def test_divided_attention_matches_naive(mode, F, N):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 1 + F * N, 8, generator=g, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(divided_attention(q, k, v, F, mode), naive_divided_attention(q, k, v, F, mode))


def test_time_and_space_differ():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 1 + 3 * 4, 8, generator=g) for _ in range(3))
    assert not torch.allclose(divided_attention(q, k, v, 3, "time"), divided_attention(q, k, v, 3, "space"))


def test_unknown_mode_is_an_error():
    q = torch.zeros(1, 1, 5, 4)
    with pytest.raises(ValueError, match="mode"):
        divided_attention(q, q, q, 2, "spacetime")


def test_head_split_is_h_major_like_einops():
    x = torch.arange(2 * 3 * 12, dtype=torch.float32).reshape(2, 3, 12)
    heads = split_heads(x, 4)  # 'b n (h d) -> b h n d'
    assert heads.shape == (2, 4, 3, 3)
    torch.testing.assert_close(heads[1, 2, 0], x[1, 0, 6:9])
    torch.testing.assert_close(merge_heads(heads), x)


def test_extended_mask_matches_hf_definition():
    mask = torch.tensor([[1, 1, 0]])
    bias = extended_attention_mask(mask, torch.float32)
    assert bias.shape == (1, 1, 1, 3)
    assert bias[0, 0, 0, 0] == 0 and bias[0, 0, 0, 2] == torch.finfo(torch.float32).min
