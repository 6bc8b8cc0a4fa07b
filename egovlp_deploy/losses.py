"""Training objectives of EgoVLPv2: EgoNCE, MLM, VTM with hard negatives and their weighted sum (pre-training), and the
fine-tuning losses of the EK-100 and Charades-Ego recipes.

Rows of every similarity matrix here are TEXT and columns are VIDEO, as in the official `sim_matrix(text, video)`
(official model.py). The functions take already all-gathered tensors; gathering is the trainer's job (only `trainer`
touches torch.distributed).

    sim_matrix(a, b)                                   cosine similarity with the official max(norm, eps) rule
    egonce_loss(x, mask_v, mask_n, T, noun, verb)      official `EgoNCE.forward` as a function, any device
    sample_vtm_pairs(x, mask_bool, row_offset, b, T, generator)
                                                       the official 'ITM' block's hard-negative sampling
    mlm_loss(logits, labels), vtm_loss(logits, labels), total_loss(egonce, mlm, vtm, weights=(1, 1, 2))
    simcse_loss(a, b, same_text, T)                    unsupervised SimCSE (ours: from-scratch text towers only)

Fine-tuning objectives (the official downstream recipes):

    adaptive_max_margin_loss(x, relevancy, margin)      EK-100 multi-instance retrieval
    norm_softmax_loss(x, T)                             Charades-Ego
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

EGONCE_TEMPERATURE = 0.05  # fixed in the official EgoNCE, not learnable
VTM_SAMPLING_EPS = 1e-9  # added to the (unnormalised, masked) weights before multinomial, as official
LOSS_WEIGHTS = (1.0, 1.0, 2.0)  # EgoNCE, MLM, VTM as the official code sums them (not the paper's gamma/delta)
MLM_IGNORE_INDEX = -100  # the HF data collator's label for unmasked tokens


def sim_matrix(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Cosine similarity (Na, D) x (Nb, D) -> (Na, Nb).

    Each row is divided by max(||row||, eps), so an all-zero row (e.g. a clip without verb tags) gives similarity 0
    rather than NaN; the EgoNCE masks rely on that.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"sim_matrix expects (Na, D) and (Nb, D), got {tuple(a.shape)} and {tuple(b.shape)}")
    a_unit = a / a.norm(dim=1, keepdim=True).clamp_min(eps)
    b_unit = b / b.norm(dim=1, keepdim=True).clamp_min(eps)
    return a_unit @ b_unit.t()


def egonce_positive_mask(
    mask_v: torch.Tensor, mask_n: torch.Tensor, noun: bool = True, verb: bool = True
) -> torch.Tensor:
    """Boolean (N, N) mask of the pairs EgoNCE treats as positives.

    Both flags: i == j, or the clips share >= 1 verb AND >= 1 noun; one flag: that class only; neither: the
    diagonal (InfoNCE, PR #6). Computed as the official `mask > 0` on `mask_v * mask_n + I` etc., so the values of
    the (non-negative) cosine masks matter only through their sign.
    """
    n = mask_v.shape[0]
    eye = torch.eye(n, device=mask_v.device, dtype=mask_v.dtype)
    if noun and verb:
        mask = mask_v * mask_n + eye
    elif noun:
        mask = mask_n + eye
    elif verb:
        mask = mask_v + eye
    else:
        mask = eye
    return mask > 0


def egonce_loss(
    x: torch.Tensor,
    mask_v: torch.Tensor,
    mask_n: torch.Tensor,
    temperature: float = EGONCE_TEMPERATURE,
    noun: bool = True,
    verb: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """EgoNCE (official `EgoNCE(temperature, noun, verb).forward(x, mask_v, mask_n)`), on any device.

    Args:
        x: (N, N) cosine similarities, rows = text, columns = video (all-gathered batch incl. scene negatives).
        mask_v, mask_n: (N, N) `sim_matrix` of the multi-hot verb / noun vectors.
    Returns:
        (loss scalar, mask_bool (N, N) bool, temperature). The loss is
        -mean_i log sum_{j in P(i)} softmax_j(x_ij / T) - mean_i log sum_{j in P(i)} softmax_j(x^T_ij / T),
        with the same mask P in both directions (the official applies `mask_bool`, not its transpose, to the
        video-to-text softmax too; the masks are symmetric in practice because both come from sim_matrix(v, v)).

    The official takes log(sum(softmax * mask)) with no eps; we evaluate the identical quantity as
    logsumexp over the positives minus logsumexp over the row, which cannot hit log(0) when the positives' softmax
    underflows (e.g. fp16 logits spanning 2/T = 40). It runs in at least fp32, as autocast does for softmax.
    """
    if x.ndim != 2 or x.shape[0] != x.shape[1]:
        raise ValueError(f"egonce_loss expects a square (N, N) similarity matrix, got {tuple(x.shape)}")
    if mask_v.shape != x.shape or mask_n.shape != x.shape:
        raise ValueError(
            f"egonce_loss: mask_v {tuple(mask_v.shape)} and mask_n {tuple(mask_n.shape)} must match x {tuple(x.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"egonce_loss: temperature must be > 0, got {temperature}")
    mask_bool = egonce_positive_mask(mask_v.to(x.device), mask_n.to(x.device), noun=noun, verb=verb)
    logits = x.to(torch.promote_types(x.dtype, torch.float32)) / temperature  # fp16/bf16 -> fp32, fp64 stays
    loss_t2v = _mean_log_positive_probability(logits, mask_bool)  # rows = text
    loss_v2t = _mean_log_positive_probability(logits.t(), mask_bool)  # rows = video, same mask (see docstring)
    return -loss_t2v - loss_v2t, mask_bool, temperature


def _mean_log_positive_probability(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """mean_i log sum_{j: positives_ij} softmax(logits_i)_j for (N, M) logits and a bool mask of the same shape."""
    positive_logits = logits.masked_fill(~positives, float("-inf"))
    return (torch.logsumexp(positive_logits, dim=1) - torch.logsumexp(logits, dim=1)).mean()


class VTMPairs(NamedTuple):
    """The pairs fed to the fusion encoder for VTM, as indices into the GLOBAL (all-gathered) batch.

    labels: (b,) int64, 1 = matched pair, 0 = hard negative (the ITM head's class 1 = match, as in the official head).
    video_index, text_index: (b,) int64 rows of all_video / all_text to use for each local item.
    """

    labels: torch.Tensor
    video_index: torch.Tensor
    text_index: torch.Tensor


def sample_vtm_pairs(
    x: torch.Tensor,
    mask_bool: torch.Tensor,
    row_offset: int,
    local_batch: int,
    temperature: float = EGONCE_TEMPERATURE,
    generator: torch.Generator | None = None,
) -> VTMPairs:
    """Hard-negative VTM pairs for this rank's items, as the official 'ITM' block of `FrozenInTime.forward`.

    Args:
        x: (N, N) global similarity matrix from EgoNCE, rows = text, columns = video.
        mask_bool: (N, N) EgoNCE positives (from `egonce_loss`); they are never drawn as negatives.
        row_offset: the global row of this rank's first item (official: rank * local_batch).
        local_batch: b, this rank's batch size (2B with scene negatives).
        temperature: the EgoNCE temperature (the official reuses the one returned by the loss).
        generator: a CPU torch.Generator; the sampling runs on CPU copies of the (b, N) weight rows.
    Returns:
        VTMPairs of CPU int64 tensors of shape (b,).

    Semantics (the official VTM block):
      * labels = [1] * floor(b/2) + [0] * ceil(b/2), randomly permuted;
      * row r = row_offset + i; w_text = softmax(x[r] / T) and w_video = softmax(x^T[r] / T), both with
        mask_bool[r] set to 0 and NOT renormalised; draws use multinomial(w + 1e-9);
      * label 1: (video r, text r);
      * label 0, with probability 1/2: (video j, text r), j ~ w_video;  otherwise (video r, text j), j ~ w_text.

    Transposed naming: the official calls x "sim_v2t" and x^T "sim_t2v". The video replacement
    draws j from x^T[r], i.e. from the similarities of VIDEO r to all texts, and then takes video j (the video paired
    with a text similar to video r); the text replacement draws j from x[r] (text r against all videos) and takes
    text j. This is the reverse of ALBEF's convention and is reproduced literally, as is the use of mask_bool[r]
    (not its transpose) for both rows. Because the global batch is aligned (pair j = text j + video j) the index j
    is valid for either modality.

    RNG: the official draws the permutation and the multinomials from torch's global generator and the branch from
    np.random.rand() > 0.5. Here all three come from `generator`, in the official order (permutation, then per
    label-0 item: the branch, then its multinomial), so a run is reproducible from one seed. Only the RNG source
    differs; the distribution is the same.
    """
    if x.ndim != 2 or x.shape[0] != x.shape[1]:
        raise ValueError(f"sample_vtm_pairs expects a square (N, N) similarity matrix, got {tuple(x.shape)}")
    if mask_bool.shape != x.shape or mask_bool.dtype != torch.bool:
        raise ValueError(
            f"sample_vtm_pairs: mask_bool must be a bool tensor of shape {tuple(x.shape)}, "
            f"got {mask_bool.dtype} {tuple(mask_bool.shape)}"
        )
    n_global = x.shape[0]
    if local_batch < 1 or row_offset < 0 or row_offset + local_batch > n_global:
        raise ValueError(
            f"sample_vtm_pairs: rows [{row_offset}, {row_offset + local_batch}) are outside the global batch of "
            f"{n_global}"
        )
    if not temperature > 0:
        raise ValueError(f"sample_vtm_pairs: temperature must be > 0, got {temperature}")

    rows = slice(row_offset, row_offset + local_batch)
    with torch.no_grad():
        xf = x.detach().float().cpu()
        local_mask = mask_bool.detach().cpu()[rows]
        weights_text = F.softmax(xf[rows] / temperature, dim=1).masked_fill_(local_mask, 0)  # official weights_v2t
        weights_video = F.softmax(xf.t()[rows] / temperature, dim=1).masked_fill_(local_mask, 0)  # weights_t2v

    num_pos = local_batch // 2
    labels = torch.cat([torch.ones(num_pos, dtype=torch.int64), torch.zeros(local_batch - num_pos, dtype=torch.int64)])
    labels = labels[torch.randperm(local_batch, generator=generator)]

    own = torch.arange(row_offset, row_offset + local_batch, dtype=torch.int64)
    video_index = own.clone()
    text_index = own.clone()
    for i in range(local_batch):
        if labels[i] == 1:
            continue
        if torch.rand((), generator=generator).item() > 0.5:
            video_index[i] = torch.multinomial(weights_video[i] + VTM_SAMPLING_EPS, 1, generator=generator).item()
        else:
            text_index[i] = torch.multinomial(weights_text[i] + VTM_SAMPLING_EPS, 1, generator=generator).item()
    return VTMPairs(labels, video_index, text_index)


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Masked-language-model loss: cross-entropy over (..., V) logits, labels -100 ignored (the official MLM).

    When no token is masked (possible with tiny batches of short texts) the official mean over zero targets is NaN;
    we return a zero that keeps the graph instead, so such a batch contributes no MLM signal rather than poisoning
    the weights.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"mlm_loss: logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    if not bool((flat_labels != MLM_IGNORE_INDEX).any()):
        return flat_logits.sum() * 0.0
    return F.cross_entropy(flat_logits.float(), flat_labels.long(), ignore_index=MLM_IGNORE_INDEX)


def vtm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Video-text matching loss: 2-way cross-entropy of (b, 2) ITM logits against (b,) labels (1 = match)."""
    if logits.ndim != 2 or logits.shape[1] != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"vtm_loss expects (b, 2) logits and (b,) labels, got {tuple(logits.shape)}, {tuple(labels.shape)}"
        )
    return F.cross_entropy(logits.float(), labels.long())


def simcse_loss(
    a: torch.Tensor, b: torch.Tensor, same_text: torch.Tensor | None = None, temperature: float = 0.05
) -> torch.Tensor:
    """Unsupervised SimCSE (Gao et al., 2021): row i of `a` and row i of `b` are one text under two dropout masks;
    every other row of `b` is a negative. Not part of EgoVLPv2 (its text tower starts pretrained).

    `same_text` (N, N) bool marks pairs that are the same narration (a batch may hold a clip and a scene negative
    narrated alike): those off-diagonal entries are dropped from the softmax rather than pushed apart.
    """
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"simcse_loss expects two (N, D) embeddings of one shape, got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"simcse_loss: temperature must be > 0, got {temperature}")
    logits = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T / temperature
    if same_text is not None:
        if same_text.shape != logits.shape:
            raise ValueError(f"simcse_loss: same_text {tuple(same_text.shape)} must be {tuple(logits.shape)}")
        eye = torch.eye(a.shape[0], dtype=torch.bool, device=a.device)
        logits = logits.masked_fill(same_text.to(a.device) & ~eye, float("-inf"))
    return F.cross_entropy(logits, torch.arange(a.shape[0], device=a.device))


def same_text_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(N, N) bool: rows i, j hold the same tokens (padding ignored)."""
    ids = input_ids.masked_fill(attention_mask == 0, -1)
    return (ids[:, None, :] == ids[None, :, :]).all(-1)


def total_loss(
    egonce: torch.Tensor,
    mlm: torch.Tensor | None = None,
    vtm: torch.Tensor | None = None,
    weights: tuple[float, float, float] = LOSS_WEIGHTS,
) -> torch.Tensor:
    """weights[0]*EgoNCE + weights[1]*MLM + weights[2]*VTM; a term given as None is left out (objective ablations)."""
    loss = weights[0] * egonce
    if mlm is not None:
        loss = loss + weights[1] * mlm
    if vtm is not None:
        loss = loss + weights[2] * vtm
    return loss


# -- fine-tuning objectives ----------------------------------------------------------------------------------------
def norm_softmax_loss(sim: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """Charades-Ego fine-tuning: symmetric InfoNCE over an (N, N) cosine-similarity matrix whose diagonal holds the
    positive pairs — the mean over rows of -log softmax(sim / T)[i, i] plus the same over columns (the official
    `NormSoftmaxLoss`, which also returns T; this returns the loss only)."""
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] < 1:
        raise ValueError(f"norm_softmax_loss expects a square (N, N) matrix, got {tuple(sim.shape)}")
    if not temperature > 0:
        raise ValueError(f"norm_softmax_loss: temperature must be > 0, got {temperature}")
    logits = sim / temperature
    rows = F.log_softmax(logits, dim=1).diagonal().mean()
    cols = F.log_softmax(logits.T, dim=1).diagonal().mean()
    return -rows - cols


def adaptive_max_margin_loss(sim: torch.Tensor, relevancy: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """EK-100 multi-instance retrieval fine-tuning: a max-margin ranking loss whose margin scales with how relevant
    each pair's caption is (the official `AdaptiveMaxMarginRankingLoss` with fix_norm).

    sim: (N, N) similarities of N texts (rows) and their N videos (columns), positives on the diagonal; relevancy: (N,)
    the relevancy of pair i's caption to its video (1 for its own narration, the relevancy-matrix entry for a sampled
    positive caption). Every off-diagonal entry j of row i and of column i contributes
    relu(relevancy[i] * margin - (sim[i, i] - sim[i, j])) (resp. sim[j, i]); the loss is the mean over all 2 N (N - 1)
    of them. N = 1 has no negatives: the loss is 0 (the official mean over nothing is NaN)."""
    n = sim.shape[0]
    if sim.ndim != 2 or sim.shape[1] != n or n < 1:
        raise ValueError(f"adaptive_max_margin_loss expects a square (N, N) matrix, got {tuple(sim.shape)}")
    if relevancy.shape != (n,):
        raise ValueError(f"adaptive_max_margin_loss: relevancy must be ({n},), got {tuple(relevancy.shape)}")
    if n == 1:
        return sim.sum() * 0.0
    positive = sim.diagonal()[:, None]  # (N, 1): sim[i, i]
    wanted = relevancy.to(sim.dtype)[:, None] * margin  # (N, 1): the margin of row/column i
    off = ~torch.eye(n, dtype=torch.bool, device=sim.device)
    by_text = F.relu(wanted - (positive - sim))[off]  # text i against the other videos
    by_video = F.relu(wanted - (positive - sim.T))[off]  # video i against the other texts
    return (by_text.sum() + by_video.sum()) / (2 * n * (n - 1))
