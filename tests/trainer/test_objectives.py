"""The pre-training objective draws its VTM negatives at the configured temperature (default: EgoNCE's, official)."""

import pytest
import torch
from conftest import make_inputs

from egovlp_deploy.losses import sample_vtm_pairs
from egovlp_deploy.trainer import objectives
from egovlp_deploy.trainer.objectives import PretrainObjective, StepBatch


def _batch(config, b=12):
    video, ids, mask = make_inputs(config, batch=b, length=9, seed=3)
    g = torch.Generator().manual_seed(4)
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    return StepBatch(
        video=video,
        input_ids=ids,
        attention_mask=mask,
        verb=torch.eye(3)[torch.randint(3, (b,), generator=g)],
        noun=torch.eye(4)[torch.randint(4, (b,), generator=g)],
        mlm_input_ids=ids,
        mlm_labels=labels,
        load_failures=torch.tensor(0),
    )


@pytest.mark.parametrize("draw_temperature", [None, 0.7])
def test_vtm_negatives_are_drawn_at_the_configured_temperature(tiny_model, monkeypatch, draw_temperature):
    calls = []

    def recording(x, mask_bool, row_offset, local_batch, temperature, generator):
        calls.append((x.clone(), mask_bool.clone(), temperature))
        return sample_vtm_pairs(x, mask_bool, row_offset, local_batch, temperature, generator)

    monkeypatch.setattr(objectives, "sample_vtm_pairs", recording)
    objective = PretrainObjective(tiny_model, temperature=0.05, seed=2, vtm_negative_temperature=draw_temperature)
    objective(_batch(tiny_model.config), step=5)
    ((x, mask_bool, temperature),) = calls
    assert temperature == (0.05 if draw_temperature is None else draw_temperature)

    assert not mask_bool.all(), "no admissible negative: the batch does not exercise the draw"

    # the temperature matters for this batch: the same generator states draw other negatives at another one
    def draws(t):
        return [sample_vtm_pairs(x, mask_bool, 0, x.shape[0], t, torch.Generator().manual_seed(s)) for s in range(8)]

    assert any(
        not torch.equal(a.text_index, b.text_index) or not torch.equal(a.video_index, b.video_index)
        for a, b in zip(draws(0.001), draws(1000.0))
    )


def test_draw_temperature_schedule(tiny_model):
    official = PretrainObjective(tiny_model)
    assert official.draw_temperature(0.05, 0) == official.draw_temperature(0.05, 999) == 0.05
    constant = PretrainObjective(tiny_model, vtm_negative_temperature=0.5)
    assert constant.draw_temperature(0.05, 0) == constant.draw_temperature(0.05, 999) == 0.5
    annealed = PretrainObjective(tiny_model, vtm_negative_temperature=1.0, vtm_negative_anneal_steps=100)
    assert annealed.draw_temperature(0.05, 0) == pytest.approx(1.0)
    assert annealed.draw_temperature(0.05, 50) == pytest.approx(0.05**0.5)  # geometric: halfway in log space
    assert annealed.draw_temperature(0.05, 100) == pytest.approx(0.05)
    assert annealed.draw_temperature(0.05, 150) == pytest.approx(0.05)  # held at the end


def test_text_simcse_term_adds_weighted_simcse_over_the_batch_narrations(tiny_model):
    """With dropout off (eval mode) both SimCSE views are the dual text embedding: the added term is then the
    cross-entropy of its own cosine matrix / T against the diagonal, duplicates of a narration left out."""
    batch = _batch(tiny_model.config)
    batch.input_ids[3], batch.attention_mask[3] = batch.input_ids[0], batch.attention_mask[0]  # a repeated narration
    batch.mlm_input_ids = batch.input_ids
    official = PretrainObjective(tiny_model, temperature=0.05, seed=2)
    with_simcse = PretrainObjective(tiny_model, temperature=0.05, seed=2, text_simcse_weight=0.5)
    total, parts = official(batch, step=5)
    total_s, parts_s = with_simcse(batch, step=5)
    for key in ("egonce", "mlm", "vtm"):
        assert torch.equal(parts[key], parts_s[key])

    with torch.no_grad():
        e = torch.nn.functional.normalize(tiny_model.encode_text(batch.input_ids, batch.attention_mask), dim=-1)
    logits = e @ e.T / 0.05
    expected = []
    for i in range(len(logits)):
        keep = [j for j in range(len(logits)) if j == i or {i, j} != {0, 3}]
        expected.append(-(logits[i, i] - torch.logsumexp(logits[i, keep], 0)))
    expected = torch.stack(expected).mean()
    assert parts_s["simcse"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert (total_s - total).item() == pytest.approx(0.5 * expected.item(), rel=1e-4)

    # the term trains the text tower
    tiny_model.zero_grad()
    (total_s - total).backward()
    grads = [p.grad for n, p in tiny_model.named_parameters() if n.startswith("text_model.embeddings")]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_non_finite_weights_give_a_non_finite_loss_for_the_nan_guard(tiny_model):
    """A too-large step can leave inf/NaN weights: the VTM draw must not crash on the NaN similarities (it did, in
    multinomial, past the trainer's NaN guard); the loss is non-finite and the guard skips the step."""
    with torch.no_grad():
        for name, param in tiny_model.named_parameters():
            if name.startswith("vid_proj"):
                param.fill_(float("nan"))
    loss, parts = PretrainObjective(tiny_model, seed=2)(_batch(tiny_model.config, b=4), step=1)
    assert not torch.isfinite(loss) and not torch.isfinite(parts["egonce"])
