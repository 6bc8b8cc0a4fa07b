"""The SimCSE text warm-up: it separates narrations that differ by one verb, touches only the text tower, is
deterministic and leaves the global RNG where it was (so resume stays exact)."""

import torch
import torch.nn.functional as F

from egovlp_deploy import EgoVLPv2, EgoVLPv2Config
from egovlp_deploy import vocabulary as vocab
from egovlp_deploy.tokenizer import load_tokenizer
from egovlp_deploy.trainer.text_warmup import simcse_warmup, text_tower_parameters

PAIRS = [
    (vocab.narration("pick up", c, n), vocab.narration("put down", c, n))
    for c in ("red", "blue", "green")
    for n in ("cup", "box", "jar")
]


def _model(seed=0):
    torch.manual_seed(seed)
    return EgoVLPv2(EgoVLPv2Config.tiny(vocab_size=1000))


def _pair_cosine(model, tok):
    model.eval()
    with torch.no_grad():
        a = [p[0] for p in PAIRS]
        b = [p[1] for p in PAIRS]
        ea = tok(a, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
        eb = tok(b, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
        za = F.normalize(model.encode_text(ea["input_ids"], ea["attention_mask"]), dim=-1)
        zb = F.normalize(model.encode_text(eb["input_ids"], eb["attention_mask"]), dim=-1)
    return float((za * zb).sum(-1).mean())


def test_warmup_separates_time_reversed_narrations_and_touches_only_the_text_tower(demo_tokenizer_dir):
    tok = load_tokenizer(demo_tokenizer_dir)
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cos_before = _pair_cosine(model, tok)
    corpus = [t for p in PAIRS for t in p] + vocab.corpus()[:120]
    losses = simcse_warmup(model, tok, corpus, steps=150, lr=1e-3, max_length=16, seed=0)
    cos_after = _pair_cosine(model, tok)
    assert cos_before > 0.9  # a random tower maps "picks up X" and "puts down X" almost together
    assert cos_after < cos_before - 0.3, (cos_before, cos_after)
    assert losses[-1] < losses[0] - 0.5, (losses[0], losses[-1])
    text = {id(p) for p in text_tower_parameters(model)}
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p)
        if id(p) not in text:
            assert not changed, f"{name} is not part of the text tower but changed"
        assert p.grad is None
    assert any(n.startswith("txt_proj.") for n, p in model.named_parameters() if id(p) in text)
    assert not any("alpha" in n or "cross_modal" in n for n, p in model.named_parameters() if id(p) in text)


def test_warmup_uses_its_own_dropout_when_the_model_has_none(demo_tokenizer_dir):
    """With model.text_dropout 0 the two SimCSE views would be identical; the warm-up still separates the pairs
    (dropout 0.1 during the warm-up only) and hands the model back with its own rate."""
    tok = load_tokenizer(demo_tokenizer_dir)
    corpus = [t for p in PAIRS for t in p] + vocab.corpus()[:120]
    model = _model()
    dropouts = [m for m in model.text_model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts
    for m in dropouts:
        m.p = 0.0
    cos_before = _pair_cosine(model, tok)
    losses = simcse_warmup(model, tok, corpus, steps=150, lr=1e-3, max_length=16, seed=0)
    assert all(m.p == 0.0 for m in dropouts)
    assert _pair_cosine(model, tok) < cos_before - 0.3
    assert losses[-1] > 0.1  # identical views would drive the loss to ~0 (measured: 0.00)


def test_warmup_is_deterministic_and_rng_neutral(demo_tokenizer_dir):
    tok = load_tokenizer(demo_tokenizer_dir)
    corpus = vocab.corpus()[:100]
    a, b = _model(), _model()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    simcse_warmup(a, tok, corpus, steps=5, lr=1e-3, max_length=16, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # the training run's random stream is untouched
    simcse_warmup(b, tok, list(reversed(corpus)), steps=5, lr=1e-3, max_length=16, seed=7)  # order-independent
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), n


def test_warmup_needs_two_distinct_narrations(demo_tokenizer_dir):
    import pytest

    with pytest.raises(ValueError, match="2 distinct"):
        simcse_warmup(_model(), load_tokenizer(demo_tokenizer_dir), ["#C C picks up the red cup"] * 3, 1, 1e-3, 16, 0)


def test_from_scratch_init_options_reach_the_model():
    """model.temporal_embed_std and model.cross_gate_init change a fresh model's init, and only that."""
    from egovlp_deploy.trainer.config import TrainConfig
    from egovlp_deploy.trainer.train import build_model

    base = {"model": {"preset": "tiny"}}
    torch.manual_seed(0)
    plain = build_model(TrainConfig.from_dict(base), 1000)
    torch.manual_seed(0)
    tuned = build_model(
        TrainConfig.from_dict({"model": {"preset": "tiny", "temporal_embed_std": 0.5, "cross_gate_init": 0.25}}), 1000
    )
    assert torch.count_nonzero(plain.video_model.temporal_embed) == 0  # official: zeros
    te = tuned.video_model.temporal_embed
    assert te.abs().max() <= 1.0 + 1e-6 and 0.3 < float(te.std()) < 0.6  # trunc-normal(0.5) cut at 2 std
    for (name, p), (_, q) in zip(plain.named_parameters(), tuned.named_parameters()):
        if name.endswith(("alpha_i2t", "alpha_t2i")):
            assert torch.all(q == 0.25), name
        elif name != "video_model.temporal_embed":
            assert torch.equal(p, q), name
