"""The activations a RoBERTa config may name in `hidden_act`, by Hugging Face's names, so that building the model
needs no `transformers` import. Each entry computes exactly what `transformers.activations.ACT2FN[name]` computes
(tests/test_activations.py compares them bit for bit)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,  # the erf form: roberta-base and the EgoVLPv2 checkpoints
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
}
ACTIVATION_NAMES = tuple(_ACTIVATIONS)


def activation(name: str) -> nn.Module:
    """A new module for the activation called `name` (one of ACTIVATION_NAMES)."""
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATION_NAMES)}") from None
