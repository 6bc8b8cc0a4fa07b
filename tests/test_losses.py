"""Losses against hand-computed cases, independent loop/closed-form references and the official sampling rules.

Bit-level parity with the official `EgoNCE`, `NormSoftmaxLoss`, `sim_matrix` and the 'ITM' block of
`FrozenInTime.forward` was checked in a scratch harness that runs the official code (not part of this suite).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from egovlp_deploy.losses import (
    LOSS_WEIGHTS,
    egonce_loss,
    mlm_loss,
    sample_vtm_pairs,
    sim_matrix,
    total_loss,
    vtm_loss,
)

FLAGS = [(True, True), (True, False), (False, True), (False, False)]


# --------------------------------------------------------------------------------------------------- sim_matrix


def test_sim_matrix_is_cosine_and_zero_rows_give_zero():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g), torch.randn(3, 7, generator=g)
    a[2] = 0  # e.g. a clip without verb tags: the max(norm, eps) rule gives 0, not NaN
    sim = sim_matrix(a, b)
    expected = torch.tensor(
        [[0.0 if i == 2 else float(a[i] @ b[j] / (a[i].norm() * b[j].norm())) for j in range(3)] for i in range(5)]
    )
    torch.testing.assert_close(sim, expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="sim_matrix"):
        sim_matrix(a, torch.randn(3, 6))


# --------------------------------------------------------------------------------------------------- EgoNCE


def _egonce_loop_reference(x: torch.Tensor, positives: torch.Tensor, temperature: float) -> float:
    """The EgoNCE definition with scalar math: -mean_i log sum_{j in P(i)} p_ij, both directions, same mask."""
    n = x.shape[0]
    total = 0.0
    for sims in (x, x.t()):
        for i in range(n):
            row = [math.exp(float(sims[i, j]) / temperature) for j in range(n)]
            total -= math.log(sum(r for r, p in zip(row, positives[i]) if p) / sum(row)) / n
    return total


def _two_by_two_diagonal_loss(x: list[list[float]], t: float) -> float:
    """Hand-derived 2x2 InfoNCE: each row/column term is log(1 + exp((other - own) / T))."""
    (a, b), (c, d) = x
    terms = [(b - a), (c - d), (c - a), (b - d)]  # text rows 0, 1; video rows 0, 1
    return sum(math.log1p(math.exp(u / t)) for u in terms) / 2


def test_egonce_two_by_two_by_hand_for_every_flag_combination():
    x = torch.tensor([[0.9, 0.1], [0.3, 0.5]])
    verbs = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # the two clips share a verb ...
    nouns = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # ... but no noun
    mask_v, mask_n = sim_matrix(verbs, verbs), sim_matrix(nouns, nouns)
    diagonal = _two_by_two_diagonal_loss(x.tolist(), 0.05)
    expected = {  # (noun, verb) -> loss; "verb only" makes every pair positive, so log(sum p) = log 1 = 0
        (True, True): diagonal,
        (True, False): diagonal,
        (False, True): 0.0,
        (False, False): diagonal,
    }
    for (noun, verb), want in expected.items():
        loss, mask_bool, temperature = egonce_loss(x, mask_v, mask_n, 0.05, noun=noun, verb=verb)
        assert temperature == 0.05
        assert mask_bool.dtype == torch.bool
        assert mask_bool.all() == (not noun and verb)
        assert math.isclose(float(loss), want, rel_tol=1e-6, abs_tol=1e-6), (noun, verb)


@pytest.mark.parametrize("n", [1, 3, 6])
@pytest.mark.parametrize("noun, verb", FLAGS)
def test_egonce_matches_loop_reference(n, noun, verb):
    g = torch.Generator().manual_seed(10 * n + 2 * noun + verb)
    x = torch.rand(n, n, generator=g, dtype=torch.float64) * 2 - 1
    verbs = (torch.rand(n, 3, generator=g) < 0.5).double()
    nouns = (torch.rand(n, 4, generator=g) < 0.5).double()
    mask_v, mask_n = sim_matrix(verbs, verbs), sim_matrix(nouns, nouns)
    shares_verb, shares_noun = (verbs @ verbs.t()) > 0, (nouns @ nouns.t()) > 0
    selected = {(True, True): shares_verb & shares_noun, (True, False): shares_noun, (False, True): shares_verb}
    positives = selected.get((noun, verb), torch.zeros(n, n, dtype=torch.bool)) | torch.eye(n, dtype=torch.bool)
    loss, mask_bool, _ = egonce_loss(x, mask_v, mask_n, 0.1, noun=noun, verb=verb)
    assert torch.equal(mask_bool, positives)
    assert math.isclose(float(loss), _egonce_loop_reference(x, positives, 0.1), rel_tol=1e-10, abs_tol=1e-12)


def test_egonce_without_flags_or_shared_tags_is_infonce():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(8, 8, generator=g) * 2 - 1
    target = torch.arange(8)
    infonce = F.cross_entropy(x / 0.05, target) + F.cross_entropy(x.t() / 0.05, target)
    loss, _, _ = egonce_loss(x, torch.rand(8, 8, generator=g), torch.rand(8, 8, generator=g), noun=False, verb=False)
    torch.testing.assert_close(loss, infonce)
    no_shared = torch.zeros(8, 8)  # both flags on, but no two clips share a verb and a noun
    loss, _, _ = egonce_loss(x, no_shared, torch.ones(8, 8))
    torch.testing.assert_close(loss, infonce)


def test_egonce_gradient_and_extreme_logits():
    g = torch.Generator().manual_seed(4)
    mask = (torch.rand(4, 4, generator=g) < 0.4).double()
    x = (torch.rand(4, 4, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: egonce_loss(s, mask, mask.t(), 0.2)[0], (x,))
    # Every positive's softmax underflows in fp32 (logit gap 2/T = 200): log(sum(softmax * mask)) would be -inf;
    # the loss must stay finite and equal 2 * log(1 + 3 e^200) = 2 * (200 + log 3) up to rounding.
    extreme = torch.ones(4, 4) - 2 * torch.eye(4)
    loss, _, _ = egonce_loss(extreme, torch.zeros(4, 4), torch.zeros(4, 4), temperature=0.01)
    assert math.isclose(float(loss), 2 * (200 + math.log(3)), rel_tol=1e-6)


def test_egonce_follows_the_input_device_and_checks_shapes():
    x = torch.zeros(3, 3, device="meta")  # no hard-coded .cuda(): the mask is built where x lives
    loss, mask_bool, _ = egonce_loss(x, torch.ones(3, 3), torch.ones(3, 3))
    assert loss.device.type == "meta" and mask_bool.device.type == "meta"
    with pytest.raises(ValueError, match="square"):
        egonce_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="mask_v"):
        egonce_loss(torch.zeros(3, 3), torch.zeros(2, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="temperature"):
        egonce_loss(torch.zeros(3, 3), torch.zeros(3, 3), torch.zeros(3, 3), temperature=0.0)


# --------------------------------------------------------------------------------------------------- VTM sampling


def _random_case(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    x = sim_matrix(torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g))
    tags = (torch.rand(n, 3, generator=g) < 0.4).float()
    mask_bool = egonce_loss(x, sim_matrix(tags, tags), torch.ones(n, n), noun=False, verb=True)[1]
    return x, mask_bool


def test_vtm_labels_indices_and_masked_positives():
    seen_label_patterns = set()
    for seed in range(30):
        world, b = [(1, 1), (2, 5), (4, 6), (3, 7)][seed % 4]
        rank = seed % world
        x, mask_bool = _random_case(seed, world * b)
        pairs = sample_vtm_pairs(x, mask_bool, rank * b, b, 0.05, torch.Generator().manual_seed(seed))
        assert pairs.labels.dtype == torch.int64 and pairs.labels.shape == (b,)
        assert int(pairs.labels.sum()) == b // 2  # floor(b/2) matches, ceil(b/2) negatives
        seen_label_patterns.add((b, tuple(pairs.labels.tolist())))
        own = torch.arange(rank * b, (rank + 1) * b)
        for i, label in enumerate(pairs.labels.tolist()):
            v, t, r = int(pairs.video_index[i]), int(pairs.text_index[i]), int(own[i])
            assert 0 <= v < world * b and 0 <= t < world * b
            if label == 1:
                assert (v, t) == (r, r)
            elif not mask_bool[r].all():  # some admissible negative exists: exactly one side replaced by one
                assert (v == r) != (t == r)
                assert not mask_bool[r, t if v == r else v], "an action-aware positive was drawn as a negative"
    assert len({p for p in seen_label_patterns if p[0] == 7}) > 1, "labels are not permuted"


def test_vtm_row_and_column_convention_is_forced():
    """Global batch of 4 (2 ranks x 2), rank 1. Rows 2 and 3 are mutual positives, so each may only draw 0 or 1.

    x[r, j] (text r vs video j) decides the TEXT replacement, x[j, r] (column r) the VIDEO replacement (the official
    names are transposed): text 2 loves video 0 -> text replacement of item 2 takes text 0; text 1 loves video 2 -> its
    video replacement takes video 1. ALBEF's convention would give the opposite choices.
    """
    x = torch.eye(4)
    x[2, 0] = x[1, 2] = x[3, 1] = x[0, 3] = 1.0
    mask_bool = torch.eye(4, dtype=torch.bool)
    mask_bool[2, 3] = mask_bool[3, 2] = True
    expected = {(2, "text"): 0, (2, "video"): 1, (3, "text"): 1, (3, "video"): 0}
    seen = set()
    for seed in range(40):
        pairs = sample_vtm_pairs(
            x, mask_bool, row_offset=2, local_batch=2, temperature=0.01, generator=torch.Generator().manual_seed(seed)
        )
        for i in range(2):
            r, v, t = 2 + i, int(pairs.video_index[i]), int(pairs.text_index[i])
            if pairs.labels[i] == 1:
                continue
            side, drawn = ("video", v) if v != r else ("text", t)
            assert drawn == expected[(r, side)], (seed, r, side, drawn)
            seen.add((r, side))
    assert seen == set(expected), "not every row/branch combination was exercised"


def test_vtm_sampling_frequencies():
    """Branch 1/2 - 1/2 and draws proportional to the (unrenormalised) softmax weights of the admissible items.

    Local rows 0..b-1 have exactly two admissible items, b and b+1. With T = 1: text replacement takes text b with
    probability 3/4 (x[r, b] = log 3 vs 0); video replacement takes video b+1 with probability 3/4 (x[b+1, r]).
    """
    b = 400
    x = torch.zeros(b + 2, b + 2)
    x[:b, b] = math.log(3)
    x[b + 1, :b] = math.log(3)
    mask_bool = torch.ones(b + 2, b + 2, dtype=torch.bool)
    mask_bool[:, b:] = False
    mask_bool[b:, :] = False
    mask_bool |= torch.eye(b + 2, dtype=torch.bool)
    pairs = sample_vtm_pairs(x, mask_bool, 0, b, temperature=1.0, generator=torch.Generator().manual_seed(0))
    negatives = pairs.labels == 0
    text_side = negatives & (pairs.video_index == torch.arange(b))
    video_side = negatives & ~text_side
    n_neg, n_text, n_video = int(negatives.sum()), int(text_side.sum()), int(video_side.sum())
    assert n_neg == b // 2
    assert abs(n_text - n_neg / 2) < 5 * math.sqrt(n_neg / 4)  # 5 sigma of Binomial(200, 1/2)
    took_b = int((pairs.text_index[text_side] == b).sum())
    took_b1 = int((pairs.video_index[video_side] == b + 1).sum())
    assert abs(took_b - 0.75 * n_text) < 5 * math.sqrt(n_text * 0.75 * 0.25)
    assert abs(took_b1 - 0.75 * n_video) < 5 * math.sqrt(n_video * 0.75 * 0.25)
    assert set(pairs.text_index[text_side].tolist()) <= {b, b + 1}
    assert set(pairs.video_index[video_side].tolist()) <= {b, b + 1}


def test_vtm_is_deterministic_per_seed_and_checks_inputs():
    x, mask_bool = _random_case(5, 32)
    first = sample_vtm_pairs(x, mask_bool, 16, 16, generator=torch.Generator().manual_seed(11))
    again = sample_vtm_pairs(x, mask_bool, 16, 16, generator=torch.Generator().manual_seed(11))
    other = sample_vtm_pairs(x, mask_bool, 16, 16, generator=torch.Generator().manual_seed(12))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    with pytest.raises(ValueError, match="outside the global batch"):
        sample_vtm_pairs(x, mask_bool, 24, 16)
    with pytest.raises(ValueError, match="mask_bool"):
        sample_vtm_pairs(x, mask_bool.float(), 0, 16)


# --------------------------------------------------------------------------------------------------- MLM, VTM, total


def test_mlm_loss_ignores_minus_100_and_survives_an_empty_batch():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 5, 11, generator=g, requires_grad=True)
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[1, 3], labels[1, 4] = 4, 0, 10
    picked = [(0, 1, 4), (1, 3, 0), (1, 4, 10)]
    expected = -sum(float(torch.log_softmax(logits.detach()[i, j], -1)[k]) for i, j, k in picked) / len(picked)
    assert math.isclose(mlm_loss(logits, labels).item(), expected, rel_tol=1e-6)
    empty = mlm_loss(logits, torch.full((2, 5), -100))
    empty.backward()
    assert empty.item() == 0.0 and torch.count_nonzero(logits.grad) == 0
    with pytest.raises(ValueError, match="mlm_loss"):
        mlm_loss(logits, labels[:, :4])


def test_vtm_loss_and_total_loss():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.5], [-3.0, 1.0]])
    labels = torch.tensor([1, 0, 1])
    expected = (math.log1p(math.exp(3.0)) + math.log(2) + math.log1p(math.exp(-4.0))) / 3
    assert math.isclose(float(vtm_loss(logits, labels)), expected, rel_tol=1e-6)
    with pytest.raises(ValueError, match="vtm_loss"):
        vtm_loss(logits[:, :1], labels)
    e, m, v = torch.tensor(1.5), torch.tensor(0.25), torch.tensor(0.125)
    assert LOSS_WEIGHTS == (1.0, 1.0, 2.0)
    assert float(total_loss(e, m, v)) == 1.5 + 0.25 + 2 * 0.125
    assert float(total_loss(e, None, v, weights=(1.0, 0.0, 3.0))) == 1.5 + 3 * 0.125
    assert float(total_loss(e)) == 1.5


def test_simcse_loss_matches_a_hand_computed_case():
    from egovlp_deploy.losses import same_text_mask, simcse_loss

    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    t = 0.5
    an = [r / r.norm() for r in a]
    bn = [r / r.norm() for r in b]
    expected = 0.0
    for i in range(3):
        logits = [float(an[i] @ bn[j]) / t for j in range(3)]
        expected += -(logits[i] - math.log(sum(math.exp(x) for x in logits)))
    assert simcse_loss(a, b, temperature=t).item() == pytest.approx(expected / 3, rel=1e-6)

    # rows 0 and 2 are the same narration: their cross entries leave the softmax instead of being pushed apart
    ids = torch.tensor([[0, 5, 6, 2, 1], [0, 7, 2, 1, 1], [0, 5, 6, 2, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])  # row 2's last token is padding
    same = same_text_mask(ids, mask)
    assert same.tolist() == [[True, False, True], [False, True, False], [True, False, True]]
    expected = 0.0
    for i, keep in enumerate([[0, 1], [0, 1, 2], [1, 2]]):
        logits = {j: float(an[i] @ bn[j]) / t for j in keep}
        expected += -(logits[i] - math.log(sum(math.exp(x) for x in logits.values())))
    assert simcse_loss(a, b, same, temperature=t).item() == pytest.approx(expected / 3, rel=1e-6)
    with pytest.raises(ValueError, match="same_text"):
        simcse_loss(a, b, same[:2], temperature=t)


# -- fine-tuning losses ------------------------------------------------------------------------------------------
# Golden values: the official EgoVLPv2 `AdaptiveMaxMarginRankingLoss(margin)(x, w)` and `NormSoftmaxLoss(T)(x)[0]`
# (model/loss.py), run outside this repository on exactly the inputs the tests below generate.
FINETUNE_GOLDEN_F64 = {
    2: (0.0, 0.00011391933334450593),
    5: (0.3025478853273145, 21.668218077831092),
    16: (0.31592995606069746, 34.58299444839573),
}  # n: (adaptive margin 0.2, norm softmax 0.05)
FINETUNE_GOLDEN_F32 = (0.10688602924346924, 5.9740190505981445)  # margin 0.4, T 0.05, relevancy with 1s


def test_finetune_losses_match_the_official_functions():
    from egovlp_deploy.losses import adaptive_max_margin_loss, norm_softmax_loss

    g = torch.Generator().manual_seed(0)
    for n, (margin_loss, softmax_loss) in FINETUNE_GOLDEN_F64.items():
        x = torch.rand(n, n, generator=g, dtype=torch.float64) * 2 - 1
        w = torch.rand(n, generator=g, dtype=torch.float64)
        assert abs(adaptive_max_margin_loss(x, w, margin=0.2).item() - margin_loss) < 1e-12
        assert abs(norm_softmax_loss(x, 0.05).item() - softmax_loss) < 1e-12
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 8, generator=g) * 2 - 1
    w = torch.where(torch.rand(8, generator=g) > 0.5, torch.ones(8), torch.rand(8, generator=g))
    assert abs(adaptive_max_margin_loss(x, w, margin=0.4).item() - FINETUNE_GOLDEN_F32[0]) < 1e-6
    assert abs(norm_softmax_loss(x, 0.05).item() - FINETUNE_GOLDEN_F32[1]) < 1e-6


def test_adaptive_max_margin_loss_against_a_loop_and_by_hand():
    from egovlp_deploy.losses import adaptive_max_margin_loss

    x = torch.tensor([[0.9, 0.1, 0.8], [0.3, 0.5, 0.6], [0.0, 0.2, 0.7]], dtype=torch.float64)
    w = torch.tensor([1.0, 0.5, 0.2], dtype=torch.float64)
    terms = []
    for i in range(3):
        for j in range(3):
            if i != j:
                terms.append(max(0.0, w[i].item() * 0.4 - (x[i, i].item() - x[i, j].item())))  # text i vs video j
                terms.append(max(0.0, w[i].item() * 0.4 - (x[i, i].item() - x[j, i].item())))  # video i vs text j
    assert adaptive_max_margin_loss(x, w, 0.4).item() == pytest.approx(sum(terms) / len(terms), abs=1e-15)
    # by hand: row 0 (margin 0.4): video 2 at 0.8 is within 0.4 of 0.9 -> 0.3; column 0: all below 0.5 -> 0
    assert terms[2] == pytest.approx(0.3)
    one = torch.tensor([[0.3]], requires_grad=True)
    loss = adaptive_max_margin_loss(one, torch.ones(1))
    loss.backward()
    assert loss.item() == 0.0 and one.grad is not None  # no negatives: zero, not the official NaN
    with pytest.raises(ValueError, match="relevancy"):
        adaptive_max_margin_loss(x, w[:2])


def test_norm_softmax_loss_is_symmetric_infonce():
    from egovlp_deploy.losses import norm_softmax_loss

    x = torch.randn(6, 6, dtype=torch.float64)
    expected = F.cross_entropy(x / 0.05, torch.arange(6)) + F.cross_entropy(x.T / 0.05, torch.arange(6))
    assert norm_softmax_loss(x, 0.05).item() == pytest.approx(expected.item(), abs=1e-12)
    with pytest.raises(ValueError, match="temperature"):
        norm_softmax_loss(x, 0.0)
