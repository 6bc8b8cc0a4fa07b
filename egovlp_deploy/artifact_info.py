"""`egovlp-deploy info PATH`: what a checkpoint, an engines folder or an index holds.

Only JSON files and safetensors headers are read: no weights are loaded, nothing is unpickled, and the only hash
computed is the engines manifest's (a small JSON file). A checkpoint's files are checked against its MANIFEST.json
by size, not by checksum.

`describe` gives the `--json` form (its docstring lists the fields), `format_description` the text form.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .checkpoint import MANIFEST as CHECKPOINT_MANIFEST
from .export.manifest import INCOMPLETE as ENGINES_INCOMPLETE
from .export.manifest import MANIFEST as ENGINES_MANIFEST
from .model.egovlp import CONFIG_FILE, WEIGHTS_FILE
from .runtime.index import INDEX_FILE

FORMAT_VERSION = 1
KINDS = ("checkpoint", "engines", "index")
# A file named here stands for the folder it is in.
MARKER_FILES = (WEIGHTS_FILE, CONFIG_FILE, ENGINES_MANIFEST, INDEX_FILE, CHECKPOINT_MANIFEST)
MAX_HEADER_BYTES = 100 << 20  # safetensors caps its JSON header at 100 MB


def detect(path: str | os.PathLike) -> tuple[str, Path]:
    """(kind, folder) of an artifact path; a ValueError naming the path when it is none of KINDS."""
    path = Path(path)
    if not path.exists():
        if path.is_symlink():  # exists() is False for a dangling link and for a loop of links
            raise ValueError(f"{path}: a symlink to {os.readlink(path)}, which does not exist (or is a symlink loop)")
        raise ValueError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix in (".pth", ".pt"):
            raise ValueError(
                f"{path}: a torch .pth file; info reads only safetensors checkpoints (reading a .pth "
                "means unpickling it): describe the save_pretrained folder or training run instead"
            )
        if path.name not in MARKER_FILES:
            raise ValueError(f"{path}: not a checkpoint, an engines folder or an index")
        path = path.parent
    if (path / INDEX_FILE).is_file():
        return "index", path
    if (path / "checkpoints").is_dir() or (path / WEIGHTS_FILE).is_file():
        return "checkpoint", path
    if (path / ENGINES_MANIFEST).is_file() or (path / ENGINES_INCOMPLETE).is_file():
        return "engines", path  # an unfinished export: the engines reader says so
    raise ValueError(
        f"{path}: not a checkpoint, an engines folder or an index (no {WEIGHTS_FILE}, checkpoints/, "
        f"{ENGINES_MANIFEST} or {INDEX_FILE} in it)"
    )


def describe(path: str | os.PathLike, engines: str | os.PathLike | None = None) -> dict:
    """What the artifact at `path` holds. `engines`: for an index, the engines folder to compare with the recorded
    one (default: the recorded folder itself).

    The `--json` form of `egovlp-deploy info PATH`, a stable contract: every object has `kind` ("checkpoint" |
    "engines" | "index"), `format_version` (FORMAT_VERSION, raised only when a field changes meaning or goes away;
    new fields may be added) and `path` (the folder described, absolute), then per kind:

    checkpoint (a `save_pretrained` folder, a trainer checkpoint `step_N`, or a training RUN folder: its newest step)
        checkpoint_kind  "trainer" (a step_N folder with MANIFEST.json) or "pretrained" (config.json + weights)
        step             the training step (trainer checkpoints; else null)
        complete         every file MANIFEST.json lists is there with its size (trainer checkpoints; else null)
        run              {"path", "steps": [every step under RUN/checkpoints]} when PATH is a RUN folder, else null
        config           the model config (config.json)
        weights          {"file", "bytes", "tensors", "parameters", "dtypes": {dtype: tensors},
                          "parameters_by_module": {top-level module: parameters}}
        tokenizer        the tokenizer folder a training run keeps beside its checkpoints (RUN/tokenizer), or null
    engines (an export folder: manifest.json + artifacts)
        manifest_format_version, created, model_id, manifest_sha256
        source_checkpoint  {"path", "kind", "sha256"} as the manifest records it
        config           the model config the engines were exported from
        max_batch, max_text_len
        roles, formats, precisions   sorted lists over the artifacts
        artifacts        [{"file", "role", "format", "precision", "variant", "bytes", "passed",
                           "inputs": [{"name", "shape", "dtype"}], "outputs": [...]}]
        validation       {"passed", "errors": [...], "checks": {check: passed}}
        tokenizer        {"dir", "files": [names]} of the tokenizer copied into the folder, or null
    index (a folder with index.json)
        index_version, created, updated, model_id
        engines          the engines folder the index was built with (as recorded)
        engines_manifest_sha256  that export's manifest hash (null for indexes written before it was recorded)
        exports          [{"engines", "engines_manifest_sha256", "backend", "precision", "windows"}]: the export
                         that built the index first (the fields above), then each other export or precision that
                         extended it, with the clips each encoded
        engines_now      the engines at `engines=` (or else at the recorded folder) as they are now:
                         {"path", "model_id", "manifest_sha256", "same_model", "same_export"}, or {"path", "error"}
        backend, precision, settings, embed_dim
        windows          clips indexed, all videos together
        shards           {"count", "bytes"}
        videos           [{"path", "name", "windows", "indexed"}] (name: as `search` shows it)
    """
    kind, folder = detect(path)
    if engines is not None and kind != "index":
        raise ValueError(f"{folder}: --engines compares an index with an engines folder; this is {kind!r}")
    head = {"kind": kind, "format_version": FORMAT_VERSION, "path": str(folder.resolve())}
    if kind == "checkpoint":
        return {**head, **_checkpoint(folder)}
    if kind == "engines":
        return {**head, **_engines(folder)}
    return {**head, **_index(folder, engines)}


# -- checkpoints ------------------------------------------------------------------------------------------------
def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file ({tensor: {"dtype", "shape", "data_offsets"}}, "__metadata__"); only
    the header bytes are read."""
    from .checkpoint import CheckpointError

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if not 0 < length <= min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(f"{path}: not a safetensors file (or truncated)")
            header = json.loads(f.read(length))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a safetensors file (unreadable header: {exc})") from exc
    except RecursionError:  # a header of thousands of nested brackets: no safetensors header nests that deep
        raise CheckpointError(f"{path}: not a safetensors file (its header is nested too deeply)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (the header is not a JSON object)")
    return header


def _weights(path: Path) -> dict:
    from .checkpoint import CheckpointError

    tensors = {k: v for k, v in safetensors_header(path).items() if k != "__metadata__"}
    dtypes: dict[str, int] = {}
    by_module: dict[str, int] = {}
    total = 0
    for name, t in tensors.items():
        try:
            count = 1
            for d in t["shape"]:
                count *= int(d)
            dtypes[t["dtype"]] = dtypes.get(t["dtype"], 0) + 1
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: malformed safetensors header entry {name!r}") from exc
        module = name.split(".", 1)[0]
        by_module[module] = by_module.get(module, 0) + count
        total += count
    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        "tensors": len(tensors),
        "parameters": total,
        "dtypes": dict(sorted(dtypes.items())),
        "parameters_by_module": by_module,
    }


def _checkpoint(folder: Path) -> dict:
    from .checkpoint import STEP_DIR, CheckpointError, list_checkpoints
    from .jsonfile import read_json
    from .tokenizer import tokenizer_beside

    run = None
    if (folder / "checkpoints").is_dir():  # a training run: its newest checkpoint
        steps = list_checkpoints(folder / "checkpoints")
        if not steps:
            raise CheckpointError(f"{folder}: a training run with no checkpoint under checkpoints/ yet")
        run = {"path": str(folder.resolve()), "steps": [int(STEP_DIR.match(p.name).group(1)) for p in steps]}
        folder = steps[-1]
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder}: no {name} (not a checkpoint folder)")
    step = complete = None
    checkpoint_kind = "pretrained"
    if (folder / CHECKPOINT_MANIFEST).is_file():
        checkpoint_kind = "trainer"
        manifest = read_json(folder / CHECKPOINT_MANIFEST, CheckpointError, expect=dict)
        step = manifest.get("step")
        files = manifest.get("files") or {}
        complete = bool(files) and all(
            (folder / name).is_file() and (folder / name).stat().st_size == meta.get("bytes")
            for name, meta in files.items()
        )
    tokenizer = tokenizer_beside(folder)
    config = read_json(folder / CONFIG_FILE, CheckpointError, expect=dict)
    for section in ("video", "text"):  # the text form reads their fields
        if not isinstance(config.get(section, {}), dict):
            raise CheckpointError(
                f"{folder / CONFIG_FILE}: {section} must be a JSON object, got {type(config[section]).__name__}"
            )
    return {
        "path": str(folder.resolve()),
        "checkpoint_kind": checkpoint_kind,
        "step": step,
        "complete": complete,
        "run": run,
        "config": config,
        "weights": _weights(folder / WEIGHTS_FILE),
        "tokenizer": str(tokenizer.resolve()) if tokenizer else None,
    }


# -- engines ----------------------------------------------------------------------------------------------------
def _tensors(specs: list) -> list[dict]:
    return [{"name": t.get("name"), "shape": t.get("shape"), "dtype": t.get("dtype")} for t in specs]


def _engines(folder: Path) -> dict:
    from .runtime.engines import EngineFolder

    engines = EngineFolder(folder)
    m = engines.manifest
    artifacts = [
        {
            "file": a.file,
            "role": a.role,
            "format": a.format,
            "precision": a.precision,
            "variant": a.variant,
            "bytes": a.bytes,
            "passed": a.validation.get("passed"),
            "inputs": _tensors(a.io.get("inputs", [])),
            "outputs": _tensors(a.io.get("outputs", [])),
        }
        for a in m.artifacts
    ]
    checks = {name: v.get("passed") for name, v in m.validation.items() if isinstance(v, dict)}
    tokenizer = {"dir": m.tokenizer.get("dir"), "files": sorted(m.tokenizer.get("files", {}))} if m.tokenizer else None
    return {
        "manifest_format_version": m.format_version,
        "created": m.created,
        "model_id": engines.model_id,
        "manifest_sha256": engines.manifest_sha256,
        "source_checkpoint": {k: m.source_checkpoint.get(k) for k in ("path", "kind", "sha256")},
        "config": m.model_config,
        "max_batch": engines.max_batch,
        "max_text_len": engines.max_text_len,
        "roles": sorted({a.role for a in m.artifacts}),
        "formats": sorted({a.format for a in m.artifacts}),
        "precisions": sorted({a.precision for a in m.artifacts}),
        "artifacts": artifacts,
        "validation": {
            "passed": m.validation.get("passed"),
            "errors": list(m.validation.get("errors", [])),
            "checks": checks,
        },
        "tokenizer": tokenizer,
    }


# -- indexes ----------------------------------------------------------------------------------------------------
def _engines_now(data: dict, engines: str | os.PathLike | None) -> dict:
    """The engines an index would be searched with, compared with the ones that built it."""
    from .runtime.engines import EngineError, EngineFolder

    path = engines or data.get("engines")
    try:
        folder = EngineFolder(path)
        model_id, sha = folder.model_id, folder.manifest_sha256
    except (EngineError, OSError, TypeError) as exc:
        return {"path": str(path), "error": str(exc)}
    recorded = data.get("engines_manifest_sha256")
    return {
        "path": str(Path(path).resolve()),
        "model_id": model_id,
        "manifest_sha256": sha,
        "same_model": model_id == data.get("model_id"),
        "same_export": None if recorded is None else sha == recorded,
    }


def _index(folder: Path, engines: str | os.PathLike | None) -> dict:
    from .runtime.index import display_names, exports, read_index_json, shard_path

    data = read_index_json(folder)
    videos = data.get("videos", [])
    names = display_names([v["path"] for v in videos])
    shard_files = [shard_path(folder, s.get("file")) for v in videos for s in v.get("shards", [])]  # confined
    return {
        "index_version": data.get("version"),
        "created": data.get("created"),
        "updated": data.get("updated"),
        "model_id": data.get("model_id"),
        "engines": data.get("engines"),
        "engines_manifest_sha256": data.get("engines_manifest_sha256"),
        "engines_now": _engines_now(data, engines),
        "exports": exports(data),
        "backend": data.get("backend"),
        "precision": data.get("precision"),
        "settings": data.get("settings"),
        "embed_dim": data.get("embed_dim"),
        "windows": sum(v.get("done", 0) for v in videos),
        "shards": {"count": len(shard_files), "bytes": sum(p.stat().st_size for p in shard_files if p.is_file())},
        "videos": [
            {"path": v["path"], "name": names[v["path"]], "windows": v.get("windows"), "indexed": v.get("done")}
            for v in videos
        ],
    }


# -- text -------------------------------------------------------------------------------------------------------
def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _model_line(config: dict) -> str:
    v, t = config.get("video", {}), config.get("text", {})
    return (
        f"video {v.get('num_frames')} frames of {v.get('img_size')} px (patch {v.get('patch_size')}, width "
        f"{v.get('width')}, depth {v.get('depth')}); text {t.get('num_hidden_layers')} layers of "
        f"{t.get('hidden_size')}, vocabulary {t.get('vocab_size')}; fusion in the top "
        f"{config.get('num_fuse_blocks')}; {config.get('projection')} projection to {config.get('projection_dim')}"
    )


def _io(specs: list[dict]) -> str:
    return ", ".join(f"{t['name']}[{','.join(str(d) for d in t['shape'] or [])}] {t['dtype']}" for t in specs)


def format_description(d: dict, max_videos: int = 20) -> str:
    """The text form of `describe`'s dict: the same fields, one per line."""
    rows: list[tuple[str, str]] = []
    if d["kind"] == "checkpoint":
        what = f"{d['checkpoint_kind']} checkpoint"
        if d["step"] is not None:
            what += f", step {d['step']}"
        if d["complete"] is not None:
            what += (
                ", complete (every file of MANIFEST.json, by size)"
                if d["complete"]
                else ", INCOMPLETE (a file of MANIFEST.json is missing or has another size)"
            )
        rows.append(("kind", what))
        if d["run"]:
            steps = d["run"]["steps"]
            rows.append(
                (
                    "run",
                    f"{d['run']['path']}: {len(steps)} checkpoint(s), steps "
                    f"{', '.join(map(str, steps))}; described: the newest",
                )
            )
        rows.append(("model", _model_line(d["config"])))
        w = d["weights"]
        dtypes = ", ".join(f"{k} {n}" for k, n in w["dtypes"].items())
        rows.append(
            (
                "weights",
                f"{w['file']}, {_mb(w['bytes'])}, {w['tensors']} tensors ({dtypes}), {w['parameters']:,} parameters",
            )
        )
        rows.append(("by module", ", ".join(f"{k} {n:,}" for k, n in w["parameters_by_module"].items())))
        rows.append(("tokenizer", d["tokenizer"] or "none beside it (export then needs --tokenizer)"))
    elif d["kind"] == "engines":
        src = d["source_checkpoint"]
        rows.append(
            (
                "model id",
                f"{d['model_id']} (from {src['kind']} checkpoint {src['path']}, sha256 {(src['sha256'] or '-')[:16]})",
            )
        )
        rows.append(
            (
                "manifest",
                f"format {d['manifest_format_version']}, sha256 {d['manifest_sha256']}, created {d['created']}",
            )
        )
        rows.append(("model", _model_line(d["config"])))
        rows.append(("limits", f"batch up to {d['max_batch']}, text up to {d['max_text_len']} tokens"))
        rows.append(("roles", ", ".join(d["roles"])))
        rows.append(("formats", f"{', '.join(d['formats'])}; precisions {', '.join(d['precisions'])}"))
        val = d["validation"]
        verdict = {True: "passed", False: "FAILED", None: "not recorded"}[val["passed"]]
        checks = ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in val["checks"].items())
        rows.append(
            ("validation", verdict + (f" ({checks})" if checks else "") + "".join(f"; {e}" for e in val["errors"]))
        )
        tok = d["tokenizer"]
        rows.append(("tokenizer", f"{tok['dir']}/ ({len(tok['files'])} files)" if tok else "none copied in"))
    else:
        rows.append(("model id", d["model_id"]))
        sha = d["engines_manifest_sha256"]
        rows.append(
            (
                "built with",
                f"{d['engines']} ({d['backend']}, {d['precision']}; manifest sha256 {sha or 'not recorded'})",
            )
        )
        for e in d.get("exports", [])[1:]:  # the exports that extended it
            rows.append(
                (
                    "extended with",
                    f"{e['engines']} ({e['backend']}, {e['precision']}; manifest sha256 "
                    f"{e['engines_manifest_sha256']}): {e['windows']} clips",
                )
            )
        now = d["engines_now"]
        if "error" in now:
            rows.append(("engines now", f"{now['path']}: cannot be read ({now['error']})"))
        else:
            same = (
                "the same export"
                if now["same_export"]
                else "another export of the same model"
                if now["same_export"] is False and now["same_model"]
                else "the same model"
                if now["same_model"]
                else f"ANOTHER MODEL ({now['model_id']}): search refuses it"
            )
            rows.append(("engines now", f"{now['path']}: {same} (manifest sha256 {now['manifest_sha256']})"))
        s = d["settings"] or {}
        windows = (
            "annotated segments"
            if s.get("mode") == "segments"
            else f"windows of {s.get('window_sec')} s every {s.get('stride_sec')} s"
        )
        prefixes = f"fusion prefixes ({s.get('prefix_dtype')})" if s.get("prefixes") else "no fusion prefixes"
        rows.append(("settings", f"{windows}, {s.get('frames')} frames per clip, {prefixes}"))
        rows.append(
            (
                "contents",
                f"{len(d['videos'])} videos, {d['windows']} clips, {d['embed_dim']}-d embeddings, "
                f"{d['shards']['count']} shards ({_mb(d['shards']['bytes'])})",
            )
        )
        rows.append(("created", f"{d['created']}, updated {d['updated'] or '-'}"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{d['kind']} {d['path']} (info format {d['format_version']})"]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    if d["kind"] == "engines":
        lines.append("  artifacts")
        for a in d["artifacts"]:
            variant = f" {a['variant']}" if a["variant"] else ""
            passed = {True: "ok", False: "FAILED", None: "-"}[a["passed"]]
            lines.append(
                f"    {a['role']:<20} {a['format']} {a['precision']}{variant}  {_mb(a['bytes'])}  {passed}  {a['file']}"
            )
            lines.append(f"      {_io(a['inputs'])} -> {_io(a['outputs'])}")
    elif d["kind"] == "index":
        lines.append("  videos")
        shown = d["videos"][:max_videos]
        name_width = max((len(v["name"]) for v in shown), default=0)
        for v in shown:
            lines.append(f"    {v['name']:<{name_width}}  {v['indexed']} of {v['windows']} clips")
        if len(d["videos"]) > max_videos:
            lines.append(f"    ... and {len(d['videos']) - max_videos} more (--json lists them all)")
    return "\n".join(lines)
