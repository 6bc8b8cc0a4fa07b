"""The model's activations equal Hugging Face's ACT2FN entries of the same name, bit for bit (the model no longer
imports transformers to get them), and an unknown `hidden_act` is a config error."""

import pytest
import torch

from egovlp_deploy import ConfigError, EgoVLPv2Config
from egovlp_deploy.activations import ACTIVATION_NAMES, activation


@pytest.mark.parametrize("name", ACTIVATION_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_activation_equals_hugging_face(name, dtype):
    act2fn = pytest.importorskip("transformers.activations").ACT2FN
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)).to(dtype) * 6
    assert torch.equal(activation(name)(x), act2fn[name](x))


def test_unknown_activation_is_a_config_error():
    config = EgoVLPv2Config.tiny()
    config.text.hidden_act = "gelu_10"
    with pytest.raises(ConfigError, match="hidden_act"):
        config.validate()
    with pytest.raises(ValueError, match="unknown activation"):
        activation("gelu_10")
