"""An unsupervised warm-up of a from-scratch text tower (SimCSE) on the training narrations, before pre-training.

Why: the official recipe starts from a pretrained RoBERTa, whose features already tell "picks up the cup" from "puts
down the cup". A randomly initialised text tower does not (its embeddings of the two start nearly parallel), and
EgoNCE then keeps them together: while the video tower cannot yet see the direction of a motion, the fastest way to
lower the loss is to make the text tower ignore the verb too, and the video tower never gets a direction target, so
it stays blind to frame order. SimCSE (Gao et al., 2021: each narration against itself under two dropout masks, the
batch's other narrations as negatives) spreads the narrations apart in a few hundred cheap text-only steps;
`optim.lr_mult_text` then slows the text tower's collapsing them again before the video tower catches up, and
`optim.text_freeze_steps` stops it outright for the first steps. The runs that learn frame order are those in which
the time-reversed narrations stay apart (TRAINING_LOG.md). `objective.text_simcse_weight` keeps the same loss on
during pre-training (trainer/objectives.py), which the tiny recipe uses instead of the freeze.

Deterministic and RNG-neutral: the warm-up runs under a forked global RNG seeded from `seed`, so it draws the same
batches and dropout masks on every rank and leaves the training run's random stream untouched (resume stays exact).
"""

from __future__ import annotations

import torch

from egovlp_deploy.losses import simcse_loss
from egovlp_deploy.model import EgoVLPv2

from .optim import is_text_tower


def text_tower_parameters(model: EgoVLPv2) -> list[torch.nn.Parameter]:
    """The dual text path: RoBERTa layers and embeddings (cross-attention excluded) and the text projection."""
    return [p for name, p in model.named_parameters() if is_text_tower(name)]


def simcse_warmup(
    model: EgoVLPv2,
    tokenizer,
    narrations: list[str],
    steps: int,
    lr: float,
    max_length: int,
    seed: int,
    batch_size: int = 64,
    temperature: float = 0.05,
    dropout: float = 0.1,
    log=None,
) -> list[float]:
    """Train the text tower with unsupervised SimCSE on the distinct `narrations`; returns the per-step losses.

    `dropout` is SimCSE's augmentation (its paper's 0.1): the text tower's dropout runs at this rate during the
    warm-up whatever the model's own rate (a run with `model.text_dropout: 0` would otherwise compare each narration
    with an identical copy of itself, and the warm-up would learn nothing about the words)."""
    texts = sorted(set(narrations))
    if len(texts) < 2:
        raise ValueError(f"the text warm-up needs at least 2 distinct narrations, got {len(texts)}")
    params = text_tower_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0)
    device = next(model.parameters()).device
    was_training = model.training
    model.train()  # dropout is the augmentation
    dropouts = [m for m in model.text_model.modules() if isinstance(m, torch.nn.Dropout)]
    rates = [m.p for m in dropouts]
    for m in dropouts:
        m.p = dropout
    losses = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        for step in range(steps):
            pick = torch.randperm(len(texts), generator=generator)[:batch_size].tolist()
            enc = tokenizer(
                [texts[i] for i in pick],
                padding="max_length",
                max_length=max_length,
                truncation=True,
                return_tensors="pt",
            )
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            loss = simcse_loss(model.encode_text(ids, mask), model.encode_text(ids, mask), temperature=temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if log is not None and (step + 1) % 50 == 0:
                log(f"text warm-up {step + 1}/{steps}: SimCSE loss {losses[-1]:.3f}")
    model.train(was_training)
    for m, rate in zip(dropouts, rates):
        m.p = rate
    for p in params:  # no optimizer state or gradient leaks into the main run
        p.grad = None
    return losses
