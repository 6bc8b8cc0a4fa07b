"""Initialise the two towers of a fresh EgoVLPv2 from local pretrained files, as the official training recipe does.

The official model starts from an ImageNet ViT-B/16 and from `roberta-base`; this module reads both from files on
disk (nothing is downloaded) and fills our parameters by the official rules:

Video tower (`init_video_tower`): the official code builds the SpaceTimeTransformer with `time_init='zeros'`, drops
its classifier (`head`, `pre_logits`), strips DDP's `module.` prefix from the ViT state dict and loads it with
`load_state_dict(strict=False)`. So a parameter is filled iff the ViT file has a key of the same name; a key present
in both with different shapes is an error (torch raises on it even with strict=False), and nothing is resized (the
official code never resizes `pos_embed`: it only interpolates `temporal_embed` when loading an EgoVLPv2 checkpoint,
and raises on a `pos_embed` of another size). Filled: `patch_embed.proj`, `cls_token`, `pos_embed`, each block's
`norm1`, `attn.qkv`, `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`, and the final `norm`. Left at their own init: the
temporal attention (`timeattn`, zeros per time_init), `temporal_embed`, `norm3`, and the fusion blocks' video<-text
cross-attention. Accepted files: timm's `.pth` (`jx_vit_base_p16_224-80ecf9dd.pth`), a timm `model.safetensors`
(both timm key names), and Google's `.npz` (jax/big_vision names, converted to timm names the way timm's own npz
loader does; unlike timm, a `pos_embed` of another grid is an error here too, by the official rule above).

Text tower (`init_text_tower`): the official code calls `RobertaModel.from_pretrained("roberta-base")` on its fused
RoBERTa. Hugging Face strips the checkpoint's `roberta.` prefix, fills every parameter whose name matches, ignores
the rest (`lm_head.*`, the `pooler.dense` the official pooler does not have, the `position_ids` buffer) and gives the
missing ones `_init_weights`: N(0, 0.02) Linear weights, zero biases. The gates `alpha_t2i` are plain Parameters that
`_init_weights` does not touch, so they keep their constructor value 0. Our `RobertaTextModel.reset_parameters` is
that same `_init_weights`, so the cross-attention and gates are left as the model built them. The directory's
`config.json` must describe the model's text config (sizes, heads, eps, activation, pad id): the head count, for
one, is not visible in the weight shapes.

Both functions change only the parameters they fill; everything else (including a caller's own gate or temporal
init applied before) is left as found, and a file that does not fit raises `PretrainedInitError` before any
parameter is written.

Our parameter names equal the official ones (EgoVLPv2 minus DDP's `module.` prefix), so the name mapping is: a ViT
key `k` fills `video_model.k`, a RoBERTa key `k` fills `text_model.k`. Pickled files (`.pth`, `pytorch_model.bin`) are
read with the restricted, non-executing reader of `egovlp_deploy.checkpoint`, in the zip format and in torch's older
pre-zip format; `.npz` files are read with `allow_pickle=False`.
"""

from __future__ import annotations

import math
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import (
    EXPANSION,
    MAX_STORAGE_BYTES,
    SLACK,
    CheckpointError,
    _RestrictedUnpickler,
    check_pickle_expansion,
    load_safetensors,
    read_torch_checkpoint,
    weight_dtype_problem,
)
from .jsonfile import read_json


class PretrainedInitError(CheckpointError):
    """A pretrained file is unreadable, is not the model it should be, or does not fit our tower."""


@dataclass
class InitReport:
    """What one tower initialisation did, in our parameter names (and the file's names for `ignored`)."""

    tower: str  # "video" or "text"
    source: str
    filled: list[str] = field(default_factory=list)  # our names, set from the file
    left_at_init: list[str] = field(default_factory=list)  # our names in this tower, not in the file: unchanged
    ignored: list[str] = field(default_factory=list)  # the file's names that fill nothing
    # left_at_init names that the pretrained model should have provided (a backbone weight, not a temporal or
    # cross-attention one): the file is incomplete or of another layout. Empty for a complete ViT / RoBERTa.
    missing_from_file: list[str] = field(default_factory=list)
    filled_values: int = 0

    def summary(self) -> str:
        def names(items, limit=6):
            shown = ", ".join(items[:limit])
            return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")

        return (
            f"{self.tower} tower from {self.source}: filled {len(self.filled)} tensors "
            f"({self.filled_values / 1e6:.2f}M values); left at init {len(self.left_at_init)}"
            + (f" ({names(_grouped(self.left_at_init))})" if self.left_at_init else "")
            + f"; ignored {len(self.ignored)} file keys"
            + (f" ({names(self.ignored)})" if self.ignored else "")
            + (
                f"; WARNING: {len(self.missing_from_file)} backbone tensors were not in the file "
                f"({names(self.missing_from_file)})"
                if self.missing_from_file
                else ""
            )
        )


def _grouped(names: list[str]) -> list[str]:
    """Names with the layer index replaced by '*', each once: 'video_model.blocks.*.timeattn.qkv.weight'."""
    out: list[str] = []
    for name in names:
        generic = ".".join("*" if part.isdigit() else part for part in name.split("."))
        if generic not in out:
            out.append(generic)
    return out


# -- filling by name ---------------------------------------------------------------------------------------------
# Parts of each tower that the pretrained model does not have: they stay at the model's own init.
VIDEO_OWN_INIT = ("timeattn.", "norm3.", "temporal_embed", "_i2t")
TEXT_OWN_INIT = ("crossattention_t2i.", "alpha_t2i")


def fill_by_name(
    model: nn.Module,
    prefix: str,
    state_dict: dict[str, torch.Tensor],
    tower: str,
    source: str,
    own_init: tuple[str, ...] = (),
) -> InitReport:
    """Copy `state_dict[k]` into the model's `prefix + k` wherever that exists (strict=False semantics).

    A name present in both with different shapes, a non-floating-point tensor for a floating-point parameter (or the
    reverse) and a tensor holding NaN or infinity raise, listing every such name, before anything is copied.
    Tensors are cast to the parameter's dtype. Names of the tower that the file lacks are left as they are; those
    not containing one of `own_init` are also listed in `missing_from_file`."""
    targets = {name: t for name, t in model.state_dict(keep_vars=True).items() if name.startswith(prefix)}
    report = InitReport(tower=tower, source=source)
    misshapen, unusable = [], []
    pairs = []
    for key in sorted(state_dict):
        ours = prefix + key
        if ours not in targets:
            report.ignored.append(key)
            continue
        value, target = state_dict[key], targets[ours]
        if tuple(value.shape) != tuple(target.shape):
            misshapen.append(f"{key}: file {tuple(value.shape)} vs model {ours} {tuple(target.shape)}")
            continue
        # a cast would make integer data look like weights; a NaN or inf weight poisons every output
        if weight_dtype_problem(value, target):
            unusable.append(f"{key}: file {value.dtype} vs model {ours} {target.dtype}")
            continue
        if value.is_floating_point() and not value.is_meta and not bool(torch.isfinite(value).all()):
            unusable.append(f"{key}: NaN or infinite values")
            continue
        pairs.append((ours, target, value))
    if misshapen:
        hint = ""
        if any(m.startswith("pos_embed:") for m in misshapen):
            hint = (
                " (pos_embed is not resized, as in the official code: use a ViT made for this img_size and patch_size)"
            )
        raise PretrainedInitError(
            f"{source} does not fit the {tower} tower: {len(misshapen)} tensor(s) of another "
            f"shape: " + "; ".join(misshapen) + hint
        )
    if unusable:
        raise PretrainedInitError(
            f"{source} cannot fill the {tower} tower: {len(unusable)} unusable tensor(s): " + "; ".join(unusable)
        )
    with torch.no_grad():
        for ours, target, value in pairs:
            target.copy_(value.to(device=target.device, dtype=target.dtype))
            report.filled.append(ours)
            report.filled_values += target.numel()
    filled = set(report.filled)
    report.left_at_init = [name for name in targets if name not in filled]
    report.missing_from_file = [name for name in report.left_at_init if not any(p in name for p in own_init)]
    return report


# -- reading files -----------------------------------------------------------------------------------------------
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class _LegacyUnpickler(_RestrictedUnpickler):
    """The restricted unpickler for torch's pre-zip format, whose storages follow the pickle in the same file.

    Each storage is allocated empty when the pickle names it; `read_legacy_torch_file` fills it in place later, so
    the tensors built on it (views) see the data. Storages are stored raw after the pickle, so together they cannot
    be larger than the file: a pickle that declares more is refused before anything of that size is allocated."""

    def __init__(self, file, byte_limit: int = 0):
        pickle.Unpickler.__init__(self, file)
        self.storages: dict[str, torch.Tensor] = {}
        self.foreign: list[str] = []
        self.built: list[tuple] = []
        self.bytes_left = byte_limit

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise PretrainedInitError(f"malformed legacy checkpoint: unknown persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel, view = pid
        dtype = getattr(storage_type, "dtype", None)
        if not isinstance(dtype, torch.dtype) or not isinstance(numel, int) or numel < 0:
            raise PretrainedInitError(f"malformed legacy checkpoint: storage {key!r:.40} has no known type or size")
        if key not in self.storages:
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            if nbytes > self.bytes_left:
                raise PretrainedInitError(
                    f"malformed legacy checkpoint: storage {key!r:.40} declares {nbytes} bytes, "
                    f"more than the file holds"
                )
            self.bytes_left -= nbytes
            self.storages[key] = torch.empty(numel, dtype=dtype)
        root = self.storages[key]
        if view is None:
            return root
        if not (
            isinstance(view, tuple)
            and len(view) == 3
            and all(isinstance(x, int) and x >= 0 for x in view[1:])
            and view[1] + view[2] <= root.numel()
        ):
            raise PretrainedInitError(f"malformed legacy checkpoint: storage view {view!r:.80} outside its storage")
        _view_key, offset, size = view
        return root[offset : offset + size]


_SMALL_READ = 1 << 16


class _ReadsWithinFile:
    """A binary file whose `read(n)` never asks for more than the file has left: a pickle opcode's declared length
    (BINBYTES8 takes 2^64 - 1) would otherwise make the file object allocate that many bytes before reading."""

    def __init__(self, file, size: int):
        self.file, self.size = file, size

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > _SMALL_READ:  # small reads (most opcodes) need no position lookup
            left = max(0, self.size - self.file.tell())
            n = left if n is None or n < 0 or n > left else n
        return self.file.read(n)

    def peek(self, n: int = 0) -> bytes:  # lets the C unpickler read ahead instead of one call per opcode
        return self.file.peek(n)

    def readline(self, limit: int = -1) -> bytes:
        return self.file.readline(limit)

    def tell(self) -> int:
        return self.file.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.file.seek(offset, whence)


def read_legacy_torch_file(path: Path):
    """Read a pre-zip `torch.save` file (magic, protocol, sys info, the pickle, storage keys, raw storages)."""

    def small_pickle(f):
        check_pickle_expansion(f, str(path), PretrainedInitError)
        return _LegacyUnpickler(f).load()  # the header pickles hold plain data only

    try:
        with open(path, "rb") as raw_file:
            f = _ReadsWithinFile(raw_file, path.stat().st_size)
            if small_pickle(f) != _LEGACY_MAGIC or small_pickle(f) != _LEGACY_PROTOCOL:
                raise PretrainedInitError(f"{path}: not a torch checkpoint (bad magic number or protocol)")
            sys_info = small_pickle(f)
            if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
                raise PretrainedInitError(f"{path}: big-endian checkpoints are not supported")
            check_pickle_expansion(f, str(path), PretrainedInitError)
            unpickler = _LegacyUnpickler(f, byte_limit=path.stat().st_size)
            result = unpickler.load()
            unpickler.check_built()
            keys = small_pickle(f)
            if not isinstance(keys, list):
                raise PretrainedInitError(f"{path}: malformed legacy checkpoint (no storage key list)")
            for key in keys:
                storage = unpickler.storages.get(key)
                if storage is None:
                    raise PretrainedInitError(f"{path}: malformed legacy checkpoint (unknown storage {key!r:.40})")
                header = f.read(8)
                if len(header) != 8:
                    raise PretrainedInitError(f"truncated checkpoint {path}: storage {key} is missing")
                (numel,) = struct.unpack("<q", header)
                nbytes = numel * storage.element_size()
                if numel != storage.numel():
                    raise PretrainedInitError(f"{path}: storage {key} has {numel} elements, expected {storage.numel()}")
                raw = f.read(nbytes)
                if len(raw) != nbytes:
                    raise PretrainedInitError(
                        f"truncated checkpoint {path}: storage {key} has {len(raw)} bytes, expected {nbytes}"
                    )
                if nbytes:
                    storage.copy_(torch.frombuffer(bytearray(raw), dtype=storage.dtype))
            unfilled = sorted(set(unpickler.storages) - set(keys))
            if unfilled:  # allocated empty: their tensors would hold whatever the memory held
                raise PretrainedInitError(f"truncated checkpoint {path}: storage {unfilled[0]} is missing")
            return result
    except PretrainedInitError:
        raise
    except CheckpointError as exc:
        raise PretrainedInitError(f"{path}: {exc}") from exc
    except (
        EOFError,
        pickle.UnpicklingError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        RuntimeError,
        struct.error,
    ) as exc:
        raise PretrainedInitError(f"{path}: corrupt or truncated checkpoint ({type(exc).__name__}: {exc})") from exc


def _file_kind(path: Path) -> str:
    """'torch-zip', 'npz', 'torch-legacy' or 'safetensors', from the file's content (not its name)."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile as exc:
            raise PretrainedInitError(f"{path}: unreadable zip file ({exc})") from exc
        if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
            return "torch-zip"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        raise PretrainedInitError(f"{path}: a zip file that is neither a torch checkpoint nor an .npz")
    # safetensors: an 8-byte little-endian header length, then the JSON header (checked first: the length's low
    # byte may be anything, 0x80 included)
    if len(head) >= 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= path.stat().st_size:
        return "safetensors"
    if head[:1] == b"\x80":  # a pickle protocol opcode: torch's pre-zip format
        return "torch-legacy"
    raise PretrainedInitError(f"{path}: unknown format (expected a torch .pth/.bin, a .safetensors or an .npz file)")


def _tensor_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a loaded pickle: the object itself, or its 'state_dict' / 'model' entry. Read with dict's
    own methods: a pickle can set attributes on the dicts it builds (`items` included) that shadow them."""
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in dict.values(obj)):
        for key in ("state_dict", "model"):
            if isinstance(dict.get(obj, key), dict):
                obj = dict.get(obj, key)
                break
    if not isinstance(obj, dict) or not obj:
        raise PretrainedInitError(f"{path}: not a state dict (found {type(obj).__name__})")
    for key, value in dict.items(obj):
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise PretrainedInitError(
                f"{path}: entry {key!r:.60} is not a named tensor (found {value!r:.60}); "
                f"objects other than tensors are never built from a pickle"
            )
    return dict(dict.items(obj))


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors by name from a torch file (zip or pre-zip, restricted reader) or a safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedInitError(f"{path}: no such file")
    kind = _file_kind(path)
    try:
        if kind == "safetensors":
            return load_safetensors(path)
        if kind == "torch-zip":
            return _tensor_dict(read_torch_checkpoint(path), path)
        if kind == "torch-legacy":
            return _tensor_dict(read_legacy_torch_file(path), path)
    except PretrainedInitError:
        raise
    except CheckpointError as exc:
        raise PretrainedInitError(str(exc)) from exc
    raise PretrainedInitError(f"{path}: an .npz file holds jax names; read it with read_vit_npz")


def _renamed(state_dict: dict[str, torch.Tensor], rename) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict under the new names, new name -> the file's name); two file names meeting is an error."""
    out, original = {}, {}
    for key, value in state_dict.items():
        new = rename(key)
        if new in out:
            raise PretrainedInitError(f"the file holds both {original[new]!r} and {key!r}, which name the same tensor")
        out[new], original[new] = value, key
    return out, original


def _strip_module_prefix(key: str) -> str:
    """DDP's `module.` prefix off a name that has it (the official state_dict_data_parallel_fix)."""
    return key[len("module.") :] if key.startswith("module.") else key


# -- Google's .npz ViT (jax naming) -> timm names --------------------------------------------------------------
def _jax_to_torch(array, transpose: bool = True) -> torch.Tensor:
    """A jax kernel as a torch weight: conv (kh, kw, in, out) -> (out, in, kh, kw); dense (in, out) -> (out, in);
    an attention output kernel (heads, head_dim, out) -> (out, heads, head_dim)."""
    t = torch.from_numpy(array.copy())
    if transpose:
        if t.dim() == 4:
            t = t.permute(3, 2, 0, 1)
        elif t.dim() == 3:
            t = t.permute(2, 0, 1)
        elif t.dim() == 2:
            t = t.t()
    return t.contiguous()


def _check_npz_sizes(path: Path) -> None:
    """Refuse an .npz whose arrays would unpack past the bounds of a torch checkpoint (EXPANSION times the file's
    size + SLACK, at most MAX_STORAGE_BYTES), before numpy allocates or decompresses them: each array's declared
    shape must fit its zip entry, whose declared size the zip reader never reads past."""
    import numpy as np

    left = min(EXPANSION * path.stat().st_size + SLACK, MAX_STORAGE_BYTES)
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.filename.endswith(".npy"):
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    read_header = np.lib.format.read_array_header_1_0
                    if version != (1, 0):
                        read_header = np.lib.format.read_array_header_2_0
                    shape, _, dtype = read_header(member)
                needed = math.prod(shape) * dtype.itemsize
                if needed > info.file_size:
                    raise PretrainedInitError(
                        f"{path}: {info.filename} declares {needed} bytes of {shape} {dtype}, its entry holds "
                        f"{info.file_size}; refusing a corrupt or hostile .npz"
                    )
            if info.file_size > left:
                raise PretrainedInitError(
                    f"{path}: {info.filename} would unpack past {EXPANSION}x the file's size + {SLACK >> 20} MiB "
                    f"(ceiling {MAX_STORAGE_BYTES}); refusing a corrupt or hostile .npz"
                )
            left -= info.file_size


def read_vit_npz(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(timm-named state dict, the npz names it does not use) from a Google ViT `.npz`.

    Handles the original release layout (`Transformer/encoderblock_{i}/...`, MultiHeadDotProductAttention_1,
    LayerNorm_0/LayerNorm_2, MlpBlock_3), optimizer dumps (`opt/target/` prefix), big_vision (`params/` or
    `params/img/` prefix, MultiHeadDotProductAttention_0, LayerNorm_0/LayerNorm_1, MlpBlock_0, top-level
    `pos_embedding`), and scanned blocks stacked along a leading axis (`Transformer/encoderblock/...`)."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise PretrainedInitError(f"{path}: no such file")
    try:
        _check_npz_sizes(path)
        with np.load(path, allow_pickle=False) as archive:
            w = {name: archive[name] for name in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        if isinstance(exc, PretrainedInitError):
            raise
        raise PretrainedInitError(f"{path}: unreadable .npz ({exc})") from exc

    prefix, big_vision = "", False
    if "opt/target/embedding/kernel" in w:
        prefix = "opt/target/"
    elif "params/embedding/kernel" in w:
        prefix, big_vision = "params/", True
    elif "params/img/embedding/kernel" in w:
        prefix, big_vision = "params/img/", True
    if f"{prefix}embedding/kernel" not in w:
        raise PretrainedInitError(f"{path}: not a ViT .npz (no embedding/kernel; names start {sorted(w)[:3]})")

    used: set[str] = set()

    def get(name, transpose=True, index=None):
        full = prefix + name
        if full not in w:
            raise PretrainedInitError(f"{path}: not a complete ViT .npz (no {full})")
        used.add(full)
        array = w[full] if index is None else w[full][index]
        # strings, records, dates and long doubles have no torch dtype: from_numpy would raise a bare TypeError
        if array.dtype.kind not in "biuf" or array.dtype.itemsize > 8:
            raise PretrainedInitError(f"{path}: {full} holds {array.dtype} values, not numbers torch can read")
        return _jax_to_torch(array, transpose)

    sd = {
        "patch_embed.proj.weight": get("embedding/kernel"),
        "patch_embed.proj.bias": get("embedding/bias"),
        "norm.weight": get("Transformer/encoder_norm/scale"),
        "norm.bias": get("Transformer/encoder_norm/bias"),
    }
    if prefix + "cls" in w:
        sd["cls_token"] = get("cls", transpose=False)
    sd["pos_embed"] = get(
        "pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding", transpose=False
    )

    mha, mlp, ln2 = (0, 0, 1) if big_vision else (1, 3, 2)
    stacked = prefix + "Transformer/encoderblock/LayerNorm_0/scale" in w
    if stacked:
        depth = w[prefix + "Transformer/encoderblock/LayerNorm_0/scale"].shape[0]
    else:
        depth = 0
        while f"{prefix}Transformer/encoderblock_{depth}/LayerNorm_0/scale" in w:
            depth += 1
    for i in range(depth):
        block, index = ("Transformer/encoderblock/", i) if stacked else (f"Transformer/encoderblock_{i}/", None)
        attn = f"{block}MultiHeadDotProductAttention_{mha}/"
        out = f"blocks.{i}."
        sd[out + "norm1.weight"] = get(block + "LayerNorm_0/scale", index=index)
        sd[out + "norm1.bias"] = get(block + "LayerNorm_0/bias", index=index)
        # query/key/value kernels are (width, heads, head_dim): flatten to (width, width) and transpose to (out, in)
        sd[out + "attn.qkv.weight"] = torch.cat(
            [get(f"{attn}{n}/kernel", transpose=False, index=index).flatten(1).t() for n in ("query", "key", "value")]
        )
        sd[out + "attn.qkv.bias"] = torch.cat(
            [get(f"{attn}{n}/bias", transpose=False, index=index).reshape(-1) for n in ("query", "key", "value")]
        )
        sd[out + "attn.proj.weight"] = get(f"{attn}out/kernel", index=index).flatten(1)
        sd[out + "attn.proj.bias"] = get(f"{attn}out/bias", index=index)
        sd[out + "norm2.weight"] = get(f"{block}LayerNorm_{ln2}/scale", index=index)
        sd[out + "norm2.bias"] = get(f"{block}LayerNorm_{ln2}/bias", index=index)
        for r in (0, 1):
            sd[out + f"mlp.fc{r + 1}.weight"] = get(f"{block}MlpBlock_{mlp}/Dense_{r}/kernel", index=index)
            sd[out + f"mlp.fc{r + 1}.bias"] = get(f"{block}MlpBlock_{mlp}/Dense_{r}/bias", index=index)
    sd = {k: v.contiguous() for k, v in sd.items()}
    return sd, sorted(set(w) - used)


# -- the two towers ----------------------------------------------------------------------------------------------
VIT_MARKER = "blocks.0.attn.qkv.weight"


def init_video_tower(model: nn.Module, path: str | os.PathLike) -> InitReport:
    """Fill `model.video_model` from an image ViT (timm `.pth`, timm `.safetensors`, Google `.npz`, or a directory
    holding `model.safetensors` / `pytorch_model.bin` in timm names). See the module docstring for the rules."""
    path = Path(path)
    if path.is_dir():
        path = _weights_in(path, ("model.safetensors", "pytorch_model.bin"))
    if not path.is_file():
        raise PretrainedInitError(f"{path}: no such file")
    npz_unused: list[str] = []
    if _file_kind(path) == "npz":
        state_dict, npz_unused = read_vit_npz(path)
        original = {k: k for k in state_dict}
    else:
        state_dict, original = _renamed(read_state_dict(path), _strip_module_prefix)
    if VIT_MARKER not in state_dict or "patch_embed.proj.weight" not in state_dict:
        hint = ""
        if any(k.startswith(("vit.", "encoder.layer.", "embeddings.patch_embeddings")) for k in state_dict):
            hint = " (this looks like a Hugging Face transformers ViTModel; use the timm weights of the same model)"
        raise PretrainedInitError(
            f"{path}: not a ViT in timm names (no {VIT_MARKER} / patch_embed.proj.weight; "
            f"names start {sorted(state_dict)[:4]}){hint}"
        )
    report = fill_by_name(model, "video_model.", state_dict, "video", str(path), VIDEO_OWN_INIT)
    report.ignored = sorted([original[k] for k in report.ignored] + npz_unused)
    return report


TEXT_MARKER = "encoder.layer.0.attention.self.query.weight"
# config.json entries that fix the architecture; each must equal our TextConfig's value (heads cannot be seen in
# the shapes, the others would otherwise fail later or silently change the computation)
_CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
    "pad_token_id",
    "hidden_act",
)


def _weights_in(directory: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise PretrainedInitError(f"{directory}: no weights file (looked for {', '.join(names)})")


def _check_text_config(directory: Path, text_config) -> None:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise PretrainedInitError(f"{directory}: no config.json (expected a Hugging Face model directory)")
    # read_json: a config nested thousands of levels deep, or not a regular file, is this module's error too
    hf = read_json(config_path, PretrainedInitError, expect=dict)
    different = [
        f"{name}: file {hf[name]!r} vs model {getattr(text_config, name)!r}"
        for name in _CONFIG_FIELDS
        if name in hf and hf[name] != getattr(text_config, name)
    ]
    if different:
        raise PretrainedInitError(
            f"{config_path} describes another RoBERTa than the model's text config: " + "; ".join(different)
        )


def _hf_name(key: str, strip_prefix: bool) -> str:
    """A RobertaModel name as `from_pretrained` reads it: the `roberta.` prefix of a model-with-head checkpoint
    stripped, and the old `LayerNorm.gamma/beta` names read as `weight/bias`."""
    if strip_prefix and key.startswith("roberta."):
        key = key[len("roberta.") :]
    if key.endswith(".gamma"):
        key = key[: -len("gamma")] + "weight"
    elif key.endswith(".beta"):
        key = key[: -len("beta")] + "bias"
    return key


def init_text_tower(model: nn.Module, path: str | os.PathLike) -> InitReport:
    """Fill `model.text_model` from a local Hugging Face RoBERTa directory (`config.json` with `model.safetensors`
    or `pytorch_model.bin`; safetensors preferred). See the module docstring for the rules."""
    directory = Path(path)
    if not directory.is_dir():
        raise PretrainedInitError(
            f"{directory}: not a directory (expected a Hugging Face model directory such as "
            f"a local copy of roberta-base)"
        )
    _check_text_config(directory, model.config.text)
    weights = _weights_in(directory, ("model.safetensors", "pytorch_model.bin"))
    file_sd = read_state_dict(weights)
    strip_prefix = any(k.startswith("roberta.") for k in file_sd)
    state_dict, original = _renamed(file_sd, lambda key: _hf_name(key, strip_prefix))
    if TEXT_MARKER not in state_dict or "embeddings.word_embeddings.weight" not in state_dict:
        raise PretrainedInitError(
            f"{weights}: not a RoBERTa/BERT encoder (no {TEXT_MARKER}; names start {sorted(state_dict)[:4]})"
        )
    report = fill_by_name(model, "text_model.", state_dict, "text", str(weights), TEXT_OWN_INIT)
    report.ignored = sorted(original[k] for k in report.ignored)
    return report


__all__ = [
    "InitReport",
    "PretrainedInitError",
    "init_text_tower",
    "init_video_tower",
    "read_state_dict",
    "read_vit_npz",
    "fill_by_name",
    "read_legacy_torch_file",
]
