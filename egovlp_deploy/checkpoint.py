"""Checkpoint I/O: our safetensors format, and the official `.pth` files read without executing pickled code.

Official files are `torch.save({'state_dict': {'module.' + k: v}, 'config': <pickled ConfigParser>, ...})` zip
archives (EGOVLPV2_SPEC.md §6). We read the archive ourselves: `data.pkl` goes through a restricted unpickler that
resolves only the handful of globals that rebuild tensors and containers, and turns every other global (the
pickled config object, or `os.system` in a malicious file) into an inert placeholder that is never called.
"""

from __future__ import annotations

import io
import os
import pickle
import tempfile
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .config import EgoVLPv2Config, TextConfig, VideoConfig


class CheckpointError(ValueError):
    """A checkpoint is unreadable, truncated, foreign, or does not fit the model."""


# -- atomic writes ----------------------------------------------------------------------------------------------
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename: readers never see a partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_safetensors(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, metadata=None) -> None:
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_safetensors(path: str | os.PathLike, map_location="cpu") -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from exc


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str,
                           assign: bool = False) -> None:
    """Load every key exactly; on any mismatch raise one error that lists missing, unexpected and misshapen keys.

    Tensors are cast to the model's dtypes (a half-precision file loads into an fp32 model). `assign=True` adopts
    the tensors instead of copying them (for a model built on the meta device)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshapen = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state_dict))
        if state_dict[k].shape != expected[k].shape
    ]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", misshapen)):
        if items:
            shown = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model; " + "; ".join(problems))
    state_dict = {k: v.to(expected[k].dtype) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=assign)


# -- safe reading of torch zip checkpoints ---------------------------------------------------------------------
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class Inert:
    """Stands in for any global a checkpoint names that we do not allow. It records its arguments, runs nothing."""

    qualname = "?"

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value):
        self.__dict__.setdefault("list", []).append(value)

    def extend(self, values):
        self.__dict__.setdefault("list", []).extend(values)

    def __repr__(self):
        return f"<inert {self.qualname}>"


def _inert_class(module: str, name: str) -> type:
    return type(f"Inert_{name}", (Inert,), {"qualname": f"{module}.{name}"})


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *rest):
    if not isinstance(storage, torch.Tensor):
        raise CheckpointError("malformed checkpoint: a tensor refers to something that is not a storage")
    return storage.as_strided(tuple(size), tuple(stride), storage_offset)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, *rest):
    return _rebuild_tensor(storage.view(dtype) if storage.dtype != dtype else storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    return data


_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch", "Size"): tuple,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix, self.storages = archive, prefix, {}
        self.foreign: list[str] = []

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)  # a dtype object, inert data
        self.foreign.append(f"{module}.{name}")
        return _inert_class(module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointError(f"malformed checkpoint: unknown persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid[:5]
        dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else torch.uint8
        if key not in self.storages:
            try:
                raw = self.archive.read(f"{self.prefix}/data/{key}")
            except KeyError as exc:
                raise CheckpointError(f"truncated checkpoint: storage {key} is missing") from exc
            itemsize = torch.empty((), dtype=dtype).element_size()
            if len(raw) != numel * itemsize:
                raise CheckpointError(f"truncated checkpoint: storage {key} has {len(raw)} bytes, expected "
                                      f"{numel * itemsize}")
            self.storages[key] = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return self.storages[key]


def read_torch_checkpoint(path: str | os.PathLike) -> Any:
    """Read a `torch.save` zip archive like `torch.load`, but without running any pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise CheckpointError(
            f"{path}: not a torch zip checkpoint, or truncated (zip directory unreadable: {exc})"
        ) from exc
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: not a torch checkpoint (expected one data.pkl, found {len(pickles)})")
        prefix = pickles[0][: -len("/data.pkl")]
        byteorder = f"{prefix}/byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).strip() not in (b"little", b""):
            raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
        try:
            unpickler = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), archive, prefix)
            return unpickler.load()
        except CheckpointError:
            raise
        except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, ValueError, TypeError, KeyError, IndexError,
                AttributeError, RuntimeError, zlib.error) as exc:
            raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({type(exc).__name__}: {exc})") from exc


# -- official EgoVLPv2 checkpoints ----------------------------------------------------------------------------
_DERIVED_BUFFERS = ("text_model.embeddings.position_ids",)  # persistent in the official code, but just arange()


def official_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The official file's state dict with DDP's `module.` prefix removed, checked to be EgoVLPv2."""
    obj = read_torch_checkpoint(path)
    state_dict = obj.get("state_dict") if isinstance(obj, dict) else None
    if state_dict is None and isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state_dict = obj  # a bare state dict
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path}: not an EgoVLPv2 checkpoint (no 'state_dict' entry; found {type(obj).__name__})")
    out = {}
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: state_dict entry {key!r:.60} is not a named tensor")
        out[key[len("module."):] if key.startswith("module.") else key] = value
    for needed in ("video_model.pos_embed", "video_model.temporal_embed", "text_model.embeddings.word_embeddings.weight"):
        if needed not in out:
            raise CheckpointError(f"{path}: not an EgoVLPv2 checkpoint (no {needed}; keys start {sorted(out)[:3]})")
    return out


def _count(state_dict, prefix: str) -> int:
    indices = {k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix)}
    return len([i for i in indices if i.isdigit()])


def config_from_state_dict(sd: dict[str, torch.Tensor], num_frames: int, head_dim: int = 64) -> EgoVLPv2Config:
    """Read the architecture off the weight shapes (head count is not stored: official models use 64-wide heads)."""
    try:
        width = sd["video_model.pos_embed"].shape[-1]
        patches = sd["video_model.pos_embed"].shape[1] - 1
        patch = sd["video_model.patch_embed.proj.weight"].shape[-1]
        side = int(round(patches ** 0.5))
        vocab, hidden = sd["text_model.embeddings.word_embeddings.weight"].shape
        if "txt_proj.0.weight" in sd:
            projection, proj_dim = "big", sd["txt_proj.0.weight"].shape[0]
        elif "txt_proj.1.weight" in sd:
            projection, proj_dim = "small", sd["txt_proj.1.weight"].shape[0]
        else:
            raise CheckpointError("no txt_proj weights (neither the big nor the small projection)")
        video = VideoConfig(
            img_size=side * patch, patch_size=patch, in_chans=sd["video_model.patch_embed.proj.weight"].shape[1],
            num_frames=num_frames, width=width, depth=_count(sd, "video_model.blocks."), heads=width // head_dim,
            mlp_ratio=sd["video_model.blocks.0.mlp.fc1.weight"].shape[0] / width,
        )
        text = TextConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=_count(sd, "text_model.encoder.layer."),
            num_attention_heads=hidden // head_dim,
            intermediate_size=sd["text_model.encoder.layer.0.intermediate.dense.weight"].shape[0],
            max_position_embeddings=sd["text_model.embeddings.position_embeddings.weight"].shape[0],
            type_vocab_size=sd["text_model.embeddings.token_type_embeddings.weight"].shape[0],
        )
        fused = {k.split(".")[3] for k in sd if k.startswith("text_model.encoder.layer.") and k.endswith(".alpha_t2i")}
        return EgoVLPv2Config(video=video, text=text, num_fuse_blocks=len(fused), projection=projection,
                              projection_dim=proj_dim)
    except KeyError as exc:
        raise CheckpointError(f"not an EgoVLPv2 checkpoint: missing {exc.args[0]}") from exc
    except ValueError as exc:  # ConfigError from inconsistent shapes
        raise CheckpointError(f"inconsistent EgoVLPv2 checkpoint: {exc}") from exc


def resize_temporal_embed(temporal_embed: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The official `_inflate_positional_embeds`: truncate if the checkpoint has more frames, else bilinear
    interpolation with align_corners=True over (frames, dim), which is linear interpolation along time."""
    loaded = temporal_embed.shape[1]
    if loaded == num_frames:
        return temporal_embed
    if loaded > num_frames:
        return temporal_embed[:, :num_frames]
    dim = temporal_embed.shape[2]
    return F.interpolate(temporal_embed.unsqueeze(0).float(), (num_frames, dim), mode="bilinear",
                         align_corners=True).squeeze(0).to(temporal_embed.dtype)


def load_official_state_dict(path, num_frames: int | None = None, config: EgoVLPv2Config | None = None):
    """(state dict ready for `EgoVLPv2(config)`, config) from an official checkpoint file."""
    sd = official_state_dict(path)
    ckpt_frames = sd["video_model.temporal_embed"].shape[1]
    if num_frames is not None and (not isinstance(num_frames, int) or num_frames <= 0):
        raise CheckpointError(f"num_frames must be a positive integer, got {num_frames!r}")
    frames = num_frames or (config.video.num_frames if config is not None else ckpt_frames)
    if config is None:
        config = config_from_state_dict(sd, frames)
    else:
        config = config.with_num_frames(frames)
    for key in _DERIVED_BUFFERS:
        buf = sd.pop(key, None)
        if buf is not None and not torch.equal(buf.reshape(-1), torch.arange(buf.numel(), dtype=buf.dtype)):
            raise CheckpointError(f"{path}: {key} is not 0..n-1; this is not an EgoVLPv2 text model")
    sd["video_model.temporal_embed"] = resize_temporal_embed(sd["video_model.temporal_embed"], frames)
    return sd, config
