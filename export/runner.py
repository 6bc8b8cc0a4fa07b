"""The export run: checkpoint -> artifacts of every requested format, precision and role -> validation -> manifest.

Order: ONNX fp32 per role (each validated right after its export), then fp16/int8 derived from it (validated),
ORT-optimized copies where they measure faster, task-level checks per precision, TensorRT engines from the ONNX,
AOTInductor packages, and last `manifest.json` + `validation.json` + `validation.md`. Every artifact is written
under a temp name and renamed, and the manifest is written last, so an interrupted run never leaves a manifest
that lists a missing or partial file.

The output folder is new, empty, or an earlier export's (its manifest.json, or the export-incomplete.json of a run
that did not finish); anything else is refused before a file is written. Before the first artifact is written the
run records export-incomplete.json and removes the earlier manifest.json: an interrupted run leaves a folder the
runtime refuses as an unfinished export, never a manifest that lists replaced files; a rerun finishes it. Of the
folder's tokenizer/ the run replaces or removes only the files an earlier export recorded there.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from egovlp_deploy.benchmarking import median_ms as _median_ms
from egovlp_deploy.model.factory import load_model
from egovlp_deploy.ort_session import ort_session
from egovlp_deploy.tokenizer import tokenizer_beside

from .journal import Journal, export_identity, read_journal, task_inputs_digest
from .manifest import (
    INCOMPLETE,
    MANIFEST,
    ArtifactEntry,
    Manifest,
    ManifestError,
    check_tokenizer_target,
    copy_tokenizer,
    io_entry,
    load_manifest,
    plain_name,
    remove_tokenizer,
    sha256_verified,
    tool_versions,
)
from .program import PROGRAM_ROLES
from .specs import AOTI_ROLES, FORMATS, PRECISIONS, ROLES, check_roles
from .validate import Check, random_task_set, task_agreement, validate_artifact, validation_sizes

TORCH_DEVICE = re.compile(r"cpu|cuda(:[0-9]+)?")


@dataclass
class ExportOptions:
    formats: tuple[str, ...] = ("onnx",)
    precisions: tuple[str, ...] = ("fp32",)
    roles: tuple[str, ...] = tuple(ROLES)
    frames: int | None = None
    max_batch: int = 8
    max_text_len: int = 32
    opset: int = 20
    attention: str = "reference"  # or "custom-ops" (the kernels' ONNX translation table)
    allow_mismatch: bool = False
    ort_optimize: str = "auto"  # auto (keep where measured faster) | always | never
    egomcq: str | None = None
    video_root: str | None = None
    tokenizer: str | None = None
    max_questions: int = 24
    task_checks: bool = True
    torch_device: str = "cpu"  # where AOTInductor packages and torch.export programs are built for
    aoti_opt_level: str = "O1"
    trt_strongly_typed: bool = False
    trt_refit: bool = False

    def check(self) -> None:
        for name, values, allowed in (("format", self.formats, FORMATS), ("precision", self.precisions, PRECISIONS)):
            bad = [v for v in values if v not in allowed]
            if bad or not values:
                raise ValueError(f"unknown {name}(s) {bad or values}; choose from {list(allowed)}")
        check_roles(self.roles)
        if not self.roles:
            raise ValueError(f"no role to export; choose from {list(ROLES)}")
        built = {fmt: AOTI_ROLES if fmt in ("aoti", "program") else tuple(ROLES) for fmt in self.formats}
        if not any(set(self.roles) & set(roles) for roles in built.values()):  # AOTI and programs: all but `fusion`
            formats = "; ".join(f"--format {fmt} builds {','.join(roles)}" for fmt, roles in built.items())
            raise ValueError(f"{formats}: none of --roles {','.join(self.roles)}, so it would export nothing")
        # The exporters trace the dynamic axes at sizes above 1 (onnx_export.trace_sizes); an invalid size is
        # refused here, before the folder's earlier manifest is retired.
        for flag, value, low in (("--max-batch", self.max_batch, 2), ("--max-text-len", self.max_text_len, 3)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(
                    f"{flag} {value}: must be at least {low} (the exported graphs take every size from 1 up to it)"
                )
        if isinstance(self.max_questions, bool) or not isinstance(self.max_questions, int) or self.max_questions < 1:
            raise ValueError(f"--max-questions {self.max_questions}: must be at least 1")
        paths = (("--egomcq", self.egomcq), ("--video-root", self.video_root), ("--tokenizer", self.tokenizer))
        for flag, value in paths:
            if value is None:
                continue
            kind = Path(value).is_file() if flag == "--egomcq" else Path(value).is_dir()
            if not kind:
                raise ValueError(f"{flag} {value}: no such {'file' if flag == '--egomcq' else 'folder'}")
        if self.ort_optimize not in ("auto", "always", "never"):
            raise ValueError(f"ort_optimize must be auto, always or never, got {self.ort_optimize!r}")
        if (self.egomcq is None) != (self.video_root is None) or (self.egomcq and not self.tokenizer):
            raise ValueError("--egomcq needs --video-root and --tokenizer")
        if not TORCH_DEVICE.fullmatch(str(self.torch_device)):
            raise ValueError(f"--torch-device must be cpu, cuda or cuda:N, got {self.torch_device!r}")
        if "tensorrt" in self.formats:  # before the ONNX graphs TensorRT builds from are made
            from .tensorrt import TensorRTUnavailable, import_tensorrt

            try:
                import_tensorrt()
            except TensorRTUnavailable as exc:
                raise ValueError(f"--format tensorrt: {exc}") from None
        if "onnx" in self.formats or "tensorrt" in self.formats:
            from .onnx_export import MIN_OPSET, max_opset

            top = max_opset()
            if not MIN_OPSET <= self.opset <= top:
                raise ValueError(
                    f"--opset {self.opset}: this installation exports and runs ONNX opsets {MIN_OPSET} to {top} "
                    f"(onnx, onnxscript and onnxruntime)"
                )

    def check_device(self) -> None:
        """ValueError unless the --torch-device that AOTInductor packages and programs are built on is here."""
        if not ({"aoti", "program"} & set(self.formats)) or self.torch_device == "cpu":
            return
        import torch

        index = int(self.torch_device.partition(":")[2] or 0)
        if not torch.cuda.is_available():
            raise ValueError(
                f"--torch-device {self.torch_device}: this torch ({torch.__version__}) sees no CUDA device; "
                f"build --format aoti/program with --torch-device cpu, or on a machine with a GPU"
            )
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"--torch-device {self.torch_device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )


@dataclass
class ExportResult:
    out: Path
    passed: bool
    checks: list[Check] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    manifest: Manifest | None = None

    def fail(self, error: str) -> None:
        """An artifact that could not be made or loaded: the export fails, naming why."""
        self.errors.append(error)
        self.passed = False


# -- the run -------------------------------------------------------------------------------------------------------
class Progress:
    def __init__(self, total: int, stream=None, quiet: bool = False):
        self.total, self.done, self.stream, self.quiet = total, 0, stream, quiet  # stream None: sys.stderr then
        self.t0 = time.perf_counter()

    def step(self, what: str) -> None:
        self.done += 1
        self.say(f"[{self.done}/{self.total}] {what}")

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"{time.perf_counter() - self.t0:7.1f}s  {text}", file=self.stream or sys.stderr, flush=True)


def _verdict(check: Check) -> str:
    w = check.metrics.get("worst")
    mark = "ok" if check.passed else "MISMATCH"
    if w:
        return f"{mark} (cos {w['min_cosine']:.7f}, max rel {w['max_rel']:.1e})"
    return mark


class _LazyRun:
    """An artifact's run that `open_run()` opens at the first call. The task checks need every role of a precision
    at once; a paper-size role's session holds its graph's weights (0.2-1.1 GB fp32) and an arena of activations,
    so the export keeps the sessions of one precision open at a time, only while they run, not those of every role
    and precision it exported from the first export on (and none for checks an interrupted run finished)."""

    def __init__(self, open_run):
        self.open_run, self.run = open_run, None

    def __call__(self, inputs):
        if self.run is None:
            self.run = self.open_run()
        return self.run(inputs)


class _Fp32Graph:
    """The fp32 ONNX graph of one role, the source of its other precisions: exported at the first step that needs
    it, or the file a finished step of an interrupted run left (`kept`, its entry, verified), so a resumed run
    exports a role's graph again only for a step still to do."""

    def __init__(self, model, role: str, path: Path, opts: ExportOptions):
        self.model, self.role, self.path, self.opts = model, role, path, opts
        self.kept = None  # the kept fp32 step's ArtifactEntry
        self.made = None  # this run's OnnxExport

    def make(self) -> tuple[int, float]:
        """(opset, export seconds) of the graph at `path`, exporting it unless this run made or kept it."""
        from . import onnx_export

        if self.made is None and self.kept is None:
            self.made = onnx_export.export_onnx(
                self.model,
                self.role,
                self.path,
                max_batch=self.opts.max_batch,
                max_text_len=self.opts.max_text_len,
                opset=self.opts.opset,
                attention=self.opts.attention,
            )
        if self.made is not None:
            return self.made.opset, self.made.seconds
        return self.kept.opset, self.kept.export_seconds or 0.0


def _identity_settings(opts: ExportOptions) -> dict:
    """The options that shape an artifact's bytes or its verdict (journal.export_identity); those that pick which
    artifacts to make (formats, precisions, roles, task checks) and how the run reports are left out."""
    return {
        "max_batch": opts.max_batch,
        "max_text_len": opts.max_text_len,
        "opset": opts.opset,
        "attention": opts.attention,
        "ort_optimize": opts.ort_optimize,
        "torch_device": opts.torch_device,
        "aoti_opt_level": opts.aoti_opt_level,
        "trt_strongly_typed": opts.trt_strongly_typed,
        "trt_refit": opts.trt_refit,
    }


def _ort_run(path: Path, threads: int | None = None):
    from .onnx_export import ExportError

    session = ort_session(path, threads=threads, error=ExportError)
    names = [o.name for o in session.get_outputs()]
    return lambda inputs: dict(zip(names, session.run(names, inputs)))


def run_export(checkpoint: str, out: str | Path, opts: ExportOptions, quiet: bool = False) -> ExportResult:
    """Export `checkpoint` into `out`, one export at a time per folder (a second run into it is refused at once)."""
    from egovlp_deploy.folder_lock import exclusive_writer

    opts.check()
    opts.check_device()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)  # the lock is the folder's own
    with exclusive_writer(out, "export folder", ValueError):
        try:
            return _export(checkpoint, out, opts, quiet)
        except BaseException:
            if created and not any(out.iterdir()):
                out.rmdir()  # a run refused before it wrote anything leaves no folder behind
            raise


def _export(checkpoint: str, out: Path, opts: ExportOptions, quiet: bool) -> ExportResult:
    from . import onnx_export

    earlier = earlier_tokenizer_files(out)
    remove_stale_temp_files(out, earlier)
    roles = list(opts.roles)
    want_onnx = "onnx" in opts.formats or "tensorrt" in opts.formats
    n_steps = (
        1
        + (len(roles) * len(opts.precisions) if want_onnx else 0)
        + (len(opts.precisions) if want_onnx and opts.task_checks else 0)
        + (len(roles) if "tensorrt" in opts.formats else 0)
        + (len([r for r in roles if r in AOTI_ROLES]) if "aoti" in opts.formats else 0)
        + (_program_steps(roles, opts) * len(_program_precisions(opts)) if "program" in opts.formats else 0)
        + 1
    )
    progress = Progress(n_steps, quiet=quiet)
    model, source = load_model(checkpoint, opts.frames)
    cfg = model.config
    if opts.max_text_len > cfg.text.max_text_length:
        raise ValueError(
            f"--max-text-len {opts.max_text_len}: the model takes at most {cfg.text.max_text_length} text tokens "
            f"({cfg.text.max_position_embeddings} positions, {cfg.text.pad_token_id + 1} reserved before the first)"
        )
    tokenizer = opts.tokenizer or (tokenizer_beside(source["path"]) if source["kind"] != "random" else None)
    # a tokenizer/ holding files of ours only (ManifestError, a ValueError), before anything is written; the record
    # names the files this run copies there too, so a rerun after an interruption may replace them
    coming = set(check_tokenizer_target(tokenizer, out, earlier)) if tokenizer else set()

    @functools.cache
    def task_set():  # the questions of --egomcq or random ones: one set for every precision and artifact kind
        from .validate import egomcq_task_set

        if opts.egomcq:
            return egomcq_task_set(opts.egomcq, opts.video_root, opts.tokenizer, model, opts.max_questions)
        return random_task_set(model)

    if opts.egomcq and opts.task_checks:  # its questions and videos read before anything is written
        task_set()
    identity = export_identity(source, onnx_export.config_digest(cfg), _identity_settings(opts), tool_versions())
    journal = Journal.start(out, identity, earlier | coming)
    if journal.note:
        progress.say(journal.note)
    progress.step(
        f"loaded {source['kind']} checkpoint {source['path']} ({cfg.video.num_frames} frames, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params)"
    )
    manifest = Manifest(
        source_checkpoint=source,
        model_config=cfg.to_dict(),
        export={
            "frames": cfg.video.num_frames,
            "max_batch": opts.max_batch,
            "max_text_len": opts.max_text_len,
            "opset": opts.opset,
            "attention": opts.attention,
            "formats": list(opts.formats),
            "precisions": list(opts.precisions),
            "roles": roles,
        },
    )
    result = ExportResult(out, True, manifest=manifest)
    steps = _Steps(model, opts, out, manifest, progress, result, journal, task_set)
    if want_onnx:
        _onnx_steps(steps, roles)
    if "tensorrt" in opts.formats:
        _export_tensorrt(steps, roles)
    if "aoti" in opts.formats:
        _export_aoti(steps, roles)
    if "program" in opts.formats:
        _export_programs(steps, roles)

    manifest.validation["passed"] = result.passed
    manifest.validation["errors"] = result.errors
    if tokenizer:  # the folder then runs text queries anywhere, without the training run
        manifest.tokenizer = copy_tokenizer(tokenizer, out, ours=earlier)
    else:  # the earlier export's tokenizer belongs to another model: the runtime must not find it
        remove_tokenizer(out, earlier)
    write_report(out, result)
    manifest.save(out)
    (out / INCOMPLETE).unlink(missing_ok=True)
    progress.step(f"manifest.json, validation.json, validation.md written to {out}")
    return result


class _Steps:
    """What the steps of one export run share: the model and options, the folder and its manifest, the progress
    lines, the result every check goes to, the journal of finished steps and the task questions."""

    def __init__(self, model, opts, out, manifest, progress, result, journal, task_set):
        self.model, self.opts, self.out, self.manifest = model, opts, out, manifest
        self.progress, self.result, self.journal, self.task_set = progress, result, journal, task_set
        self.sizes = validation_sizes(opts.max_batch, opts.max_text_len)

    def record(self, check: Check) -> Check:
        self.result.checks.append(check)
        if not check.passed:
            self.result.passed = False
        return check

    def kept(self, key: str, path: Path, what: str | None, **expected) -> ArtifactEntry | None:
        """The artifact an interrupted run of this identity finished (its files verified), recorded again; `what`
        names its progress step (None: it is no step of its own, nor validated against torch). `expected`: the
        entry's fields as this run would write them."""
        found = self.journal.kept_artifact(key, path, artifact_check=what is not None, **expected)
        if found is None:
            return None
        entry, check = found
        self.manifest.keep(entry)
        if check is not None:
            self.record(check)
        if what is not None:
            self.progress.step(f"{what}  kept from the unfinished export ({_verdict(check) if check else 'ok'})")
        return entry

    @functools.cached_property
    def task_inputs(self) -> str:
        """What the task checks run on beside the artifacts: a kept check must have run on the same."""
        opts = self.opts
        return task_inputs_digest(opts.egomcq, opts.video_root, opts.tokenizer, opts.max_questions)

    def validated(
        self, key: str, what: str, role: str, path: Path, run, precision: str, add, note: str = "", **extra
    ) -> ArtifactEntry:
        """Validate the artifact just made at `path` (`run`), record it (`add(check)` -> its manifest entry) and
        the finished step (with `extra` values); `note` ends its progress line."""
        check = self.record(validate_artifact(self.model, role, run, precision, self.sizes))
        entry = add(check)
        self.journal.finished(key, entry, check, **extra)
        self.progress.step(f"{what} {entry.export_seconds or 0.0:6.1f}s  {_verdict(check)}{note}")
        return entry

    def task_checks(self, runs: dict, files: dict, precision: str, label: str = "") -> None:
        """Retrieval and EgoMCQ answers of the artifacts in `runs` (`files`: their {file: sha256}) against torch
        fp32 (`task_agreement`); `label` names the artifact kind when it is not ONNX. An interrupted run's verdict
        is kept when it checked the same files on the same questions."""
        name = "-".join(label.split() + [precision])  # task/fp16, task/program-cuda-fp16
        key = f"task/{name}"
        check = self.journal.kept_check(key, task_inputs=self.task_inputs, artifacts=files)
        if check is not None:
            self.record(check)
            self.manifest.validation[check.name] = {"passed": check.passed, **check.metrics}
            self.progress.step(
                f"task checks {label}{precision:<4}  kept from the unfinished export ({_verdict(check)})"
            )
            return
        tasks = self.task_set()
        check = self.record(task_agreement(self.model, runs, precision, tasks, self.opts.max_batch, name=name))
        self.manifest.validation[check.name] = {"passed": check.passed, **check.metrics}
        self.journal.finished(key, check=check, task_inputs=self.task_inputs, artifacts=files)
        self.progress.step(
            f"task checks {label}{precision:<4} ({tasks.source}, {len(tasks.texts)} questions): "
            f"{'ok' if check.passed else 'MISMATCH'}" + _task_summary(check)
        )


def _onnx_steps(steps: _Steps, roles: list[str]) -> None:
    """ONNX graphs of every role and precision (fp16/int8 derived from the fp32 graph), each validated right after
    it is made, ORT-optimized copies where they measure faster, then the task checks per precision."""
    from . import precision as prec

    opts, out, cfg = steps.opts, steps.out, steps.model.config
    runs: dict[str, dict] = {p: {} for p in opts.precisions}
    checked: dict[str, dict] = {p: {} for p in opts.precisions}  # per precision, {file: sha256} of `runs`
    for role in roles:
        fp32 = _Fp32Graph(steps.model, role, out / "onnx" / "fp32" / f"{role}.onnx", opts)
        for precision in opts.precisions:
            path = out / "onnx" / precision / f"{role}.onnx"
            key, what = f"onnx/{precision}/{role}", f"onnx {precision:<4} {role:<20}"
            runs[precision][role] = _LazyRun(functools.partial(_ort_run, path))  # opened for the task checks
            io = io_entry(role, cfg, precision, opts.max_batch, opts.max_text_len)
            entry = steps.kept(
                key, path, what, role=role, format="onnx", precision=precision, variant="", io=io, derived_from=None
            )
            if entry is not None and precision == "fp32":
                fp32.kept = entry
            if entry is None:
                opset, source_seconds = fp32.make()
                t0 = time.perf_counter()
                extra = {}
                if precision == "fp16":
                    extra = prec.to_fp16(fp32.path, path)
                elif precision == "int8":
                    extra = prec.to_int8(fp32.path, path)
                seconds = source_seconds + time.perf_counter() - t0

                def add(
                    check, precision=precision, path=path, role=role, opset=opset, seconds=seconds, extra=extra, io=io
                ):
                    entry = steps.manifest.add(
                        out,
                        path,
                        role=role,
                        format="onnx",
                        precision=precision,
                        opset=opset,
                        io=io,
                        export_seconds=round(seconds, 2),
                        validation={"passed": check.passed, **check.metrics["worst"]},
                    )
                    if extra:
                        entry.validation["graph"] = extra
                    return entry

                entry = steps.validated(key, what, role, path, _ort_run(path), precision, add)
            checked[precision][entry.file] = entry.sha256
            if precision in ("fp32", "int8") and opts.ort_optimize != "never":
                _optimized_step(steps, f"{key}.ort", role, path, entry)
            else:  # an earlier or interrupted export's optimized copy (a graph's size): this manifest omits it
                path.with_name(f"{role}.ort.onnx").unlink(missing_ok=True)
        if "fp32" not in opts.precisions and _tensorrt_source(opts) != "fp32":
            fp32.path.unlink(missing_ok=True)  # only the source of the derived precisions: not an artifact
    if opts.task_checks:
        for precision in opts.precisions:
            steps.task_checks(runs[precision], checked[precision], precision)
            runs[precision] = {}  # its sessions closed before the next precision's open


def _optimized_step(steps: _Steps, key: str, role: str, path: Path, source: ArtifactEntry) -> None:
    """ORT's optimized copy of the graph at `path` (`source`: its entry), kept or dropped as measured
    (`_maybe_optimized`); an interrupted run's decision on the same graph (by sha256) stands."""
    opt_path = path.with_name(f"{role}.ort.onnx")
    done = steps.journal.step_record(key)
    if done.get("source_sha256") == source.sha256:
        if done.get("dropped") is True:
            opt_path.unlink(missing_ok=True)
            return
        expected = dict(format="onnx", variant="ort-optimized", derived_from=source.file, io=source.io)
        if steps.kept(key, opt_path, None, role=role, precision=source.precision, **expected):
            return
    made = _maybe_optimized(steps, role, path, source.precision, source.opset)
    steps.journal.finished(key, made, source_sha256=source.sha256, dropped=made is None)


def _export_aoti(steps: _Steps, roles: list[str]) -> None:
    from .aoti import AotiLoadError, check_loads_in_child, export_aoti, load_aoti

    opts = steps.opts
    device = opts.torch_device.split(":")[0]
    precision = "fp32" if opts.torch_device == "cpu" else ("fp16" if "fp16" in opts.precisions else "fp32")
    for role in [r for r in roles if r in AOTI_ROLES]:
        path = steps.out / "aoti" / f"{device}_{precision}" / f"{role}.pt2"
        key, what = f"aoti/{device}_{precision}/{role}", f"aoti {precision:<4} {role:<20}"
        io = io_entry(role, steps.model.config, precision, opts.max_batch, opts.max_text_len)
        expected = dict(role=role, format="aoti", precision=precision, device=opts.torch_device, io=io)
        same_gpu = steps.journal.step_record(key).get("gpu") == _gpu(opts.torch_device)
        if same_gpu and steps.kept(key, path, what, derived_from=None, **expected):
            continue
        made = export_aoti(
            steps.model,
            role,
            path,
            max_batch=opts.max_batch,
            max_text_len=opts.max_text_len,
            device=opts.torch_device,
            precision=precision,
            wrapper_opt_level=opts.aoti_opt_level,
        )
        if opts.torch_device != "cpu":  # a CUDA package's loader can crash or hang (check_loads_in_child)
            try:
                check_loads_in_child(path)
            except AotiLoadError as exc:
                steps.result.fail(str(exc))
                steps.progress.step(f"{what} {made.seconds:6.1f}s  NOT LOADABLE: {exc}")
                continue
        run = load_aoti(path, role, opts.torch_device)
        steps.validated(
            key,
            what,
            role,
            path,
            run,
            precision,
            lambda check, path=path, made=made: _add_torch_artifact(
                steps, path, "aoti", opts.torch_device, made, check
            ),
            gpu=_gpu(opts.torch_device),
        )


def _gpu(device: str) -> str | None:
    """The GPU a CUDA artifact is built on (TensorRT engines and AOTInductor packages are built for it): its name
    and compute capability; None for the CPU."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None

    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    major, minor = torch.cuda.get_device_capability(index)
    return f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})"


def _first_record_temp(path: Path) -> bool:
    """A temp file of the exporter's own writes at a folder's top (the INCOMPLETE record an export writes first
    into a new folder, the manifest, the reports), as a kill in that write leaves it: a folder holding only such
    files is as good as empty (the rerun removes them)."""
    return path.is_file() and not path.is_symlink() and bool(_temp_name_patterns(set())["."].fullmatch(path.name))


def earlier_tokenizer_files(out: Path) -> set[str]:
    """The tokenizer/ files an earlier export of `out` wrote (its manifest's, or an unfinished run's record).
    ValueError, before anything is written, for an `out` that is neither new, empty nor an export folder."""
    if not out.exists():
        return set()
    if not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    names: set[str] = set()
    record = read_journal(out)
    if record is not None:
        files = record.get("tokenizer_files")
        if not isinstance(files, list) or not all(plain_name(f) for f in files):
            raise ValueError(f"{out / INCOMPLETE}: tokenizer_files is not a list of file names; nothing was written")
        names |= set(files)
    if (out / MANIFEST).exists():
        try:
            m = load_manifest(out)
        except ManifestError as exc:
            raise ValueError(
                f"{out}: its {MANIFEST} is not one this exporter can read ({exc}); nothing in the folder is touched. "
                f"Give --out a new or empty folder, or an earlier export folder"
            ) from exc
        if m.tokenizer.get("dir") == "tokenizer":
            names |= set(m.tokenizer.get("files", {}))
    elif not (out / INCOMPLETE).is_file() and any(not _first_record_temp(p) for p in out.iterdir()):
        raise ValueError(
            f"{out}: not empty and not an egovlp-deploy export folder (no {MANIFEST}); nothing in it is touched. "
            f"Give --out a new or empty folder, or an earlier export folder"
        )
    return names


def _temp_name_patterns(tokenizer_files: set[str]) -> dict[str, re.Pattern]:
    """Per folder of an export (a glob under it), the names of the temp files its writers use before the rename:
    `.NAME.tmpPID` (ONNX graphs, TensorRT engines and timing cache), `.NAME.qPID` / `.NAME.oPID` (int8 and
    ORT-optimized graphs), `.ROLE.tmpPID.pt2` (AOTInductor), `.NAME.XXXXXXXX.tmp` (atomic_write_bytes: JSON,
    reports, programs) and `.NAME.tmp` (tokenizer copies)."""
    roles = "|".join(map(re.escape, ROLES))
    tokenizer = "|".join(map(re.escape, sorted(tokenizer_files))) or "(?!)"
    mkstemp = r"\.[A-Za-z0-9_]{8}\.tmp"
    return {
        ".": re.compile(rf"\.({re.escape(MANIFEST)}|{re.escape(INCOMPLETE)}|validation\.json|validation\.md){mkstemp}"),
        "onnx/*": re.compile(rf"\.({roles})(\.ort)?\.onnx\.(tmp|q|o)[0-9]+"),
        "aoti/*": re.compile(rf"\.({roles})\.tmp[0-9]+\.pt2"),
        "program/*": re.compile(rf"\.({roles})\.safetensors{mkstemp}"),
        "tensorrt/*": re.compile(rf"\.({roles})\.engine\.tmp[0-9]+"),
        "tensorrt": re.compile(r"\.timing\.cache\.tmp[0-9]+"),
        "tokenizer": re.compile(rf"\.({tokenizer})(\.tmp|{mkstemp})"),
    }


def remove_stale_temp_files(out: Path, tokenizer_files: set[str]) -> list[Path]:
    """Remove the temp files an export killed before its renames left in `out` (a paper-size graph's is a
    gigabyte; each run names its own, so a rerun never replaces them). Only names of the exporter's own temp files
    in the folders it writes are removed, and only under the folder's writer lock (no other export is running)."""
    removed = []
    for where, pattern in _temp_name_patterns(tokenizer_files).items():
        for folder in [out] if where == "." else sorted(out.glob(where)):
            if not folder.is_dir() or folder.is_symlink():
                continue
            for path in sorted(folder.iterdir()):
                if pattern.fullmatch(path.name) and path.is_file() and not path.is_symlink():
                    path.unlink()
                    removed.append(path)
    return removed


def _task_summary(check: Check) -> str:
    parts = []
    r = check.metrics.get("retrieval")
    if r:
        parts.append(
            f"retrieval t2v/v2t top-1 agreement {r['t2v_top1_agreement']:.2f}/{r['v2t_top1_agreement']:.2f} "
            f"(decisive {r['t2v_decisive']:.2f}/{r['v2t_decisive']:.2f})"
        )
    for key, what in (("egomcq", "EgoMCQ answers agree"), ("egomcq_via_head", "EgoMCQ answers (fusion head) agree")):
        e = check.metrics.get(key)
        if e:
            agree = "/".join(f"{e[m]['answer_agreement']:.2f}" for m in ("dual", "fusion", "ensemble"))
            parts.append(f"{what} {agree}")
            if "accuracy_artifact" in e["dual"]:  # questions with answers: accuracy, torch fp32 -> artifact
                parts.append(
                    "accuracy inter/intra % "
                    + ", ".join(
                        f"{m} " + "/".join(f"{e[m]['accuracy_torch_fp32'][k]:.1f}->{v:.1f}" for k, v in acc.items())
                        for m in ("dual", "fusion", "ensemble")
                        for acc in [e[m]["accuracy_artifact"]]
                    )
                )
    h = check.metrics.get("fusion_head_vs_fusion")
    if h:
        parts.append(f"head vs fusion {h['max_abs_vs_fusion_graph']:.1e}")
    return (": " + "; ".join(parts)) if parts else ""


# Time a graph's run (plain and ORT-optimized, per role and precision) for at most about this long, and at least
# 3 times after the warm-up: 7 runs of the paper-size video encoder take over a minute on a small CPU.
ORT_TIMING_SECONDS = 10.0


def _run_ms(call) -> float:
    """Median milliseconds of `call()`: a timed warm-up, then 3 to 7 runs, as many as fit ORT_TIMING_SECONDS."""
    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    repeats = max(3, min(7, int(ORT_TIMING_SECONDS / max(first, 1e-6))))
    return _median_ms(call, repeats=repeats, warmup=0)


def _maybe_optimized(steps: _Steps, role: str, path: Path, precision: str, opset: int) -> ArtifactEntry | None:
    """Save ORT's offline-optimized graph beside `path` where it helps (or always); returns its manifest entry (None:
    dropped).

    A session optimizes its graph at every load anyway (ORT_ENABLE_ALL by default), so the saved graph mainly
    saves load time; it is kept when loading it is faster and running it at batch 1 is not slower (both timed here,
    on this machine)."""
    from .precision import ort_optimize
    from .specs import example_inputs
    from .validate import as_numpy_inputs

    model, opts, cfg, out = steps.model, steps.opts, steps.model.config, steps.out
    opt_path = path.with_name(f"{role}.ort.onnx")
    ort_optimize(path, opt_path)
    inputs = as_numpy_inputs(example_inputs(model, role, 1, min(15, opts.max_text_len), seed=3), precision)
    measured = {}
    for name, p in (("plain", path), ("optimized", opt_path)):
        t0 = time.perf_counter()
        run = _ort_run(p)
        load_ms = (time.perf_counter() - t0) * 1e3
        measured[name] = (load_ms, _run_ms(functools.partial(run, inputs)))
        del run  # one session at a time: a paper-size graph's session holds its weights
    (load_plain, ms_plain), (load_opt, ms_opt) = measured["plain"], measured["optimized"]
    keep = opts.ort_optimize == "always" or (load_opt < load_plain and ms_opt <= ms_plain * 1.05)
    entry = None
    if keep:
        entry = steps.manifest.add(
            out,
            opt_path,
            role=role,
            format="onnx",
            precision=precision,
            opset=opset,
            variant="ort-optimized",
            derived_from=str(path.relative_to(out)),
            io=io_entry(role, cfg, precision, opts.max_batch, opts.max_text_len),
            validation={
                "ms_b1": ms_opt,
                "ms_b1_unoptimized": ms_plain,
                "load_ms": load_opt,
                "load_ms_unoptimized": load_plain,
            },
        )
    else:
        opt_path.unlink()
    steps.progress.say(
        f"      ORT-optimized {precision} {role}: load {load_opt:.0f} vs {load_plain:.0f} ms, run "
        f"{ms_opt:.2f} vs {ms_plain:.2f} ms at B=1 -> {'kept' if keep else 'dropped'}"
    )
    return entry


def _add_torch_artifact(steps: _Steps, path: Path, format: str, device: str, made, check) -> ArtifactEntry:
    """The manifest entry of an AOTInductor package or a program (`made`: its export record)."""
    opts, cfg = steps.opts, steps.model.config
    return steps.manifest.add(
        steps.out,
        path,
        role=made.role,
        format=format,
        precision=made.precision,
        device=device,
        io=io_entry(made.role, cfg, made.precision, opts.max_batch, opts.max_text_len),
        export_seconds=round(made.seconds, 2),
        validation={"passed": check.passed, **check.metrics["worst"]},
    )


def _program_precisions(opts) -> list[str]:
    """fp32 on the CPU (half precision is a GPU format here); on CUDA each requested float precision."""
    if opts.torch_device == "cpu":
        return ["fp32"]
    return [p for p in opts.precisions if p in ("fp32", "fp16")] or ["fp32"]


def _program_steps(roles, opts) -> int:
    """Progress steps per program precision: one per role, and the task checks when there is a program to check."""
    n = len([r for r in roles if r in PROGRAM_ROLES])
    return n + (1 if opts.task_checks and n else 0)


def _export_programs(steps: _Steps, roles: list[str]) -> None:
    from .program import export_program, load_program_runner

    opts = steps.opts
    device = opts.torch_device.split(":")[0]
    # On CUDA `--attention custom-ops` puts the project's Triton kernels in the program as egovlp:: operators.
    attention = "triton" if device == "cuda" and opts.attention == "custom-ops" else "reference"
    for precision in _program_precisions(opts):
        runs, checked = {}, {}
        for role in [r for r in roles if r in PROGRAM_ROLES]:
            path = steps.out / "program" / f"{device}_{precision}" / f"{role}.safetensors"
            key, what = f"program/{device}_{precision}/{role}", f"program {precision:<4} {role:<20}"
            runs[role] = _LazyRun(functools.partial(load_program_runner, path, role, opts.torch_device))
            io = io_entry(role, steps.model.config, precision, opts.max_batch, opts.max_text_len)
            expected = dict(role=role, format="program", precision=precision, device=device, io=io, derived_from=None)
            entry = steps.kept(key, path, what, **expected)
            if entry is None:
                made = export_program(
                    steps.model,
                    role,
                    path,
                    max_batch=opts.max_batch,
                    max_text_len=opts.max_text_len,
                    device=opts.torch_device,
                    precision=precision,
                    attention=attention,
                )
                entry = steps.validated(
                    key,
                    what,
                    role,
                    path,
                    runs[role],
                    precision,
                    lambda check, path=path, made=made: _add_torch_artifact(
                        steps, path, "program", device, made, check
                    ),
                    note=f" ({made.dropped_weights} unused weights left out)",
                )
            checked[entry.file] = entry.sha256
        if opts.task_checks and runs:  # the EgoMCQ answers of these programs (fp16 on CUDA: against torch fp32)
            steps.task_checks(runs, checked, precision, label=f"program {device} ")


def _export_tensorrt(steps: _Steps, roles: list[str]) -> None:
    from .tensorrt import BuildOptions, TensorRTUnavailable, build_engine, run_engine

    opts, out = steps.opts, steps.out
    precision, source = _tensorrt_precision(opts), _tensorrt_source(opts)
    build = BuildOptions(
        precision=precision,
        strongly_typed=opts.trt_strongly_typed,
        refit=opts.trt_refit,
        max_batch=opts.max_batch,
        max_text_len=opts.max_text_len,
        opt_text_len=min(16, opts.max_text_len),
        timing_cache=str(out / "tensorrt" / "timing.cache"),
    )
    try:
        for role in roles:
            _tensorrt_step(steps, role, precision, source, build, build_engine, run_engine)
    except TensorRTUnavailable as exc:
        steps.result.fail(str(exc))
        steps.progress.step(f"tensorrt: unavailable: {exc}")
    finally:
        if source not in opts.precisions:  # the fp32 graphs the engines are built from: no artifact of this export
            for role in roles:
                (out / "onnx" / source / f"{role}.onnx").unlink(missing_ok=True)


def _tensorrt_step(steps: _Steps, role: str, precision: str, source: str, build, build_engine, run_engine) -> None:
    """The engine of one role (kept from an interrupted run, or built and validated)."""
    opts, out, cfg = steps.opts, steps.out, steps.model.config
    onnx_path = out / "onnx" / source / f"{role}.onnx"
    engine = out / "tensorrt" / precision / f"{role}.engine"
    key, what = f"tensorrt/{precision}/{role}", f"tensorrt {precision} {role:<20}"
    io = io_entry(role, cfg, "fp32", opts.max_batch, opts.max_text_len)
    derived_from = str(onnx_path.relative_to(out))
    # The graph it is built from: an engine an interrupted run built (on the same GPU) is kept when that graph is
    # the same, or when it is an fp32 source graph the run removed (no artifact when fp32 is not asked for; the
    # identity decides its bytes, and the engine was validated against torch).
    source_sha256 = sha256_verified(onnx_path) if onnx_path.is_file() else None  # hashed once, as the manifest did
    done = steps.journal.step_record(key)
    same_source = source_sha256 is None or done.get("source_sha256") == source_sha256
    expected = dict(role=role, format="tensorrt", precision=precision, device="cuda", io=io, derived_from=derived_from)
    if done and same_source and done.get("gpu") == _gpu("cuda") and steps.kept(key, engine, what, **expected):
        return
    if source_sha256 is None:  # the removed fp32 source of an engine still to build
        _Fp32Graph(steps.model, role, onnx_path, opts).make()
        source_sha256 = sha256_verified(onnx_path)
    engine.parent.mkdir(parents=True, exist_ok=True)
    facts = build_engine(onnx_path, engine, role, cfg, build, progress=not steps.progress.quiet)
    check = steps.record(validate_artifact(steps.model, role, run_engine(engine, role), precision, steps.sizes))
    entry = steps.manifest.add(
        out,
        engine,
        role=role,
        format="tensorrt",
        precision=precision,
        device="cuda",
        io=io,
        derived_from=derived_from,
        export_seconds=facts["build_seconds"],
        validation={"passed": check.passed, **check.metrics["worst"]},
    )
    entry.validation["build"] = facts
    steps.journal.finished(key, entry, check, source_sha256=source_sha256, gpu=_gpu("cuda"))
    steps.progress.step(f"{what} {facts['build_seconds']:.1f}s  {_verdict(check)}")


def _tensorrt_precision(opts: ExportOptions) -> str:
    return "fp16" if "fp16" in opts.precisions else "fp32"


def _tensorrt_source(opts: ExportOptions) -> str | None:
    """The ONNX precision TensorRT engines are built from (None: no engines asked for)."""
    if "tensorrt" not in opts.formats:
        return None
    return "fp16" if opts.trt_strongly_typed and _tensorrt_precision(opts) == "fp16" else "fp32"


# -- report ----------------------------------------------------------------------------------------------------------
def write_report(out: Path, result: ExportResult) -> None:
    from egovlp_deploy.checkpoint import atomic_write_bytes

    data = {"passed": result.passed, "errors": result.errors, "checks": [c.to_dict() for c in result.checks]}
    atomic_write_bytes(out / "validation.json", json.dumps(data, indent=2).encode())
    atomic_write_bytes(out / "validation.md", format_report(result).encode())


def format_report(result: ExportResult) -> str:
    lines = [
        f"# Export validation: {'PASSED' if result.passed else 'FAILED'}",
        "",
        "| check | verdict | min cosine | max rel err | max abs err |",
        "|---|---|---:|---:|---:|",
    ]
    for c in result.checks:
        w = c.metrics.get("worst")
        if w:
            lines.append(
                f"| {c.name} | {'ok' if c.passed else 'FAIL'} | {w['min_cosine']:.7f} | "
                f"{w['max_rel']:.2e} | {w['max_abs']:.2e} |"
            )
    for c in result.checks:
        if not c.metrics.get("worst"):
            lines += ["", f"**{c.name}** ({'ok' if c.passed else 'FAIL'}){_task_summary(c)}"]
    problems = [f for c in result.checks for f in c.failures] + result.errors
    if problems:
        lines += ["", "## Problems", ""] + [f"- {p}" for p in problems]
    return "\n".join(lines) + "\n"


def summary_dict(result: ExportResult) -> dict:
    return {
        "out": str(result.out),
        "passed": result.passed,
        "errors": result.errors,
        "checks": [{"name": c.name, "passed": c.passed, "failures": c.failures} for c in result.checks],
        "artifacts": [asdict(a) for a in (result.manifest.artifacts if result.manifest else [])],
    }
