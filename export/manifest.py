"""`manifest.json`: what an export directory holds, and the loader that refuses what does not match it.

One entry per artifact: file (relative), role, format, precision, opset, IO names/shapes/dtypes (shape symbols
`batch` and `text_len` with their bounds), sha256 and size, validation verdict; plus the source checkpoint's
sha256, the model config and the tool versions of the export. Written atomically (temp file + rename).

Loading an artifact checks, in this order, and raises `ArtifactError` naming the file and the mismatch:
present -> size and sha256 (corrupt or swapped file) -> the role/precision stored inside the file (a file from
another export under this name) -> tool versions the format depends on (an AOTInductor package runs only with the
torch it was built by; a TensorRT engine only with its TensorRT; ONNX needs a runtime that knows its opset).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from egovlp_deploy.jsonfile import read_json

from .specs import ROLES, static_dims

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
TOOLS = ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript", "tensorrt", "egovlp-deploy")


class ManifestError(ValueError):
    """manifest.json is missing, unreadable, of an unknown version, or lacks what was asked."""


class ArtifactError(ValueError):
    """An artifact does not match its manifest entry (missing, corrupt, wrong role, wrong tool versions)."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_checkpoint(path: str | os.PathLike) -> str:
    """A file's sha256, or for a directory the sha256 of its sorted (name, sha256) list of weight/config files."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".json"))
    listing = "\n".join(f"{p.name} {sha256_file(p)}" for p in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def tool_versions() -> dict[str, str | None]:
    out = {}
    for name in TOOLS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def io_entry(role: str, config, precision: str, max_batch: int, max_text_len: int) -> dict:
    sizes = static_dims(config)
    bounds = {"batch": [1, max_batch], "text_len": [1, max_text_len]}

    def tensor(t):
        return {"name": t.name, "shape": [sizes.get(d, d) if isinstance(d, str) else d for d in t.dims],
                "dtype": t.numpy_dtype(precision)}

    spec = ROLES[role]
    return {"inputs": [tensor(t) for t in spec.inputs], "outputs": [tensor(t) for t in spec.outputs],
            "dynamic": {k: v for k, v in bounds.items() if any(k in t.dims for t in spec.inputs)}}


@dataclass
class ArtifactEntry:
    file: str
    role: str
    format: str  # onnx | tensorrt | aoti
    precision: str  # fp32 | fp16 | bf16 | int8
    sha256: str
    bytes: int
    io: dict
    opset: int | None = None
    device: str = "cpu"
    variant: str = ""  # e.g. "ort-optimized"
    derived_from: str | None = None
    export_seconds: float | None = None
    validation: dict = field(default_factory=dict)


@dataclass
class Manifest:
    source_checkpoint: dict
    model_config: dict
    export: dict
    tools: dict = field(default_factory=tool_versions)
    artifacts: list[ArtifactEntry] = field(default_factory=list)
    validation: dict = field(default_factory=dict)
    # The tokenizer copied into the folder: {"dir": "tokenizer", "files": {name: sha256}} ({} when none was found).
    tokenizer: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    def add(self, directory: Path, path: Path, **kw) -> ArtifactEntry:
        entry = ArtifactEntry(file=str(Path(path).relative_to(directory)), sha256=sha256_file(path),
                              bytes=Path(path).stat().st_size, **kw)
        self.artifacts = [a for a in self.artifacts if a.file != entry.file] + [entry]
        return entry

    def find(self, role: str, precision: str = "fp32", format: str = "onnx", variant: str = "") -> ArtifactEntry:
        for a in self.artifacts:
            if (a.role, a.precision, a.format, a.variant) == (role, precision, format, variant):
                return a
        have = sorted({(a.role, a.precision, a.format) for a in self.artifacts})
        raise ManifestError(f"the manifest lists no {format} {precision} artifact for role {role!r} "
                            f"(it has: {have})")

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, directory: str | os.PathLike) -> Path:
        from egovlp_deploy.checkpoint import atomic_write_bytes

        path = Path(directory) / MANIFEST
        atomic_write_bytes(path, json.dumps(self.to_dict(), indent=2, sort_keys=False).encode())
        return path


# Files a Hugging Face / demo tokenizer directory holds; copied into an export so it runs anywhere.
TOKENIZER_SUFFIXES = (".json", ".txt", ".model")
TOKENIZER_MAX_BYTES = 64 << 20


def copy_tokenizer(source: str | os.PathLike, directory: str | os.PathLike, name: str = "tokenizer") -> dict:
    """Copy the tokenizer files of `source` into directory/name; returns the manifest entry (file hashes)."""
    import shutil

    source, target = Path(source), Path(directory) / name
    files = sorted(p for p in source.iterdir()
                   if p.is_file() and not p.is_symlink() and p.suffix in TOKENIZER_SUFFIXES)
    if not files:
        raise ManifestError(f"{source}: no tokenizer files ({', '.join(TOKENIZER_SUFFIXES)}) to copy")
    target.mkdir(parents=True, exist_ok=True)
    hashes = {}
    for p in files:
        if p.stat().st_size > TOKENIZER_MAX_BYTES:
            raise ManifestError(f"{p}: {p.stat().st_size} bytes is not a tokenizer file")
        if p.resolve() != (target / p.name).resolve():
            shutil.copyfile(p, target / p.name)
        hashes[p.name] = sha256_file(target / p.name)
    return {"dir": name, "files": hashes}


def verify_tokenizer(directory: str | os.PathLike, entry: dict) -> Path:
    """The tokenizer folder of an export, every listed file present with its recorded sha256 (ArtifactError)."""
    name = entry.get("dir", "")
    folder = Path(directory) / name
    if not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ManifestError(f"{directory}: tokenizer dir {name!r} is not a folder inside the export")
    for file, digest in sorted(entry.get("files", {}).items()):
        path = folder / file
        if Path(file).name != file:
            raise ManifestError(f"{directory}: tokenizer file {file!r} is not a plain file name")
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in the manifest but missing")
        if sha256_file(path) != digest:
            raise ArtifactError(f"{path}: sha256 differs from the manifest (changed or swapped tokenizer file)")
    return folder


def load_manifest(directory: str | os.PathLike) -> Manifest:
    directory = Path(directory)
    path = directory / MANIFEST if directory.is_dir() else directory
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest (not an egovlp-deploy export directory)")
    data = read_json(path, ManifestError, expect=dict)
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ManifestError(f"{path}: manifest format_version {version!r}, this egovlp-deploy reads "
                            f"{FORMAT_VERSION}")
    try:
        artifacts = [ArtifactEntry(**a) for a in data["artifacts"]]
        manifest = Manifest(**{**data, "artifacts": artifacts})
    except (KeyError, TypeError) as exc:
        raise ManifestError(f"{path}: malformed manifest ({exc})") from exc
    for a in artifacts:
        if a.role not in ROLES:
            raise ManifestError(f"{path}: artifact {a.file} has unknown role {a.role!r}")
    return manifest


def verify_artifact(directory: str | os.PathLike, entry: ArtifactEntry, manifest_tools: dict | None = None) -> Path:
    """Raise ArtifactError unless the file matches its entry; return its path."""
    path = Path(directory) / entry.file
    if not path.is_file():
        raise ArtifactError(f"{path}: listed in the manifest but missing")
    size = path.stat().st_size
    if size != entry.bytes:
        raise ArtifactError(f"{path}: {size} bytes, the manifest says {entry.bytes} (truncated or replaced)")
    if sha256_file(path) != entry.sha256:
        raise ArtifactError(f"{path}: sha256 differs from the manifest (corrupt or replaced file)")
    if entry.format == "onnx":
        _check_onnx_identity(path, entry)
    check_tool_versions(entry, manifest_tools=manifest_tools)
    return path


def _check_onnx_identity(path: Path, entry: ArtifactEntry) -> None:
    from .onnx import read_metadata

    try:
        meta = read_metadata(path)
    except Exception as exc:  # onnx raises DecodeError and others on garbage
        raise ArtifactError(f"{path}: not a readable ONNX model ({exc})") from exc
    role, precision = meta.get("egovlp.role"), meta.get("egovlp.precision")
    if role != entry.role:
        raise ArtifactError(f"{path}: the file is a {role!r} graph but the manifest lists it as {entry.role!r} "
                            f"(wrong manifest or swapped files)")
    if precision != entry.precision:
        raise ArtifactError(f"{path}: the file is {precision!r} but the manifest says {entry.precision!r}")


def check_tool_versions(entry: ArtifactEntry, tools: dict | None = None, manifest_tools: dict | None = None) -> None:
    """Formats tied to a tool version: refuse to load them with another one."""
    now = tools or tool_versions()
    built = manifest_tools or {}
    if entry.format == "onnx" and entry.opset:
        try:
            import onnxruntime  # noqa: F401
            from onnx.defs import onnx_opset_version
        except ImportError as exc:
            raise ArtifactError(f"{entry.file}: loading ONNX needs onnx and onnxruntime ({exc})") from exc
        if entry.opset > onnx_opset_version():
            raise ArtifactError(f"{entry.file}: opset {entry.opset} is newer than this onnx ({onnx_opset_version()})")
    if entry.format == "aoti" and built.get("torch") and now.get("torch") != built["torch"]:
        raise ArtifactError(f"{entry.file}: AOTInductor package built with torch {built['torch']}, running torch "
                            f"{now.get('torch')}: rebuild it (packages are tied to the torch that built them)")
    if entry.format == "tensorrt" and built.get("tensorrt") and now.get("tensorrt") != built["tensorrt"]:
        raise ArtifactError(f"{entry.file}: TensorRT engine built with TensorRT {built['tensorrt']}, this machine "
                            f"has {now.get('tensorrt')}: rebuild it (engines are tied to the TensorRT version)")


def open_artifact(directory: str | os.PathLike, role: str, precision: str = "fp32", format: str = "onnx",
                  variant: str = "") -> tuple[Path, ArtifactEntry, Manifest]:
    """Find, verify and return (path, entry, manifest) for one artifact of an export directory."""
    manifest = load_manifest(directory)
    entry = manifest.find(role, precision, format, variant)
    directory = Path(directory) if Path(directory).is_dir() else Path(directory).parent
    return verify_artifact(directory, entry, manifest.tools), entry, manifest
