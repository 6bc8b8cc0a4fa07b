"""Evaluation metrics of the EgoVLPv2 benchmarks, with the official definitions.

    egomcq_accuracy(preds, labels, types)      EgoMCQ 5-way accuracy per group, percent
    mir_metrics(sim, idx_arr, relevancy, video_ids, text_ids)
                                               EPIC-KITCHENS-100 multi-instance retrieval nDCG / mAP, percent
    mir_scores(video_by_sentence, relevancy)   the same from (clips x sentences) similarities
    charades_map(scores, targets)              Charades-Ego mAP over the classes, a fraction in [0, 1]

Inputs may be torch tensors or numpy arrays. Degenerate inputs for which the official code silently returns NaN
(a query without any relevant item) raise ValueError here instead, naming the query.

Ties: the official ranks with numpy's default (unstable) argsort, `argsort(s)[::-1]` for nDCG and `argsort(-s)` for
mAP; the order of tied scores therefore depends on the numpy build. We make the same calls, so results match the
official bit for bit on the same machine, ties included; tied scores are rare with real embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

EGOMCQ_GROUPS = {1: "Inter-video", 2: "Intra-video"}  # the `types` field of egomcq.json


def _to_numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _to_tensor(a) -> torch.Tensor:
    return a.detach().cpu() if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))


# --------------------------------------------------------------------------------------------------- EgoMCQ


def egomcq_accuracy(
    preds: torch.Tensor | ArrayLike,
    labels: torch.Tensor | ArrayLike,
    types: torch.Tensor | ArrayLike,
    include_all: bool = False,
) -> dict[str, float]:
    """EgoMCQ accuracy (percent) per group, as the official `egomcq_accuracy_metrics_ensemble` (and `_vtm`).

    Args:
        preds: (N, C) scores of the C (5) choices; the prediction is the argmax, ties going to the first choice.
        labels: (N,) index of the correct choice.
        types: (N,) 1 = inter-video, 2 = intra-video.
        include_all: add 'all', the accuracy over every question.
    Returns:
        {'Inter-video': %, 'Intra-video': %}, with a key only for the groups present in `types` (and 'all').

    The official pairs `torch.unique(types)` with the names in order, so if only type 2 were present it would be
    reported as 'Inter-video'; here each type maps to its own name.
    """
    preds_t, labels_t, types_t = _to_tensor(preds), _to_tensor(labels), _to_tensor(types)
    if preds_t.ndim != 2 or labels_t.shape != preds_t.shape[:1] or types_t.shape != preds_t.shape[:1]:
        raise ValueError(
            f"egomcq_accuracy expects preds (N, C), labels (N,), types (N,); got {tuple(preds_t.shape)}, "
            f"{tuple(labels_t.shape)}, {tuple(types_t.shape)}"
        )
    if preds_t.shape[0] == 0:
        raise ValueError("egomcq_accuracy: no questions")
    if preds_t.is_floating_point() and not bool(torch.isfinite(preds_t).all()):
        bad = torch.nonzero(~torch.isfinite(preds_t).all(dim=1)).flatten()[:5].tolist()
        raise ValueError(f"egomcq_accuracy: non-finite scores in questions {bad}")
    unknown = sorted(set(types_t.tolist()) - EGOMCQ_GROUPS.keys())
    if unknown:
        raise ValueError(f"egomcq_accuracy: unknown question types {unknown} (expected 1 = inter, 2 = intra)")
    num_choices = preds_t.shape[1]
    if bool(((labels_t < 0) | (labels_t >= num_choices)).any()):
        raise ValueError(f"egomcq_accuracy: labels outside [0, {num_choices})")

    correct = torch.argmax(preds_t, dim=1) == labels_t.long()  # argmax returns the first maximal index
    metrics = {"all": int(correct.sum()) / len(correct) * 100} if include_all else {}
    for type_id, name in EGOMCQ_GROUPS.items():
        in_group = types_t == type_id
        total = int(in_group.sum())
        if total:
            metrics[name] = int((correct & in_group).sum()) / total * 100
    return metrics


# --------------------------------------------------------------------------------------------------- EK-100 MIR


def mir_metrics(
    similarity_matrix: torch.Tensor | ArrayLike,
    idx_arr: torch.Tensor | ArrayLike,
    relevancy: torch.Tensor | ArrayLike,
    video_ids: Sequence[str],
    text_ids: Sequence[str],
) -> dict[str, float]:
    """EPIC-KITCHENS-100 MIR nDCG and mAP (percent), as the official `mir_metrics_vtc`.

    Args:
        similarity_matrix: (M, M) cosine similarities, rows = text, columns = video, both in loader order (the
            caption and the clip of loader row r belong to the same dataset item idx_arr[r]).
        idx_arr: (M,) dataset index of each loader row. Every index 0..N-1 must appear; a repeated index (padding of
            a distributed sampler) uses its first row, as official.
        relevancy: (N, S) relevancy of clip n to sentence s (`caption_relevancy_EPIC_100_retrieval_test.pkl`).
        video_ids: the N narration ids of `EPIC_100_retrieval_test.csv` (first column), in file order.
        text_ids: the S narration ids of `EPIC_100_retrieval_test_sentence.csv` (first column): each sentence is
            represented by the caption of the test clip with that narration id (the first such clip).
    Returns:
        {'nDCG_V2T', 'nDCG_T2V', 'nDCG_AVG', 'mAP_V2T', 'mAP_T2V', 'mAP_AVG'} in percent.

    Similarities are rescaled to (s + 1) / 2 first, as official (monotonic; kept for identical rounding). For mAP a
    clip counts as relevant when its relevancy is exactly 1, but the precision at k is the cumulative SUM of the
    graded relevancy of the top k divided by k (official `utils/mAP.py`), so partially relevant items raise it.
    nDCG uses the graded relevancy, cut at k = the number of items with relevancy > 0 (official `utils/nDCG.py`).
    """
    sim = _to_numpy(similarity_matrix)
    loader_index = _to_numpy(idx_arr).astype(np.int64).reshape(-1)
    rel = _to_numpy(relevancy)
    video_ids, text_ids = list(video_ids), list(text_ids)
    num_clips, num_sentences = len(video_ids), len(text_ids)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] != loader_index.shape[0]:
        raise ValueError(
            f"mir_metrics: similarity_matrix must be (M, M) with M = len(idx_arr) = {loader_index.shape[0]}, "
            f"got {sim.shape}"
        )
    if rel.shape != (num_clips, num_sentences):
        raise ValueError(
            f"mir_metrics: relevancy has shape {rel.shape}, expected (len(video_ids), len(text_ids)) = "
            f"({num_clips}, {num_sentences})"
        )
    if num_clips == 0 or num_sentences == 0:
        raise ValueError("mir_metrics: no clips or no sentences")

    # Sentence s is scored with the caption of the first test clip whose narration id equals text_ids[s].
    clip_of_narration: dict[str, int] = {}
    for position, narration_id in enumerate(video_ids):
        clip_of_narration.setdefault(narration_id, position)
    missing = [t for t in text_ids if t not in clip_of_narration]
    if missing:
        raise ValueError(f"mir_metrics: {len(missing)} sentence narration ids are not in video_ids, e.g. {missing[:5]}")
    sentence_clip = [clip_of_narration[t] for t in text_ids]

    # Loader order -> dataset order (first loader row of each dataset index).
    first_row: dict[int, int] = {}
    for row, dataset_index in enumerate(loader_index.tolist()):
        first_row.setdefault(dataset_index, row)
    absent = [i for i in range(num_clips) if i not in first_row]
    if absent:
        raise ValueError(
            f"mir_metrics: idx_arr lacks {len(absent)} of the {num_clips} dataset indices, e.g. {absent[:5]}"
        )
    order = [first_row[i] for i in range(num_clips)]

    text_by_video = sim[order, :][:, order]  # (N text, N video), dataset order
    return mir_scores(text_by_video.T[:, sentence_clip], rel)


def mir_scores(video_by_sentence: torch.Tensor | ArrayLike, relevancy: torch.Tensor | ArrayLike) -> dict[str, float]:
    """EPIC-KITCHENS-100 MIR nDCG and mAP (percent) of the (N clips, S sentences) cosine similarities against the
    (N, S) relevancy: the scoring half of `mir_metrics`, for callers that have each sentence's text embedding
    already (the evaluation, where a sentence whose own clip was skipped is embedded from its sentence-CSV text).
    The similarities are rescaled to (s + 1) / 2 as official; every clip needs an item of relevancy 1 and every
    sentence too (ValueError naming the first that has none: the official average precision is 0/0 there)."""
    sim, rel = _to_numpy(video_by_sentence), _to_numpy(relevancy)
    if sim.ndim != 2 or sim.shape != rel.shape or sim.size == 0:
        raise ValueError(f"mir_scores: similarities {sim.shape} and relevancy {rel.shape} must be the same (N, S) > 0")
    # argsort puts NaN last ascending, so a NaN score would rank first for nDCG and last for mAP: a silent number
    if np.isnan(sim).any():
        raise ValueError("mir_metrics: NaN similarities")
    if not np.isfinite(rel).all():
        raise ValueError("mir_metrics: non-finite relevancy")
    video_by_sentence = (sim + 1) / 2  # elementwise, so rescaling after the official's indexing changes no bit

    ndcg_v2t = _ndcg(video_by_sentence, rel, "clip")
    ndcg_t2v = _ndcg(video_by_sentence.T, rel.T, "sentence")
    map_v2t = _mean_average_precision(video_by_sentence, rel, "clip")
    map_t2v = _mean_average_precision(video_by_sentence.T, rel.T, "sentence")
    return {
        "nDCG_V2T": float(ndcg_v2t * 100),
        "nDCG_T2V": float(ndcg_t2v * 100),
        "nDCG_AVG": float(100 * (ndcg_v2t + ndcg_t2v) / 2),
        "mAP_V2T": float(map_v2t * 100),
        "mAP_T2V": float(map_t2v * 100),
        "mAP_AVG": float(100 * (map_v2t + map_t2v) / 2),
    }


def _ndcg(scores: np.ndarray, rel: np.ndarray, query_name: str) -> float:
    """Mean over queries (rows) of DCG@k / IDCG@k, k = the query's number of items with relevancy > 0."""
    num_items = scores.shape[1]
    num_relevant = (rel > 0).sum(axis=1)
    if (num_relevant == 0).any():
        raise ValueError(f"mir_metrics: {query_name} {int(np.argmin(num_relevant))} has no relevant item (nDCG 0/0)")
    ranking = np.argsort(scores, axis=1)[:, ::-1]  # same call as official (tie order)
    in_top_k = np.arange(num_items)[None, :] < num_relevant[:, None]
    log_discount = np.log2(np.arange(num_items) + 2)
    dcg = (np.take_along_axis(rel, ranking, axis=1) * in_top_k / log_discount).sum(axis=1)
    ideal_gains = -np.sort(-rel, axis=1)
    idcg = (ideal_gains * in_top_k / log_discount).sum(axis=1)
    return float(np.mean(dcg / idcg))


def _mean_average_precision(scores: np.ndarray, rel: np.ndarray, query_name: str) -> float:
    """Mean over queries of sum_{k: rel_k == 1} (sum_{i<=k} rel_i / k) / #{rel == 1} (official utils/mAP.py)."""
    num_hits = (rel == 1).sum(axis=1)
    if (num_hits == 0).any():
        raise ValueError(f"mir_metrics: {query_name} {int(np.argmin(num_hits))} has no item of relevancy 1 (AP 0/0)")
    ranking = np.argsort(-scores, axis=1)  # same call as official (tie order)
    ranked_rel = np.take_along_axis(rel, ranking, axis=1)
    precision_at_k = np.cumsum(ranked_rel, axis=1) / (np.arange(scores.shape[1]) + 1)
    average_precision = np.where(ranked_rel == 1, precision_at_k, 0).sum(axis=1) / num_hits
    return float(np.mean(average_precision))


# --------------------------------------------------------------------------------------------------- Charades-Ego


def charades_map(scores: torch.Tensor | ArrayLike, targets: torch.Tensor | ArrayLike) -> float:
    """Charades-Ego mAP as the official `charades_metrics_vtc` (a fraction; the official README's 26.2 is 100x this).

    Args:
        scores: (N videos, C classes) scores, e.g. `sim_matrix(class_text, video).T`.
        targets: (N, C) multi-hot ground truth (0/1).
    Returns:
        The mean over classes with >= 1 positive video of the class's average precision. Videos without any label
        are scored -inf for every class first (they rank last, so they never cost precision), as official.
    """
    s = np.array(_to_numpy(scores), copy=True)  # keep the dtype: numpy's tie order depends on it
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    gt = _to_numpy(targets)
    if s.ndim != 2 or s.shape != gt.shape:
        raise ValueError(f"charades_map expects scores and targets of the same (N, C) shape, got {s.shape}, {gt.shape}")
    if not np.isin(gt, (0, 1)).all():
        raise ValueError("charades_map: targets must be 0/1")
    if np.isnan(s).any():
        raise ValueError("charades_map: NaN scores")
    s[gt.sum(axis=1) == 0, :] = -np.inf

    average_precisions = []
    for c in range(s.shape[1]):
        ranking = np.argsort(-s[:, c])  # same call as official (tie order)
        hits = gt[ranking, c] == 1
        if not hits.any():
            continue  # the official records NaN and takes the nanmean
        precision_at_k = np.cumsum(hits) / (np.arange(len(hits)) + 1)
        average_precisions.append(precision_at_k[hits].sum() / hits.sum())
    if not average_precisions:
        raise ValueError("charades_map: no class has a positive video")
    return float(np.mean(average_precisions))
