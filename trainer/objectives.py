"""One pre-training step's losses: EgoNCE (dual) + MLM (fusion) + VTM with hard negatives (fusion).

`PretrainObjective` is the module DDP wraps, so a single `forward` runs all three objectives (DDP needs its own
forward to be called). Every loss is computed over the GLOBAL batch exactly as one process would compute it:
- EgoNCE on all-gathered embeddings (gradient-carrying gather);
- MLM as the mean cross-entropy over all masked tokens of all ranks (per-token losses gathered);
- VTM pairs drawn over the global batch with a generator seeded by (seed, step) on every rank, each rank
  running the fusion encoder on its own slice; the per-pair losses are gathered.
So the losses, and the step, do not depend on how many processes share the batch (the scale-out test).

`FinetuneObjective` is the fine-tuning step (EK-100 MIR, Charades-Ego): the dual encoder's (texts x videos) cosine
matrix over the all-gathered global batch, scored by the task's loss, as the official fine-tuning trainers do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from egovlp_deploy.losses import (
    adaptive_max_margin_loss,
    egonce_loss,
    norm_softmax_loss,
    same_text_mask,
    sample_vtm_pairs,
    sim_matrix,
    simcse_loss,
)

from .distributed import gather, gather_with_grad


@dataclass
class StepBatch:
    """This rank's pairs: clips and their scene negatives interleaved (pair 2i = clip i, 2i+1 = its negative)."""

    video: torch.Tensor  # (b, F, 3, S, S)
    input_ids: torch.Tensor  # (b, L)
    attention_mask: torch.Tensor  # (b, L)
    verb: torch.Tensor  # (b, num_verbs) multi-hot
    noun: torch.Tensor  # (b, num_nouns) multi-hot
    mlm_input_ids: torch.Tensor  # (b, L) with 15% of tokens masked
    mlm_labels: torch.Tensor  # (b, L), -100 where not masked
    load_failures: torch.Tensor  # () clips of this batch that could not be read (lax mode: black frames)

    def to(self, device) -> StepBatch:
        return StepBatch(**{k: v.to(device, non_blocking=True) for k, v in self.__dict__.items()})


class PretrainObjective(torch.nn.Module):
    def __init__(
        self,
        model,
        temperature: float = 0.05,
        verb: bool = True,
        noun: bool = True,
        weights: tuple[float, float, float] = (1.0, 1.0, 2.0),
        seed: int = 0,
        vtm_negative_temperature: float | None = None,
        vtm_negative_anneal_steps: int = 0,
        text_simcse_weight: float = 0.0,
    ):
        super().__init__()
        self.text_simcse_weight = text_simcse_weight  # 0: official (no SimCSE term)
        self.model = model
        self.vtm_negative_temperature = vtm_negative_temperature  # None: the EgoNCE temperature (official)
        self.vtm_negative_anneal_steps = vtm_negative_anneal_steps
        self.temperature, self.verb, self.noun = temperature, verb, noun
        self.weights, self.seed = weights, seed

    def draw_temperature(self, egonce_temperature: float, step: int) -> float:
        """The temperature VTM negatives are drawn at: the EgoNCE one (official), a set one, or a set one annealed
        geometrically to the EgoNCE one over `vtm_negative_anneal_steps`."""
        start = self.vtm_negative_temperature
        if start is None:
            return egonce_temperature
        if self.vtm_negative_anneal_steps <= 0:
            return start
        progress = min(step / self.vtm_negative_anneal_steps, 1.0)
        return start * (egonce_temperature / start) ** progress

    def forward(self, batch: StepBatch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model, b = self.model, batch.video.shape[0]

        # EgoNCE over the global batch: rows = text, columns = video
        video_emb = gather_with_grad(model.encode_video(batch.video))  # (N, P)
        text_emb = gather_with_grad(model.encode_text(batch.input_ids, batch.attention_mask))  # (N, P)
        verbs, nouns = gather(batch.verb.float()), gather(batch.noun.float())
        sim = sim_matrix(text_emb, video_emb)  # (N, N)
        egonce, positives, temperature = egonce_loss(
            sim, sim_matrix(verbs, verbs), sim_matrix(nouns, nouns), self.temperature, noun=self.noun, verb=self.verb
        )

        # The fusion-mode video prefix (the blocks below the first fused one) depends only on the clip: computed once
        # per clip of the global batch and shared by the MLM pass and every VTM pairing (the official code recomputes
        # it for each of the 4 pairings, with the same values). Each rank computes it for the whole global batch: a
        # rank's parameter gradients come only from its own pairs' losses, so where a prefix was computed does not
        # change the (DDP-averaged) gradient.
        all_video, all_ids, all_mask = gather(batch.video), gather(batch.input_ids), gather(batch.attention_mask)
        n_global = all_video.shape[0]
        rank = 0 if n_global == b else torch.distributed.get_rank()
        mine = slice(rank * b, (rank + 1) * b)
        video_prefix = model.fusion_video_prefix(all_video)  # (N, T, Dv)

        # MLM on this rank's pairs, averaged over every masked token of the global batch
        _, fused_text = model.fused_from_prefixes(
            video_prefix[mine], model.text_prefix(batch.mlm_input_ids, batch.attention_mask), batch.attention_mask
        )
        logits = model.mlm_head(fused_text)  # (b, L, V)
        token_loss = F.cross_entropy(
            logits.flatten(0, 1).float(), batch.mlm_labels.flatten(), ignore_index=-100, reduction="none"
        ).view(b, -1)
        token_loss = gather_with_grad(token_loss)
        masked = gather(batch.mlm_labels.ne(-100))
        mlm = (token_loss * masked).sum() / masked.sum().clamp_min(1)

        # VTM: hard negatives drawn from the whole global batch (the same draws on every rank)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        draw_temperature = self.draw_temperature(float(temperature), step)
        # Non-finite similarities (weights a too-large step made inf/NaN) would stop the draw with a multinomial
        # error; drawn from zeros instead, the step's loss is still non-finite and the trainer's NaN guard skips it.
        draw_sim = sim.detach()
        if not torch.isfinite(draw_sim).all():
            draw_sim = torch.zeros_like(draw_sim)
        pairs = sample_vtm_pairs(draw_sim, positives, 0, n_global, draw_temperature, generator)
        video_idx = pairs.video_index[mine].to(all_video.device)
        text_idx = pairs.text_index[mine].to(all_ids.device)
        labels = pairs.labels[mine].to(all_video.device)
        pair_mask = all_mask[text_idx]
        video_cls, fused_text = model.fused_from_prefixes(
            video_prefix[video_idx], model.text_prefix(all_ids[text_idx], pair_mask), pair_mask
        )
        vtm_logits = model.vtm_head(video_cls, fused_text)
        vtm = gather_with_grad(F.cross_entropy(vtm_logits.float(), labels, reduction="none")).mean()

        w_nce, w_mlm, w_vtm = self.weights
        total = w_nce * egonce + w_mlm * mlm + w_vtm * vtm
        parts = {
            "loss": total.detach(),
            "egonce": egonce.detach(),
            "mlm": mlm.detach(),
            "vtm": vtm.detach(),
            "vtm_accuracy": gather((vtm_logits.argmax(-1) == labels).float()).mean(),
        }

        # Optional (ours, off in the official recipe): SimCSE on the batch's narrations, text_emb being the first
        # dropout view. Keeps a from-scratch text tower from merging narrations the video tower cannot yet tell
        # apart (time-reversed pairs), which EgoNCE alone rewards (trainer/text_warmup.py).
        if self.text_simcse_weight > 0:
            second_view = gather_with_grad(model.encode_text(batch.input_ids, batch.attention_mask))
            simcse = simcse_loss(text_emb, second_view, same_text_mask(all_ids, all_mask), self.temperature)
            total = total + self.text_simcse_weight * simcse
            parts["loss"], parts["simcse"] = total.detach(), simcse.detach()
        return total, parts


@dataclass
class FinetuneBatch:
    """This rank's fine-tuning pairs: each clip with its caption (EK-100: a sampled positive sentence; Charades-Ego:
    the action's narration) and the caption's relevancy to the clip (EK-100; 1 for Charades-Ego)."""

    video: torch.Tensor  # (b, F, 3, S, S)
    input_ids: torch.Tensor  # (b, L)
    attention_mask: torch.Tensor  # (b, L)
    relation: torch.Tensor  # (b,) float
    load_failures: torch.Tensor  # () clips of this batch that could not be read (lax mode: black frames)

    def to(self, device) -> FinetuneBatch:
        return FinetuneBatch(**{k: v.to(device, non_blocking=True) for k, v in self.__dict__.items()})


class FinetuneObjective(torch.nn.Module):
    """The dual-encoder fine-tuning loss over the global batch (rows = texts, columns = videos, pairs on the
    diagonal): "epic_mir" the adaptive max-margin ranking loss with each pair's relevancy (all-gathered like the
    embeddings), "charades" the symmetric softmax (NormSoftmax) loss. Only the towers and their projections get
    gradients; the fusion layers and heads are not used."""

    def __init__(self, model, task: str, margin: float = 0.2, temperature: float = 0.05):
        super().__init__()
        if task not in ("epic_mir", "charades"):
            raise ValueError(f"no fine-tuning loss for task {task!r}")
        self.model, self.task, self.margin, self.temperature = model, task, margin, temperature

    def forward(self, batch: FinetuneBatch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        video_emb = gather_with_grad(self.model.encode_video(batch.video))  # (N, P)
        text_emb = gather_with_grad(self.model.encode_text(batch.input_ids, batch.attention_mask))  # (N, P)
        sim = sim_matrix(text_emb, video_emb).float()  # (N, N)
        if self.task == "epic_mir":
            loss = adaptive_max_margin_loss(sim, gather(batch.relation.float()), self.margin)
        else:
            loss = norm_softmax_loss(sim, self.temperature)
        with torch.no_grad():  # how often a text's own video ranks first among the batch's videos
            accuracy = (sim.argmax(1) == torch.arange(sim.shape[0], device=sim.device)).float().mean()
        return loss, {"loss": loss.detach(), "batch_t2v_accuracy": accuracy}
