"""Test helpers: deterministic weights and the official checkpoint layout.

Weights come from numpy's PCG64 seeded per key (not torch's RNG), so the same weights can be rebuilt in any
environment, including the official code's, and the golden values stay valid across torch versions.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


class ConfigParser:
    """Stands in for the official pickled `parse_config.ConfigParser` (a foreign class in the checkpoint)."""

    def __init__(self):
        self.config = {"arch": {"type": "FrozenInTime"}}


def deterministic_tensor(key: str, shape, seed: int) -> torch.Tensor:
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    name = key.rsplit(".", 1)[-1]
    n = int(np.prod(shape)) if len(shape) else 1
    f32 = np.float32
    if "alpha" in name:  # gates: distinct, clearly non-zero
        value = f32(0.3) + f32(0.5) * rng.random(n, dtype=f32)
    elif ("LayerNorm" in key or "norm" in key.split(".")[-2:][0]) and name == "weight":
        value = f32(1.0) + f32(0.1) * rng.standard_normal(n, dtype=f32)
    else:  # weights, biases, embeddings, cls tokens, position and temporal embeddings
        value = f32(0.02) * rng.standard_normal(n, dtype=f32)
    return torch.from_numpy(value).reshape(tuple(shape))


def deterministic_state_dict(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    return {k: deterministic_tensor(k, tuple(v.shape), seed) for k, v in model.state_dict().items()}


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    model.load_state_dict(deterministic_state_dict(model, seed))
    return model


def random_tiny(seed: int):
    """A tiny EgoVLPv2 in eval mode with every weight random and non-zero gates (so cross-attention matters); the
    same weights in every process for one seed."""
    from egovlp_deploy import EgoVLPv2, EgoVLPv2Config

    torch.manual_seed(0)
    return randomize_(EgoVLPv2(EgoVLPv2Config.tiny()), seed=seed).eval()


def saved_random_tiny(directory, seed: int):
    """`random_tiny(seed)` written with save_pretrained to `directory`; returns (directory, model)."""
    model = random_tiny(seed)
    model.save_pretrained(directory)
    return directory, model


def write_official_checkpoint(state_dict: dict[str, torch.Tensor], path, max_positions: int) -> None:
    """`torch.save` in the official layout: DDP keys, the persistent position_ids buffer, a pickled config object."""
    official = {"module." + k: v for k, v in state_dict.items()}
    official["module.text_model.embeddings.position_ids"] = torch.arange(max_positions).expand(1, -1)
    torch.save(
        {
            "arch": "FrozenInTime",
            "epoch": 10,
            "state_dict": official,
            "optimizer": {},
            "monitor_best": 0.0,
            "config": ConfigParser(),
        },
        path,
    )


GOLDEN_IDS = [
    [0, 713, 2335, 11, 5, 1275, 10275, 4, 8, 2],  # full length
    [0, 100, 4716, 5, 2, 1, 1, 1, 1, 1],
]  # padded (pad id 1)


def golden_inputs(num_frames: int, batch: int, seed: int = 123):
    """Frames and token ids of the golden cases, rebuilt bit-exactly anywhere (numpy PCG64)."""
    rng = np.random.default_rng(seed)
    video = rng.standard_normal((batch, num_frames, 3, 224, 224), dtype=np.float32)
    ids = torch.tensor(GOLDEN_IDS[:batch])
    return torch.from_numpy(video), ids, ids.ne(1).long()
