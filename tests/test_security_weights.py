"""Weight files that declare what the loaders do not expect: a floating-point dtype torch cannot check or cast
(float8, float4), a Hugging Face config.json nested past Python's recursion limit and a ViT .npz of strings or
records are each the loader's own error, never a NotImplementedError, RecursionError or TypeError from inside it."""

import numpy as np
import pytest
import torch

from egovlp_deploy import EgoVLPv2, EgoVLPv2Config
from egovlp_deploy.checkpoint import CheckpointError, load_state_dict_strict, save_safetensors
from egovlp_deploy.pretrained_init import PretrainedInitError, fill_by_name, init_text_tower, read_vit_npz

_ODD_FLOATS = [torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float4_e2m1fn_x2]


def _as(dtype, shape):
    if dtype == torch.float4_e2m1fn_x2:  # no cast from float32: reinterpret zero bytes
        return torch.zeros(shape, dtype=torch.uint8).view(dtype)
    return torch.zeros(shape).to(dtype)


@pytest.mark.parametrize("dtype", _ODD_FLOATS, ids=str)
def test_strict_load_names_a_weight_dtype_it_cannot_check(dtype):
    model = torch.nn.Linear(2, 2)
    state = {"weight": _as(dtype, (2, 2)), "bias": torch.zeros(2)}
    with pytest.raises(CheckpointError, match=r"wrong dtypes: weight: checkpoint torch\.float"):
        load_state_dict_strict(model, state, "hostile.safetensors")


@pytest.mark.parametrize("dtype", _ODD_FLOATS, ids=str)
def test_tower_fill_names_a_weight_dtype_it_cannot_check(dtype):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(PretrainedInitError, match="unusable tensor"):
        fill_by_name(model, "0.", {"weight": _as(dtype, (2, 2))}, "video", "hostile.pth")


def test_a_float8_safetensors_checkpoint_is_a_checkpoint_error(tmp_path):
    model = EgoVLPv2(EgoVLPv2Config.tiny())
    model.save_pretrained(tmp_path / "m")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key].to(torch.float8_e4m3fn)
    (tmp_path / "m" / "MANIFEST.json").unlink(missing_ok=True)
    save_safetensors(state, tmp_path / "m" / "model.safetensors")
    with pytest.raises(CheckpointError, match="wrong dtypes"):
        EgoVLPv2.from_pretrained(tmp_path / "m")


def test_text_tower_config_nested_too_deeply_is_a_pretrained_init_error(tmp_path):
    model = EgoVLPv2(EgoVLPv2Config.tiny())
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(PretrainedInitError, match="nested too deeply"):
        init_text_tower(model, tmp_path)


@pytest.mark.parametrize(
    "array",
    [np.array(["abc"] * 4), np.zeros(4, dtype=[("a", "<f4")]), np.zeros(4, dtype="datetime64[s]")],
    ids=["strings", "records", "dates"],
)
def test_vit_npz_of_values_torch_cannot_read_is_a_pretrained_init_error(tmp_path, array):
    path = tmp_path / "vit.npz"
    np.savez(path, **{"embedding/kernel": array, "embedding/bias": array})
    with pytest.raises(PretrainedInitError, match="embedding/kernel holds .* values, not numbers"):
        read_vit_npz(path)
