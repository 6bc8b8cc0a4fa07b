"""EgoMCQ evaluation in the three modes of the official validation (EGOVLPV2_SPEC.md §8, hazard 15):
dual (cosine of the projected embeddings), fusion (VTM match probability), and ensemble (their sum).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from egovlp_deploy.checkpoint import resize_temporal_embed
from egovlp_deploy.losses import sim_matrix
from egovlp_deploy.metrics import egomcq_accuracy
from egovlp_deploy.model import EgoVLPv2

MODES = ("dual", "fusion", "ensemble")


def model_at_frames(model: EgoVLPv2, num_frames: int) -> EgoVLPv2:
    """The same weights with the temporal embedding resized to `num_frames` by the official rule."""
    if num_frames == model.config.video.num_frames:
        return model
    state = dict(model.state_dict())
    state["video_model.temporal_embed"] = resize_temporal_embed(state["video_model.temporal_embed"], num_frames)
    other = EgoVLPv2(model.config.with_num_frames(num_frames)).to(model.cls_token.device)
    other.load_state_dict(state)
    return other.eval()


def _collate(items):
    return ([it["text"] for it in items], torch.stack([it["videos"] for it in items]),
            torch.tensor([it["answer"] for it in items]), torch.tensor([it["type"] for it in items]))


@torch.no_grad()
def score_questions(model: EgoVLPv2, tokenizer, texts: list[str], videos: torch.Tensor) -> dict[str, torch.Tensor]:
    """Scores (Q, C) of each mode for Q questions with C candidate clips each; videos (Q, C, F, 3, S, S)."""
    q, c = videos.shape[:2]
    enc = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")  # dynamic length, as official
    ids, mask = enc["input_ids"].to(videos.device), enc["attention_mask"].to(videos.device)
    clips = videos.flatten(0, 1)  # (Q*C, F, 3, S, S)
    text_emb = model.encode_text(ids, mask)  # (Q, P)
    video_emb = model.encode_video(clips).view(q, c, -1)  # (Q, C, P)
    dual = torch.stack([sim_matrix(text_emb[i:i + 1], video_emb[i])[0] for i in range(q)])  # (Q, C)
    logits = model.fuse(clips, ids.repeat_interleave(c, 0), mask.repeat_interleave(c, 0)).vtm_logits
    fusion = F.softmax(logits.float(), dim=-1)[:, 1].view(q, c)
    return {"dual": dual.float(), "fusion": fusion, "ensemble": dual.float() + fusion}


def evaluate_egomcq(model: EgoVLPv2, dataset, tokenizer, device, batch_size: int = 4, num_workers: int = 0,
                    max_questions: int | None = None, progress: bool = False) -> dict[str, dict[str, float]]:
    """{'dual'|'fusion'|'ensemble': {'Inter-video': %, 'Intra-video': %}}; questions are sharded over ranks."""
    was_training = model.training
    model.eval()
    indices = list(range(len(dataset) if max_questions is None else min(max_questions, len(dataset))))
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    loader = DataLoader(Subset(dataset, indices[rank::world]), batch_size=batch_size, collate_fn=_collate,
                        num_workers=num_workers)
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc="EgoMCQ", leave=False)
    local = {m: [] for m in MODES} | {"answer": [], "type": []}
    for texts, videos, answers, types in loader:
        scores = score_questions(model, tokenizer, texts, videos.to(device))
        for m in MODES:
            local[m].append(scores[m].cpu())
        local["answer"].append(answers)
        local["type"].append(types)
    local = {k: torch.cat(v) if v else torch.empty(0) for k, v in local.items()}
    if world > 1:
        shards = [None] * world
        dist.all_gather_object(shards, local)
        local = {k: torch.cat([s[k] for s in shards if s[k].numel()]) for k in local}
    model.train(was_training)
    return {m: egomcq_accuracy(local[m], local["answer"], local["type"]) for m in MODES}
