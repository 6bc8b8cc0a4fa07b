"""The attention_backend switch: config field, run-time switch, end-to-end agreement, training fallback."""

import json

import pytest
import torch
from conftest import make_inputs

from egovlp_deploy import EgoVLPv2, EgoVLPv2Config
from egovlp_deploy.config import ConfigError
from egovlp_deploy.model.attention import (
    divided_attention,
    divided_attention_sdpa,
    multihead_attention,
    resolve_backend,
)
from official_format import randomize_

# The Triton backend runs compiled on a GPU, and in the interpreter on the CPU (conftest sets TRITON_INTERPRET=1
# only when there is no GPU): every tensor that may reach a kernel lives on this device.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_config_field_default_validation_and_json(tmp_path):
    config = EgoVLPv2Config.tiny()
    assert config.attention_backend == "auto"
    data = config.to_dict()
    data["attention_backend"] = "flash"
    with pytest.raises(ConfigError, match="attention_backend must be one of"):
        EgoVLPv2Config.from_dict(data)
    data["attention_backend"] = "sdpa"
    assert EgoVLPv2Config.from_dict(json.loads(json.dumps(data))).attention_backend == "sdpa"
    del data["attention_backend"]  # a config.json written before the field existed
    assert EgoVLPv2Config.from_dict(data).attention_backend == "auto"


def test_set_attention_backend_validates_and_is_saved(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="attention_backend"):
        tiny_model.set_attention_backend("fast")
    tiny_model.set_attention_backend("sdpa")
    assert tiny_model.video_model.blocks[-1].attn.attn_i2t.attention_backend == "sdpa"
    assert tiny_model.text_model.encoder.layer[-1].crossattention_t2i.self.attention_backend == "sdpa"
    loaded = EgoVLPv2.from_pretrained(tiny_model.save_pretrained(tmp_path / "m"))
    assert loaded.attention_backend == "sdpa"
    assert loaded.video_model.blocks[0].timeattn.attention_backend == "sdpa"


def test_auto_picks_by_device_and_triton_yields_to_autograd():
    assert resolve_backend("auto", torch.randn(2, 3)) == "reference"  # a CPU tensor
    if torch.cuda.is_available():
        assert resolve_backend("auto", torch.randn(2, 3, device="cuda")) == "triton"
    x = torch.randn(2, 3, device=DEVICE)
    assert resolve_backend("triton", x) == "triton"  # compiled on the GPU; on the CPU the tests' interpreter
    assert resolve_backend("triton", x.requires_grad_()) == "reference"
    with torch.no_grad():
        assert resolve_backend("triton", x) == "triton"
    assert resolve_backend("triton", x.detach(), dropout=0.1) == "reference"


@pytest.mark.parametrize("mode", ["time", "space"])
def test_sdpa_divided_attention_matches_reference(mode):
    q, k, v = (torch.randn(2, 3, 1 + 3 * 5, 8) for _ in range(3))
    torch.testing.assert_close(divided_attention_sdpa(q, k, v, 3, mode), divided_attention(q, k, v, 3, mode))


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_multihead_attention_backends_match_reference(backend):
    q, kv = torch.randn(2, 5, 32, device=DEVICE), torch.randn(2, 7, 64, device=DEVICE)
    k, v = kv.chunk(2, dim=-1)
    bias = torch.zeros(2, 1, 1, 7, device=DEVICE)
    bias[1, ..., 3:] = torch.finfo(torch.float32).min
    ref = multihead_attention(q, k, v, 2, 0.25, bias, "reference")
    torch.testing.assert_close(multihead_attention(q, k, v, 2, 0.25, bias, backend), ref, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def model_and_inputs():
    config = EgoVLPv2Config.tiny()
    model = randomize_(EgoVLPv2(config), seed=7).eval().to(DEVICE)
    return model, tuple(t.to(DEVICE) for t in make_inputs(config))


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_end_to_end_matches_reference(model_and_inputs, backend):
    model, (video, ids, mask) = model_and_inputs
    outputs = {}
    for name in ("reference", backend):
        model.set_attention_backend(name)
        with torch.no_grad():
            fused = model.fuse(video, ids, mask)
            outputs[name] = (
                model.encode_video(video),
                model.encode_text(ids, mask),
                fused.video_cls,
                fused.text_hidden,
                fused.vtm_logits,
            )
    model.set_attention_backend("auto")
    for ref, got in zip(outputs["reference"], outputs[backend]):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_training_with_triton_backend_gets_reference_gradients(model_and_inputs):
    """The kernels are forward-only: with gradients needed the model must transparently run the reference math."""
    model, (video, ids, mask) = model_and_inputs
    grads = {}
    for name in ("reference", "triton"):
        model.set_attention_backend(name)
        model.zero_grad()
        out = model.fuse(video, ids, mask)
        (out.vtm_logits.sum() + out.video_cls.square().sum() + model.encode_video(video).sum()).backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.set_attention_backend("auto")
    model.zero_grad()
    assert grads["reference"].keys() == grads["triton"].keys()
    for n, g in grads["reference"].items():
        torch.testing.assert_close(grads["triton"][n], g, msg=n)


def test_the_triton_backend_refuses_a_per_query_bias():
    """The kernel takes one key bias per batch row: a (B, 1, Lq, Lk) mask (a causal one, say) would keep only its
    first query's row, a silent wrong result for every other query."""
    q, k, v = (torch.randn(2, n, 64, device=DEVICE) for n in (3, 5, 5))
    causal = torch.zeros(2, 1, 3, 5, device=DEVICE)
    causal[:, :, 0, 1:] = float("-inf")
    reference = multihead_attention(q, k, v, 2, 0.125, causal, backend="reference")
    assert not torch.allclose(
        reference[:, 1],
        multihead_attention(q, k, v, 2, 0.125, causal[:, :, :1].expand(2, 1, 3, 5), backend="reference")[:, 1],
    )
    with pytest.raises(RuntimeError, match=r"takes a \(B, 1, 1, Lk\) bias, got \(2, 1, 3, 5\)"):
        multihead_attention(q, k, v, 2, 0.125, causal, backend="triton")
    per_key = torch.zeros(2, 1, 1, 5, device=DEVICE)
    per_key[1, ..., 3:] = float("-inf")
    want = multihead_attention(q, k, v, 2, 0.125, per_key, backend="reference")
    torch.testing.assert_close(multihead_attention(q, k, v, 2, 0.125, per_key, backend="triton"), want)
