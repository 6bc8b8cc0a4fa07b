"""AdamW with the official parameter groups and the cosine schedule with warm-up (official set_schedule and trainer).

Groups (official `set_schedule`): {backbone, heads, cross-modal} x {decay, no decay}.
- no decay: names containing bias, LayerNorm.*, norm.*, norm1.*, norm2.* (so norm3, norm_i2t_i, cls tokens,
  pos/temporal embeddings and the gates alpha_i2t / alpha_t2i DO get weight decay, as in the official groups);
- heads (mlm_score, itm_score, txt_proj, vid_proj): lr x lr_mult_head;
- cross-modal (cross_modal*, *i2t*, *t2i*, the gates included): lr x lr_mult_cross_modal;
- ours, 1 (official) unless set: the text tower (text_model.* outside cross-attention, txt_proj) x lr_mult_text,
  on top of the above, and held at lr 0 for the first text_freeze_steps (trainer/text_warmup.py says when they help).
The optimizer is torch's AdamW (eps 1e-8, betas 0.9/0.98); the official one is transformers' deprecated AdamW, which
applies the decoupled decay after rather than before the Adam step (a difference of order lr^2 * wd).
"""

from __future__ import annotations

import math

import torch

NO_DECAY = (
    "bias",
    "LayerNorm.bias",
    "LayerNorm.weight",
    "norm.bias",
    "norm.weight",
    "norm1.bias",
    "norm1.weight",
    "norm2.bias",
    "norm2.weight",
)
HEADS = ("mlm_score", "itm_score", "txt_proj", "vid_proj")
CROSS_MODAL = ("cross_modal", "i2t", "t2i")


def is_text_tower(name: str) -> bool:
    """The dual text path: RoBERTa outside cross-attention, and the text projection (lr_mult_text, text warm-up)."""
    return name.startswith(("text_model.", "txt_proj.")) and not any(c in name for c in CROSS_MODAL)


def parameter_groups(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    lr_mult_head: float,
    lr_mult_cross_modal: float,
    lr_mult_text: float = 1.0,
    split_text: bool = False,
) -> list[dict]:
    """The optimizer groups; the text tower gets groups of its own (`text_tower: True`, named '<kind>/text/...') when
    lr_mult_text != 1 or split_text (a schedule of its own: text_freeze_steps)."""
    groups: dict[tuple[str, bool, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        head = any(h in name for h in HEADS)
        cross = any(c in name for c in CROSS_MODAL)
        if head and cross:  # the official grouping drops such a parameter silently; none exist, keep it that way
            raise ValueError(f"parameter {name} is both a head and cross-modal")
        kind = "head" if head else "cross_modal" if cross else "backbone"
        decay = not any(nd in name for nd in NO_DECAY)
        mult = {"head": lr_mult_head, "cross_modal": lr_mult_cross_modal, "backbone": 1.0}[kind]
        text = (lr_mult_text != 1.0 or split_text) and is_text_tower(name)
        if text:
            mult *= lr_mult_text
        group = groups.setdefault(
            (kind, decay, text),
            {
                "params": [],
                "names": [],
                "lr": lr * mult,
                "weight_decay": weight_decay if decay else 0.0,
                "text_tower": text,
                "group": f"{kind}{'/text' if text else ''}/{'decay' if decay else 'no_decay'}",
            },
        )
        group["params"].append(param)
        group["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(
    model, lr, weight_decay, lr_mult_head, lr_mult_cross_modal, lr_mult_text: float = 1.0, split_text: bool = False
) -> torch.optim.AdamW:
    # torch's AdamW checks only its default weight decay, not the per-group ones: a negative one would grow weights
    if not (math.isfinite(lr) and lr > 0 and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"AdamW needs a finite lr > 0 and weight_decay >= 0, got lr {lr}, weight_decay {weight_decay}")
    groups = parameter_groups(model, lr, weight_decay, lr_mult_head, lr_mult_cross_modal, lr_mult_text, split_text)
    for g in groups:
        del g["names"]
    return torch.optim.AdamW(groups, lr=lr, eps=1e-8, betas=(0.9, 0.98))


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int) -> float:
    """transformers' get_cosine_schedule_with_warmup factor (num_cycles 0.5)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_scheduler(
    optimizer, warmup_steps: int, total_steps: int, text_freeze_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine with warm-up for every group; the text tower's groups (`text_tower`) at 0 for the first
    text_freeze_steps steps, then back on the same curve."""

    def factor(step: int) -> float:
        return cosine_with_warmup(step, warmup_steps, total_steps)

    def frozen_then_factor(step: int) -> float:
        return 0.0 if step < text_freeze_steps else factor(step)

    if text_freeze_steps and not any(g.get("text_tower") for g in optimizer.param_groups):
        raise ValueError("text_freeze_steps needs the text tower in groups of its own (build_optimizer split_text)")
    lambdas = [
        frozen_then_factor if text_freeze_steps and g.get("text_tower") else factor for g in optimizer.param_groups
    ]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
