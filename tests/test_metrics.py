"""Metrics against hand-computed cases and independent references written here (loops over the textbook
definitions). Bit-level parity with the official `egomcq_accuracy_metrics_ensemble`, `mir_metrics_vtc` and
`charades_metrics_vtc` was checked in a scratch harness that runs the official code (not part of this suite).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from egovlp_deploy.metrics import charades_map, egomcq_accuracy, mir_metrics

# --------------------------------------------------------------------------------------------------- references


def _ap_official_formula(scores: np.ndarray, rel: np.ndarray) -> float:
    """EK-100 AP as the official utils/mAP.py defines it: at every rank k holding an item of relevancy exactly 1,
    precision = (sum of the GRADED relevancy of the top k) / k; averaged over those ranks. Scores must be tie-free."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    running, precisions = 0.0, []
    for k, i in enumerate(order, start=1):
        running += rel[i]
        if rel[i] == 1:
            precisions.append(running / k)
    return sum(precisions) / len(precisions)


def _textbook_ap(scores: np.ndarray, positive: np.ndarray) -> float:
    """Non-interpolated average precision: mean over positives of (#positives ranked at or above it) / rank."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    hits, total = 0, 0.0
    for k, i in enumerate(order, start=1):
        if positive[i]:
            hits += 1
            total += hits / k
    return total / hits


def _ndcg_at_num_relevant(scores: np.ndarray, rel: np.ndarray) -> float:
    """nDCG with linear gains and 1/log2(rank + 1) discounts, cut at k = the number of items with relevancy > 0."""
    k = int((rel > 0).sum())
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[:k]
    dcg = sum(rel[i] / math.log2(rank + 2) for rank, i in enumerate(order))
    idcg = sum(g / math.log2(rank + 2) for rank, g in enumerate(sorted(rel, reverse=True)[:k]))
    return dcg / idcg


# --------------------------------------------------------------------------------------------------- EgoMCQ


def test_egomcq_by_hand_with_ties_going_to_the_first_choice():
    preds = torch.tensor(
        [
            [0.1, 0.9, 0.0, 0.0, 0.0],  # -> 1, correct
            [0.5, 0.5, 0.0, 0.0, 0.0],  # tie -> 0, label 1: wrong
            [0.0, 0.0, 0.7, 0.7, 0.7],  # tie -> 2, correct
            [0.3, 0.2, 0.1, 0.0, -1.0],  # -> 0, label 4: wrong
            [0.0, 0.0, 0.0, 0.0, 1.0],  # -> 4, correct
        ]
    )
    labels = torch.tensor([1, 1, 2, 4, 4])
    types = torch.tensor([1, 1, 2, 2, 2])
    result = egomcq_accuracy(preds, labels, types)
    assert result == {"Inter-video": 50.0, "Intra-video": 2 / 3 * 100}
    assert egomcq_accuracy(preds.numpy(), labels.numpy(), types.numpy()) == result  # numpy inputs too


def test_egomcq_names_groups_by_type_not_by_position():
    # The official zips torch.unique(types) with ["Inter-video", "Intra-video"], so intra-only input would be
    # reported as "Inter-video"; type 2 must always be intra.
    result = egomcq_accuracy(torch.eye(5)[:2], torch.tensor([0, 0]), torch.tensor([2, 2]))
    assert result == {"Intra-video": 50.0}


def test_egomcq_rejects_bad_input():
    preds, labels = torch.zeros(2, 5), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="unknown question types"):
        egomcq_accuracy(preds, labels, torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="non-finite"):
        egomcq_accuracy(torch.tensor([[0.0, float("nan"), 0, 0, 0]] * 2), labels, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="labels outside"):
        egomcq_accuracy(preds, torch.tensor([0, 5]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="expects preds"):
        egomcq_accuracy(preds, labels[:1], torch.tensor([1, 2]))


# --------------------------------------------------------------------------------------------------- EK-100 MIR


def test_mir_two_by_two_by_hand():
    """V2T matrix (clips x sentences) = sim.T = [[.8, .6], [.2, .4]], relevancy [[1, .5], [0, 1]].

    T2V sentence 1 ranks clip 0 (rel 0.5) above clip 1 (rel 1): the official AP counts the partial relevancy in the
    precision, (0.5 + 1) / 2 = 0.75 (the textbook AP would be 0.5). Its nDCG@2 is (0.5 + 1/log2 3) / (1 + 0.5/log2 3).
    """
    sim = np.array([[0.8, 0.2], [0.6, 0.4]])  # text x video
    rel = np.array([[1.0, 0.5], [0.0, 1.0]])
    result = mir_metrics(sim, np.array([0, 1]), rel, ["a", "b"], ["a", "b"])
    ndcg_s1 = (0.5 + 1 / math.log2(3)) / (1 + 0.5 / math.log2(3))
    expected = {
        "mAP_V2T": 100.0,
        "mAP_T2V": 87.5,
        "mAP_AVG": 93.75,
        "nDCG_V2T": 100.0,
        "nDCG_T2V": 100 * (1 + ndcg_s1) / 2,
        "nDCG_AVG": 100 * (1 + (1 + ndcg_s1) / 2) / 2,
    }
    assert result.keys() == expected.keys()
    for key, want in expected.items():
        assert math.isclose(result[key], want, rel_tol=1e-12), key


def _mir_case(seed: int, n_clips: int, n_sentences: int):
    rng = np.random.default_rng(seed)
    video_ids = [f"P{seed:02d}_{k}" for k in range(n_clips)]
    sentence_of_clip = np.concatenate([np.arange(n_sentences), rng.integers(0, n_sentences, n_clips - n_sentences)])
    rng.shuffle(sentence_of_clip)
    representative = [int(np.flatnonzero(sentence_of_clip == s)[-1]) for s in range(n_sentences)]
    text_ids = [video_ids[c] for c in representative]
    rel = rng.choice([0.0, 0.0, 0.25, 0.5, 1.0], size=(n_clips, n_sentences))
    rel[np.arange(n_clips), sentence_of_clip] = 1.0
    sim_dataset_order = rng.uniform(-1, 1, (n_clips, n_clips))  # text x video, no ties
    return video_ids, text_ids, representative, rel, sim_dataset_order


def test_mir_matches_independent_reference_and_undoes_the_loader_order():
    rng = np.random.default_rng(0)
    for seed, (n_clips, n_sentences) in enumerate([(5, 2), (12, 5), (30, 11)]):
        video_ids, text_ids, representative, rel, sim = _mir_case(seed, n_clips, n_sentences)
        # Reference: clip n vs sentence s is scored by the caption of the sentence's representative clip.
        v2t = sim.T[:, representative]
        want = {
            "mAP_V2T": np.mean([_ap_official_formula(v2t[i], rel[i]) for i in range(n_clips)]) * 100,
            "mAP_T2V": np.mean([_ap_official_formula(v2t[:, j], rel[:, j]) for j in range(n_sentences)]) * 100,
            "nDCG_V2T": np.mean([_ndcg_at_num_relevant(v2t[i], rel[i]) for i in range(n_clips)]) * 100,
            "nDCG_T2V": np.mean([_ndcg_at_num_relevant(v2t[:, j], rel[:, j]) for j in range(n_sentences)]) * 100,
        }
        # Loader order: a permutation plus two padded repeats (whose rows hold junk and must be ignored).
        idx_arr = np.concatenate([rng.permutation(n_clips), [0, n_clips - 1]])
        loader_sim = np.full((len(idx_arr), len(idx_arr)), 5.0)
        first_rows = slice(0, n_clips)
        loader_sim[first_rows, first_rows] = sim[np.ix_(idx_arr[:n_clips], idx_arr[:n_clips])]
        got = mir_metrics(torch.as_tensor(loader_sim), torch.as_tensor(idx_arr), rel, video_ids, text_ids)
        for key, value in want.items():
            assert math.isclose(got[key], value, rel_tol=1e-9), (seed, key)
        assert math.isclose(got["mAP_AVG"], (want["mAP_V2T"] + want["mAP_T2V"]) / 2, rel_tol=1e-9)
        assert math.isclose(got["nDCG_AVG"], (want["nDCG_V2T"] + want["nDCG_T2V"]) / 2, rel_tol=1e-9)


def test_mir_map_is_textbook_ap_for_binary_relevancy():
    rng = np.random.default_rng(1)
    n = 20
    ids = [str(i) for i in range(n)]
    sim = rng.uniform(-1, 1, (n, n))
    rel = (rng.uniform(size=(n, n)) < 0.15).astype(float)
    np.fill_diagonal(rel, 1.0)
    got = mir_metrics(sim, np.arange(n), rel, ids, ids)
    want = np.mean([_textbook_ap(sim.T[i], rel[i] == 1) for i in range(n)]) * 100
    assert math.isclose(got["mAP_V2T"], want, rel_tol=1e-9)


def test_mir_rejects_inputs_the_official_would_turn_into_nan_or_misalign():
    video_ids, text_ids, _, rel, sim = _mir_case(3, 6, 3)
    idx = np.arange(6)
    with pytest.raises(ValueError, match="not in video_ids"):
        mir_metrics(sim, idx, rel, video_ids, text_ids[:-1] + ["nope"])
    with pytest.raises(ValueError, match="idx_arr lacks"):
        mir_metrics(sim, np.array([0, 1, 2, 3, 4, 4]), rel, video_ids, text_ids)
    with pytest.raises(ValueError, match="relevancy has shape"):
        mir_metrics(sim, idx, rel[:, :2], video_ids, text_ids)
    with pytest.raises(ValueError, match=r"similarity_matrix must be \(M, M\)"):
        mir_metrics(sim[:, :5], idx, rel, video_ids, text_ids)
    no_exact_match = rel.copy()
    no_exact_match[:, 1] = np.where(no_exact_match[:, 1] == 1, 0.5, no_exact_match[:, 1])
    with pytest.raises(ValueError, match=r"clip \d+ has no item of relevancy 1"):
        mir_metrics(sim, idx, no_exact_match, video_ids, text_ids)


# --------------------------------------------------------------------------------------------------- Charades-Ego


def test_charades_by_hand():
    """Class 0: ranking v0(-) v1(+) v3(-) v2(+) -> AP = (1/2 + 2/4) / 2 = 0.5. Class 1: v0(+) first -> AP 1.
    Class 2: v3(+) first -> AP 1. Class 3 has no positive and is left out. Video 4 has no label at all: it scores
    highest everywhere but is moved to -inf, otherwise class 0 would get (1/3 + 2/5) / 2 and classes 1, 2 would get 1/2.
    """
    scores = np.array(
        [
            [0.9, 0.4, 0.1, 0.3],
            [0.8, 0.3, 0.2, 0.3],
            [0.1, 0.1, 0.3, 0.3],
            [0.5, 0.0, 0.4, 0.3],
            [0.95, 0.99, 0.5, 0.3],
        ],
        dtype=np.float32,
    )
    targets = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    want = (0.5 + 1 + 1) / 3
    assert math.isclose(charades_map(scores, targets), want, rel_tol=1e-12)
    assert math.isclose(charades_map(torch.as_tensor(scores), torch.as_tensor(targets)), want, rel_tol=1e-12)


def test_charades_matches_textbook_ap():
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(60, 12))
    targets = (rng.uniform(size=(60, 12)) < 0.1).astype(int)
    targets[:, 3] = 0
    targets[5, 0] = 1
    labelled = targets.sum(axis=1) > 0
    want = np.mean(
        [_textbook_ap(scores[labelled, c], targets[labelled, c] == 1) for c in range(12) if targets[:, c].any()]
    )
    assert math.isclose(charades_map(scores, targets), want, rel_tol=1e-12)


def test_charades_rejects_bad_input():
    with pytest.raises(ValueError, match="0/1"):
        charades_map(np.zeros((2, 2)), np.array([[0, 2], [1, 0]]))
    with pytest.raises(ValueError, match="same"):
        charades_map(np.zeros((2, 3)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="no class has a positive"):
        charades_map(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="NaN"):
        charades_map(np.array([[np.nan, 0.0]]), np.array([[1, 0]]))
