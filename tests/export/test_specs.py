import pytest
import torch

from egovlp_deploy.export.specs import (
    AOTI_ROLES,
    ROLES,
    check_roles,
    example_inputs,
    export_patches,
    role_module,
    static_dims,
)


def test_role_table_is_consistent(tiny_config):
    assert set(AOTI_ROLES) <= set(ROLES)
    sizes = static_dims(tiny_config)
    for spec in ROLES.values():
        names = spec.input_names + spec.output_names
        assert len(set(spec.input_names)) == len(spec.input_names)
        assert not set(spec.input_names) & set(spec.output_names), names
        for t in spec.inputs + spec.outputs:
            for d in t.dims:
                assert isinstance(d, int) or d in sizes or d in ("batch", "text_len"), (spec.name, d)
    with pytest.raises(ValueError, match="unknown role"):
        check_roles(["video_encoder", "nope"])


@pytest.mark.parametrize("role", list(ROLES))
def test_role_modules_match_the_model(tiny_model, role):
    inputs = example_inputs(tiny_model, role, 2, 6, seed=3)
    with torch.no_grad(), export_patches(tiny_model):
        out = role_module(tiny_model, role)(**inputs)
    out = out if isinstance(out, tuple) else (out,)
    sizes = {**static_dims(tiny_model.config), "batch": 2, "text_len": 6}
    for t, x in zip(ROLES[role].outputs, out):
        assert tuple(x.shape) == t.shape(sizes)
    with torch.no_grad():
        if role == "text_encoder":  # one pass gives the same embedding as encode_text
            torch.testing.assert_close(
                out[0], tiny_model.encode_text(inputs["input_ids"], inputs["attention_mask"]), rtol=1e-5, atol=1e-6
            )
        if role == "fusion":
            ref = tiny_model.fuse(inputs["video"], inputs["input_ids"], inputs["attention_mask"])
            torch.testing.assert_close(out[0], ref.vtm_logits)


def test_patcher_restores_the_model(tiny_model):
    tiny_model.set_attention_backend("sdpa")
    with export_patches(tiny_model):
        assert tiny_model.attention_backend == "reference"
        tiny_model._check_text(None, None)  # checks are off inside
    assert tiny_model.attention_backend == "sdpa"
    from egovlp_deploy.model.egovlp import InputError

    with pytest.raises(InputError):
        tiny_model._check_text(torch.zeros(1, 3), torch.zeros(1, 3))
