"""`manifest.json`: what an export directory holds, and the loader that refuses what does not match it.

One entry per artifact: file (relative), role, format, precision, opset, IO names/shapes/dtypes (shape symbols
`batch` and `text_len` with their bounds), sha256 and size, the external data files of an ONNX graph (file, bytes,
sha256 each; [] for a single-file graph), validation verdict; plus the source checkpoint's sha256, the model
config, the tool versions of the export and the copied tokenizer's file hashes. Written atomically (temp file +
rename).

Every path the manifest names (artifact files, `derived_from`, external data, the tokenizer folder and files) and
every external data location inside an ONNX graph is confined to the export folder (`inside`): an absolute path, a
`..` part or a path that resolves through a symlink to outside the folder is refused, naming the key and the path.
An engines folder is data from anywhere (copied, downloaded); nothing it names may make the loader read elsewhere.

Loading an artifact checks, in this order, and raises `ArtifactError` naming the file and the mismatch:
inside the folder -> present -> size and sha256 (corrupt or swapped file) -> for ONNX and torch.export programs,
the role/precision stored inside the file (a file from another export under this name), and for ONNX each external
data file it reads: recorded in the manifest, inside the folder, size and sha256 -> tool versions the format depends
on (an AOTInductor package or a program runs only with the torch it was built by; a TensorRT engine only with its
TensorRT; ONNX needs a runtime that knows its opset). A graph that reads external data under a manifest that
records none (written before external data was recorded) is refused with a request to re-export: nothing would vouch
for those bytes. The exporter itself writes single-file graphs, so the manifests it wrote before keep loading.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path, PurePosixPath, PureWindowsPath

from egovlp_deploy.hashing import sha256_file
from egovlp_deploy.jsonfile import read_json
from egovlp_deploy.tokenizer import TOKENIZER_MAX_BYTES, TOKENIZER_SUFFIXES

from .specs import ROLES, static_dims

MANIFEST = "manifest.json"
# Present while an export into the folder runs (manifest.json is removed before the first artifact is replaced):
# a folder holding it and no manifest is an unfinished export, which the loader refuses with a request to rerun it.
INCOMPLETE = "export-incomplete.json"
FORMAT_VERSION = 1
TOOLS = ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript", "tensorrt", "egovlp-deploy")


class ManifestError(ValueError):
    """manifest.json is missing, unreadable, of an unknown version, or lacks what was asked."""


class ArtifactError(ValueError):
    """An artifact does not match its manifest entry (missing, corrupt, wrong role, wrong tool versions)."""


# Files from this size on are hashed once per process and file state: sha256 of a graph or its external data costs
# about a second per gigabyte, too much for every load. Smaller ones are hashed every time (milliseconds at most).
HASH_CACHE_MIN_BYTES = 8 << 20
_HASHES: dict[tuple, str] = {}


def sha256_verified(path: str | os.PathLike) -> str:
    """sha256_file, remembered per (real path, device, inode, size, mtime, ctime): any write changes mtime and
    ctime, and ctime cannot be set back, so an edited file is hashed again; loading the same engines a second time
    in a process (another Runtime, the index after a search) does not read gigabytes again."""
    real = os.path.realpath(path)
    st = os.stat(real)
    if st.st_size < HASH_CACHE_MIN_BYTES:
        return sha256_file(real)
    key = (real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(real)
    return _HASHES[key]


def inside(
    folder: str | os.PathLike,
    name,
    key: str,
    base: str | os.PathLike | None = None,
    error: type[Exception] | None = None,
) -> Path:
    """`name`, a relative path read from a manifest (or from an artifact), as a path inside `folder`.

    Refused (`error`, default ManifestError, naming `key` and the path): anything but a non-empty string, an absolute
    path (POSIX or Windows form), a `..` part, and a path that resolves (symlinks followed, at any depth) to outside
    the folder or to the folder itself. `base`: the folder `name` is relative to (default `folder`; an ONNX external
    data location is relative to the graph's folder). Returns the path unresolved (as given, under `folder`): a
    symlink that stays inside the folder is allowed."""
    error = error or ManifestError
    folder = Path(folder)
    if not isinstance(name, str) or not name.strip() or "\0" in name:
        raise error(f"{folder}: {key} {name!r} is not a path (a relative path inside the folder was expected)")
    why = None
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        why = "is absolute"
    elif ".." in PureWindowsPath(name).parts:  # splits on '/' and '\\' both
        why = "contains '..'"
    if why:
        raise error(
            f"{folder}: {key} {name!r} {why}: paths an engines folder names are relative to it and stay inside it"
        )
    path = Path(base if base is not None else folder) / name
    root, real = folder.resolve(), path.resolve()
    if real == root:
        raise error(f"{folder}: {key} {name!r} names the folder itself, not a file or folder in it")
    if not real.is_relative_to(root):
        raise error(f"{folder}: {key} {name!r} resolves to {real}, outside the folder {root} (a symlink out of it)")
    return path


def check_file(path: Path, size: int, digest: str | None, what: str = "") -> None:
    """Present, `size` bytes, sha256 `digest` (unless None); ArtifactError naming the file otherwise."""
    if not path.is_file():
        raise ArtifactError(f"{path}: {what}listed in the manifest but missing")
    got = path.stat().st_size
    if got != size:
        raise ArtifactError(f"{path}: {what}{got} bytes, the manifest says {size} (truncated or replaced)")
    if digest is not None and sha256_verified(path) != digest:
        raise ArtifactError(f"{path}: sha256 differs from the manifest ({what}corrupt or replaced file)")


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
        return {
            "name": t.name,
            "shape": [sizes.get(d, d) if isinstance(d, str) else d for d in t.dims],
            "dtype": t.numpy_dtype(precision),
        }

    spec = ROLES[role]
    return {
        "inputs": [tensor(t) for t in spec.inputs],
        "outputs": [tensor(t) for t in spec.outputs],
        "dynamic": {k: v for k, v in bounds.items() if any(k in t.dims for t in spec.inputs)},
    }


@dataclass
class ArtifactEntry:
    file: str
    role: str
    format: str  # onnx | tensorrt | aoti | program
    precision: str  # fp32 | fp16 | bf16 | int8
    sha256: str
    bytes: int
    io: dict
    opset: int | None = None
    # ONNX external data: [{"file": relative to the export folder, "bytes": n, "sha256": hex}], [] for a single-file
    # graph; None for the other formats and in manifests written before it was recorded (see verify_artifact).
    external_data: list[dict] | None = None
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
        """Record the artifact at `path` (inside `directory`): its hash and size, and for an ONNX graph the hash
        and size of each external data file it reads (the bytes a runtime loads with it)."""
        entry = ArtifactEntry(
            file=str(Path(path).relative_to(directory)),
            sha256=sha256_verified(path),
            bytes=Path(path).stat().st_size,
            **kw,
        )
        if entry.format == "onnx":
            entry.external_data = external_data_entries(directory, path)
        return self.keep(entry)

    def keep(self, entry: ArtifactEntry) -> ArtifactEntry:
        """List `entry` (its file already hashed: just made, or verified as an interrupted run recorded it)."""
        self.artifacts = [a for a in self.artifacts if a.file != entry.file] + [entry]
        return entry

    def find(self, role: str, precision: str = "fp32", format: str = "onnx", variant: str = "") -> ArtifactEntry:
        for a in self.artifacts:
            if (a.role, a.precision, a.format, a.variant) == (role, precision, format, variant):
                return a
        have = sorted({(a.role, a.precision, a.format) for a in self.artifacts})
        raise ManifestError(f"the manifest lists no {format} {precision} artifact for role {role!r} (it has: {have})")

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, directory: str | os.PathLike) -> Path:
        from egovlp_deploy.checkpoint import atomic_write_bytes

        path = Path(directory) / MANIFEST
        atomic_write_bytes(path, json.dumps(self.to_dict(), indent=2, sort_keys=False).encode())
        return path


def external_data_entries(directory: str | os.PathLike, path: str | os.PathLike) -> list[dict]:
    """The manifest record of the external data files the ONNX graph at `path` reads: file (relative to the export
    folder), bytes, sha256; [] when its weights are all inside the graph file."""
    from .onnx_export import read_header

    directory, path = Path(directory), Path(path)
    out = []
    for location in read_header(path)[1]:
        data = inside(directory, location, f"{path.name}: external data location", base=path.parent)
        out.append(
            {"file": str(data.relative_to(directory)), "bytes": data.stat().st_size, "sha256": sha256_file(data)}
        )
    return out


def _tokenizer_sources(source: Path) -> list[Path]:
    files = sorted(p for p in source.iterdir() if p.is_file() and not p.is_symlink() and p.suffix in TOKENIZER_SUFFIXES)
    if not files:
        raise ManifestError(f"{source}: no tokenizer files ({', '.join(TOKENIZER_SUFFIXES)}) to copy")
    return files


def check_tokenizer_target(
    source: str | os.PathLike, directory: str | os.PathLike, ours=(), name: str = "tokenizer"
) -> list[str]:
    """The names copy_tokenizer(source, directory, name, ours) writes; ManifestError when directory/name holds an
    entry that is not `ours` (a file an earlier export of this folder listed): it would be replaced or removed, and
    the export never deletes what it did not write. Hidden files are left alone (no tokenizer reads them)."""
    source, target = Path(source), Path(directory) / name
    files = _tokenizer_sources(source)
    if target.exists() or target.is_symlink():
        inside(directory, name, "the tokenizer folder")
    if target.is_dir() and source.resolve() != target.resolve():
        foreign = sorted(p.name for p in target.iterdir() if p.name not in ours and not p.name.startswith("."))
        if foreign:
            raise ManifestError(
                f"{target}: holds {', '.join(foreign)}, which no earlier export of this folder wrote; nothing was "
                f"written. Move them away, or export to a new folder"
            )
    return [p.name for p in files]


def copy_tokenizer(source: str | os.PathLike, directory: str | os.PathLike, name: str = "tokenizer", ours=()) -> dict:
    """Copy the tokenizer files of `source` into directory/name; returns the manifest entry (file hashes).
    The files of `ours` (an earlier export's tokenizer files there) that are not copied again are removed: the loader
    reads every file there it knows, and verify_tokenizer refuses unlisted ones. Any other entry there is refused
    before anything is written (check_tokenizer_target)."""
    source, target = Path(source), Path(directory) / name
    check_tokenizer_target(source, directory, ours, name)
    files = _tokenizer_sources(source)
    for p in files:
        if p.stat().st_size > TOKENIZER_MAX_BYTES:
            raise ManifestError(f"{p}: {p.stat().st_size} bytes is not a tokenizer file")
    target.mkdir(parents=True, exist_ok=True)
    hashes = {}
    for p in files:
        if p.resolve() != (target / p.name).resolve():
            atomic_copy(p, target / p.name)
        hashes[p.name] = sha256_file(target / p.name)
    if source.resolve() != target.resolve():
        remove_tokenizer(directory, set(ours) - set(hashes), name)
    return {"dir": name, "files": hashes}


def atomic_copy(source: Path, target: Path) -> None:
    """Copy `source` to `target` under a temp name, then rename: `target` is never a partial file."""
    import shutil

    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def remove_tokenizer(directory: str | os.PathLike, ours, name: str = "tokenizer") -> None:
    """Remove the files `ours` (plain names an earlier export of this folder wrote) from directory/name, and the
    folder when that leaves it empty; everything else stays."""
    target = Path(directory) / name
    for file in sorted(ours):
        path = inside(directory, f"{name}/{file}", "tokenizer file") if plain_name(file) else None
        if path is not None and path.parent == target and (path.is_file() or path.is_symlink()):
            path.unlink()
    if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
        target.rmdir()


def plain_name(name) -> bool:
    """A file name without a folder part."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def _tokenizer_paths(directory: Path, entry: dict) -> tuple[Path, dict[Path, str]]:
    """The tokenizer folder and {file path: sha256} of a manifest's `tokenizer` entry, every path inside the export
    (ManifestError naming the key otherwise)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("files", {}), dict):
        raise ManifestError(f"{directory}: manifest key tokenizer is not {{'dir': ..., 'files': {{name: sha256}}}}")
    folder = inside(directory, entry.get("dir", ""), "manifest key tokenizer.dir")
    files = {}
    for file, digest in sorted(entry.get("files", {}).items()):
        path = inside(directory, file, "manifest key tokenizer.files", base=folder)
        if path.parent != folder:
            raise ManifestError(f"{directory}: manifest key tokenizer.files {file!r} is not a plain file name")
        files[path] = digest
    return folder, files


def verify_tokenizer(directory: str | os.PathLike, entry: dict) -> Path:
    """The tokenizer folder of an export: inside it, every listed file present with its recorded sha256, and no
    file the manifest does not list (the tokenizer loader would read it unchecked; hidden files such as .DS_Store
    are no tokenizer's) (ArtifactError)."""
    folder, files = _tokenizer_paths(Path(directory), entry)
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: tokenizer folder listed in the manifest but missing")
    for path, digest in files.items():
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in the manifest but missing")
        if sha256_verified(path) != digest:
            raise ArtifactError(f"{path}: sha256 differs from the manifest (changed or swapped tokenizer file)")
    for extra in sorted(p for p in folder.iterdir() if p not in files and not p.name.startswith(".")):
        raise ArtifactError(
            f"{extra}: in the tokenizer folder but not listed in the manifest (an added file the "
            f"tokenizer loader would read unchecked): remove it or re-export"
        )
    return folder


def load_manifest(directory: str | os.PathLike) -> Manifest:
    directory = Path(directory)
    path = directory / MANIFEST if directory.is_dir() else directory
    if not path.is_file():
        if (path.parent / INCOMPLETE).is_file():
            raise ManifestError(
                f"{path.parent}: incomplete export (an export into it did not finish, {INCOMPLETE} says so): "
                f"run the export again"
            )
        raise ManifestError(f"{path}: no manifest (not an egovlp-deploy export directory)")
    data = read_json(path, ManifestError, expect=dict)
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ManifestError(f"{path}: manifest format_version {version!r}, this egovlp-deploy reads {FORMAT_VERSION}")
    _check_types(path, data)
    try:
        artifacts = [ArtifactEntry(**a) for a in data["artifacts"]]
        manifest = Manifest(**{**data, "artifacts": artifacts})
    except (KeyError, TypeError) as exc:
        raise ManifestError(f"{path}: malformed manifest ({exc})") from exc
    for a in artifacts:
        if a.role not in ROLES:
            raise ManifestError(f"{path}: artifact {a.file} has unknown role {a.role!r}")
        _check_entry_paths(path.parent, a)
    if manifest.tokenizer:
        _tokenizer_paths(path.parent, manifest.tokenizer)
    return manifest


_KINDS = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}


def _expect(path: Path, key: str, value, *types: type, null: bool = False, minimum: int | None = None) -> None:
    """ManifestError naming `key` unless `value` is one of `types` (null: or None; minimum: an int at least that)."""
    if value is None and null:
        return
    ok = isinstance(value, types) and not isinstance(value, bool)
    if ok and minimum is not None and value < minimum:
        ok = False
    if not ok:
        want = " or ".join(_KINDS[t] for t in types) + (" or null" if null else "")
        want += f" >= {minimum}" if minimum is not None else ""
        raise ManifestError(f"{path}: manifest key {key} is {json.dumps(value)[:60]}, expected {want}")


def _check_types(path: Path, data: dict) -> None:
    """The types of every manifest field a reader uses (the runtime, `info`), so a hand-edited or foreign manifest
    is one ManifestError naming the field, never a TypeError deep inside a reader."""
    for key in ("source_checkpoint", "model_config", "export", "tools", "validation", "tokenizer"):
        if key in data:
            _expect(path, key, data[key], dict)
    for key in ("max_batch", "max_text_len", "frames", "opset"):
        if key in data.get("export", {}):
            _expect(path, f"export.{key}", data["export"][key], int, minimum=1)
    for name, version in data.get("tools", {}).items():
        _expect(path, f"tools.{name}", version, str, null=True)
    if "errors" in data.get("validation", {}):
        _expect(path, "validation.errors", data["validation"]["errors"], list)
    _expect(path, "artifacts", data.get("artifacts"), list)
    for i, a in enumerate(data["artifacts"]):
        key = f"artifacts[{i}]"
        _expect(path, key, a, dict)
        for field_name in ("file", "role", "format", "precision", "sha256", "device", "variant"):
            if field_name in a:
                _expect(path, f"{key}.{field_name}", a[field_name], str)
        if "bytes" in a:
            _expect(path, f"{key}.bytes", a["bytes"], int, minimum=0)
        for field_name, types in (("opset", (int,)), ("export_seconds", (int, float)), ("derived_from", (str,))):
            if field_name in a:
                _expect(path, f"{key}.{field_name}", a[field_name], *types, null=True)
        if "validation" in a:
            _expect(path, f"{key}.validation", a["validation"], dict)
        if "io" in a:
            _check_io(path, f"{key}.io", a["io"])


def _check_io(path: Path, key: str, io) -> None:
    """{"inputs": [{"name", "shape", "dtype"}], "outputs": [...], "dynamic": {symbol: [low, high]}}."""
    _expect(path, key, io, dict)
    for side in ("inputs", "outputs"):
        _expect(path, f"{key}.{side}", io.get(side), list)
        for j, t in enumerate(io[side]):
            _expect(path, f"{key}.{side}[{j}]", t, dict)
            _expect(path, f"{key}.{side}[{j}].name", t.get("name"), str)
            _expect(path, f"{key}.{side}[{j}].dtype", t.get("dtype"), str)
            _expect(path, f"{key}.{side}[{j}].shape", t.get("shape"), list)
    _expect(path, f"{key}.dynamic", io.get("dynamic", {}), dict)
    for symbol, bounds in io.get("dynamic", {}).items():
        ok = isinstance(bounds, list) and len(bounds) == 2 and all(type(b) is int for b in bounds)
        if not ok:
            raise ManifestError(
                f"{path}: manifest key {key}.dynamic.{symbol} is {json.dumps(bounds)[:60]}, expected [low, high]"
            )


def entry_key(entry: ArtifactEntry) -> str:
    """How errors name an artifact's manifest entry: artifacts[role/format/precision(/variant)]."""
    return f"artifacts[{'/'.join(x for x in (entry.role, entry.format, entry.precision, entry.variant) if x)}]"


def _check_entry_paths(directory: Path, entry: ArtifactEntry) -> list[tuple[Path, dict]]:
    """Every path of one artifact entry inside the folder (ManifestError); returns its external data as (path,
    record) pairs."""
    key = f"manifest key {entry_key(entry)}"
    inside(directory, entry.file, f"{key}.file")
    if entry.derived_from is not None:
        inside(directory, entry.derived_from, f"{key}.derived_from")
    if entry.external_data is None:
        return []
    if not isinstance(entry.external_data, list):
        raise ManifestError(f"{directory}: {key}.external_data is not a list")
    out = []
    for i, rec in enumerate(entry.external_data):
        if not isinstance(rec, dict) or not isinstance(rec.get("bytes"), int) or not isinstance(rec.get("sha256"), str):
            raise ManifestError(f"{directory}: {key}.external_data[{i}] is not {{'file', 'bytes', 'sha256'}}")
        out.append((inside(directory, rec.get("file"), f"{key}.external_data[{i}].file"), rec))
    return out


def verify_artifact(
    directory: str | os.PathLike,
    entry: ArtifactEntry,
    manifest_tools: dict | None = None,
    model_config: dict | None = None,
    check_digest: bool = True,
) -> Path:
    """Raise ArtifactError (ManifestError for a path leaving the folder) unless the file and every file it reads
    match the entry; return its path. `model_config`: the manifest's, which an ONNX graph's recorded config digest
    must match. `check_digest=False` leaves the artifact's own sha256 to a loader that hashes the bytes it loads
    (`aoti.load_checked_package`): its size and everything else are still checked."""
    if not check_digest and entry.format != "aoti":
        raise ValueError(f"only an AOTInductor package is hashed by its loader, not a {entry.format} artifact")
    directory = Path(directory)
    external = _check_entry_paths(directory, entry)
    path = directory / entry.file
    check_file(path, entry.bytes, entry.sha256 if check_digest else None)
    if entry.format == "onnx":
        _check_onnx(directory, path, entry, external, model_config)
    elif entry.format == "program":
        _check_program_identity(path, entry)
    check_tool_versions(entry, manifest_tools=manifest_tools)
    return path


def _check_onnx(
    directory: Path,
    path: Path,
    entry: ArtifactEntry,
    external: list[tuple[Path, dict]],
    model_config: dict | None = None,
) -> None:
    """The role and precision stored in the graph, the digest of the model config it was exported from against the
    manifest's `model_config` (the runtime sizes, pads and checks inputs by that config), and its external data:
    each location it names inside the folder and recorded in the entry, each recorded file of the recorded size and
    sha256."""
    from .onnx_export import config_json_digest, read_header

    try:
        meta, locations = read_header(path)
    except Exception as exc:  # onnx raises DecodeError and others on garbage
        raise ArtifactError(f"{path}: not a readable ONNX model ({exc})") from exc
    _check_identity(path, entry, meta.get("egovlp.role"), meta.get("egovlp.precision"))
    recorded_config = meta.get("egovlp.config_sha256")
    if model_config is not None and recorded_config and recorded_config != config_json_digest(model_config):
        raise ArtifactError(
            f"{path}: the graph was exported from another model config than the manifest's model_config "
            f"(config digest {recorded_config}, the manifest's {config_json_digest(model_config)}): an edited "
            f"manifest or a file from another export; re-export the engines folder"
        )
    if locations and entry.external_data is None:
        raise ArtifactError(
            f"{path}: the graph reads external data ({', '.join(map(repr, locations))}) that this "
            f"manifest does not record (written before external data was hashed): re-export the "
            f"engines folder"
        )
    recorded = {p.resolve() for p, _ in external}
    for location in locations:
        data = inside(
            directory, location, f"{entry.file}: external data location", base=path.parent, error=ArtifactError
        )
        if data.resolve() not in recorded:
            raise ArtifactError(
                f"{data}: external data of {entry.file} not recorded in the manifest "
                f"{entry_key(entry)}.external_data: re-export the engines folder"
            )
    for data, rec in external:
        check_file(data, rec["bytes"], rec["sha256"], what=f"external data of {entry.file}: ")


def _check_identity(path: Path, entry: ArtifactEntry, role: str | None, precision: str | None) -> None:
    """The role and precision a file says it holds are the ones its manifest entry lists."""
    if role != entry.role:
        raise ArtifactError(
            f"{path}: the file is a {role!r} graph but the manifest lists it as {entry.role!r} "
            f"(wrong manifest or swapped files)"
        )
    if precision != entry.precision:
        raise ArtifactError(f"{path}: the file is {precision!r} but the manifest says {entry.precision!r}")


def _check_program_identity(path: Path, entry: ArtifactEntry) -> None:
    from .program import ProgramError, read_program_info

    try:
        info = read_program_info(path)
    except ProgramError as exc:
        raise ArtifactError(str(exc)) from exc
    _check_identity(path, entry, info.get("role"), info.get("precision"))


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
    if entry.format in ("aoti", "program") and built.get("torch") and now.get("torch") != built["torch"]:
        what = "AOTInductor package" if entry.format == "aoti" else "torch.export program"
        raise ArtifactError(
            f"{entry.file}: {what} built with torch {built['torch']}, running torch "
            f"{now.get('torch')}: rebuild it (it is tied to the torch that built it)"
        )
    if entry.format == "tensorrt" and built.get("tensorrt") and now.get("tensorrt") != built["tensorrt"]:
        raise ArtifactError(
            f"{entry.file}: TensorRT engine built with TensorRT {built['tensorrt']}, this machine "
            f"has {now.get('tensorrt')}: rebuild it (engines are tied to the TensorRT version)"
        )


def open_artifact(
    directory: str | os.PathLike, role: str, precision: str = "fp32", format: str = "onnx", variant: str = ""
) -> tuple[Path, ArtifactEntry, Manifest]:
    """Find, verify and return (path, entry, manifest) for one artifact of an export directory."""
    manifest = load_manifest(directory)
    entry = manifest.find(role, precision, format, variant)
    directory = Path(directory) if Path(directory).is_dir() else Path(directory).parent
    return verify_artifact(directory, entry, manifest.tools, manifest.model_config), entry, manifest
