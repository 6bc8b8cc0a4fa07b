"""`egovlp-deploy train`: pre-train EgoVLPv2 with EgoNCE + MLM + VTM (hard negatives), or fine-tune it for EK-100
multi-instance retrieval or Charades-Ego, on one CPU or many GPUs.

    egovlp-deploy train --config tiny_synthetic.json --output runs/tiny            # one process
    torchrun --nproc-per-node 8 --no-python egovlp-deploy train --config pretrain_egoclip.json --output runs/pt
    torchrun --nproc-per-node 8 --no-python egovlp-deploy train --config finetune_epic_mir.json --output runs/epic

The loop, top to bottom: build tokenizer, model, data; then per optimizer step: forward the task's objectives on
`grad_accum_steps` micro-batches (DDP syncs gradients on the last one), guard against NaN/inf, step AdamW and the
cosine schedule, log, and checkpoint every N steps; evaluate every epoch. The config's `task` picks the objectives,
the data and the evaluation: "pretrain" EgoNCE + MLM + VTM on EgoClip, evaluated on EgoMCQ (sharded over the
ranks); "epic_mir" the adaptive max-margin ranking loss on EK-100 MIR, evaluated by nDCG/mAP on its test split;
"charades" the symmetric softmax loss on Charades-Ego, evaluated by mAP on its test split (both fine-tuning
evaluations sharded over the ranks too, their embeddings gathered for the metrics). Every checkpoint stores what an
exact resume needs (weights, optimizer, schedule, scaler, RNG states, data position); `--resume` continues from the
newest valid one and reaches the same weights, bit for bit, as a run that was never interrupted.

Exit status: 0 done; 1 the run cannot go on (it diverged, `--resume` found no valid checkpoint, the tokenizer and the
model do not fit); 2 a bad config, data file or argument (checked before any work starts; a video that does not
decode when it is read, the error naming the checkpoints kept for --resume); 130/143 interrupted (Ctrl-C/SIGTERM;
rerun with --resume). Errors are one line; EGOVLP_DEBUG=1 adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from egovlp_deploy.checkpoint import (
    MANIFEST,
    CheckpointError,
    atomic_write_bytes,
    latest_valid_checkpoint,
    list_checkpoints,
)
from egovlp_deploy.config import ConfigError, EgoVLPv2Config
from egovlp_deploy.data.errors import DataError
from egovlp_deploy.decoding import release_frame_cache
from egovlp_deploy.evaluation import (
    charades_test_dataset,
    epic_test_dataset,
    evaluate_charades,
    evaluate_egomcq,
    evaluate_epic_mir,
    format_retrieval,
    format_table,
    skipped_note,
)
from egovlp_deploy.folder_lock import exclusive_writer
from egovlp_deploy.jsonfile import json_text, read_json
from egovlp_deploy.model import EgoVLPv2
from egovlp_deploy.model.egovlp import CONFIG_FILE
from egovlp_deploy.model.factory import load_model, model_at_frames, new_model, preset_config
from egovlp_deploy.tokenizer import TokenizerError, check_savable_path, check_tokenizer_fits

from . import distributed as D
from .batching import FinetuneCollator, IndexedDataset, PretrainCollator
from .config import RULES, TEXT, TrainConfig
from .objectives import FinetuneObjective, PretrainObjective
from .optim import build_optimizer, build_scheduler
from .text_warmup import simcse_warmup
from .training_state import (
    data_fingerprint,
    fingerprint_changes,
    load_checkpoint,
    remove_stale_temp_dirs,
    save_checkpoint,
)


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, or the data and the model do not fit)."""


# -- building blocks ---------------------------------------------------------------------------------------------
def build_tokenizer(cfg: TrainConfig, output_dir: Path, info: D.DistInfo):
    from egovlp_deploy.tokenizer import load_tokenizer, train_demo_tokenizer

    if cfg.data.tokenizer != "demo":
        return load_tokenizer(cfg.data.tokenizer, allow_download=cfg.data.allow_download)
    path = output_dir / "tokenizer"
    if info.is_main and not (path / "tokenizer.json").is_file():
        train_demo_tokenizer(path)
    D.barrier()
    return load_tokenizer(path)


def build_model(
    cfg: TrainConfig,
    vocab_size: int,
    init_reports: list | None = None,
    pretrained: bool = True,
    resume_from: Path | None = None,
) -> EgoVLPv2:
    """The model a run trains (train mode), made by the model factory: loaded (model.init_from, at the run's frame
    count), or new from the preset or model.config_file with the section's init options, its towers filled from
    pretrained files (model.init_video / init_text; each report appended to `init_reports`; skipped with
    pretrained=False, when a resumed checkpoint overwrites them anyway). A resumed run is built from the config.json
    of its verified checkpoint `resume_from` (its weights are loaded with the training state): the files it started
    from (model.init_from, model.config_file) are not read again, so a resume does not need them any more."""
    m = cfg.model
    if resume_from is not None:
        try:
            model = EgoVLPv2(EgoVLPv2Config.from_json_file(resume_from / CONFIG_FILE))
        except ConfigError as exc:
            raise CheckpointError(f"{resume_from / CONFIG_FILE}: {exc}") from exc
    elif m.init_from:
        model, _ = load_model(m.init_from, frames=m.num_frames)
    else:
        try:
            if m.config_file:
                config = EgoVLPv2Config.from_json_file(m.config_file).with_num_frames(m.num_frames)
            else:
                config = preset_config(
                    m.preset,
                    m.num_frames,
                    vocab_size=vocab_size,
                    projection=m.projection,
                    img_size=m.img_size,
                    patch_size=m.patch_size,
                    time_init=m.time_init,
                    temporal_embed_std=m.temporal_embed_std,
                )
            if m.cross_gate_init:
                config = dataclasses.replace(config, cross_gate_init=m.cross_gate_init)
                config.validate()
        except ConfigError as exc:
            raise ConfigError(f"model: {exc}") from exc
        model, reports = new_model(config, *((m.init_video, m.init_text) if pretrained else (None, None)))
        if init_reports is not None:
            init_reports.extend(reports)
    if m.text_dropout is not None:
        t = model.config.text
        t.hidden_dropout_prob = t.attention_probs_dropout_prob = m.text_dropout
        for module in model.text_model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = m.text_dropout
    return model.train()


def class_counts(cfg: TrainConfig) -> tuple[int, int]:
    meta = cfg.resolve(cfg.data.meta_json)
    if meta is not None and meta.is_file():
        data = read_json(meta, ConfigError, expect=dict)
        try:
            return int(data["num_verbs"]), int(data["num_nouns"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{meta}: needs integer num_verbs and num_nouns ({exc!r})") from exc
    return cfg.data.num_verbs, cfg.data.num_nouns


EVAL_NAMES = {"pretrain": "EgoMCQ", "epic_mir": "EK-100 MIR", "charades": "Charades-Ego"}


def build_datasets(cfg: TrainConfig, model_config: EgoVLPv2Config, eval_frames: int):
    """(training set, evaluation set or None) of the config's task."""
    if cfg.task == "epic_mir":
        return build_epic_datasets(cfg, model_config, eval_frames)
    if cfg.task == "charades":
        return build_charades_datasets(cfg, model_config, eval_frames)
    from egovlp_deploy.data.egoclip import EgoClipDataset
    from egovlp_deploy.data.egomcq import EgoMCQDataset

    num_verbs, num_nouns = class_counts(cfg)
    d, size = cfg.data, model_config.video.img_size
    train = EgoClipDataset(
        cfg.resolve(d.egoclip_csv),
        cfg.resolve(d.video_root),
        model_config.video.num_frames,
        size,
        split="train",
        num_verbs=num_verbs,
        num_nouns=num_nouns,
        neg_window=d.neg_window,
        strict=d.strict,
        backend=d.backend,
        seed=cfg.seed,
        frame_cache_bytes=d.frame_cache_mb * 2**20,
    )
    mcq_path = cfg.resolve(d.egomcq_json)
    evaluation = None
    if mcq_path is not None and mcq_path.is_file():
        evaluation = EgoMCQDataset(
            mcq_path,
            cfg.resolve(d.video_root),
            eval_frames,
            size,
            num_verbs=num_verbs,
            num_nouns=num_nouns,
            strict=d.strict,
            backend=d.backend,
        )
    return train, evaluation


def training_data_fingerprint(train_set) -> dict:
    """`data_fingerprint` of the training set: the annotation files it read and the sizes of the video files its
    rows read."""
    return data_fingerprint(train_set.annotation_files(), train_set.video_root, train_set.video_files())


def resumed_load_counts(state: dict, info: D.DistInfo) -> tuple[int, int]:
    """This process's (load failures, clips read) as `state` saved them, one pair per process: a resumed run counts
    on from them. Launched with another number of processes, rank 0 takes the sums (the run's totals carry on) and
    the others start at 0; a checkpoint of an older trainer, without counts, starts every process at 0."""
    failures, read = state.get("load_failures"), state.get("clips_read")
    if not isinstance(failures, list) or not isinstance(read, list) or len(failures) != len(read):
        return 0, 0
    if len(failures) == info.world_size:
        return int(failures[info.rank]), int(read[info.rank])
    return (int(sum(failures)), int(sum(read))) if info.is_main else (0, 0)


def build_epic_datasets(cfg: TrainConfig, model_config: EgoVLPv2Config, eval_frames: int):
    """EK-100 MIR: the train split (captions sampled by relevancy, jittered frames) and the test split, which the
    official fine-tuning validates on (EK-100 MIR has no separate validation split)."""
    from egovlp_deploy.data.epic import EpicMIRDataset, split_files

    d, size = cfg.data, model_config.video.img_size
    root, video_root = cfg.resolve(d.annotations), cfg.resolve(d.video_root)
    files = split_files(root, "train")
    train = EpicMIRDataset(
        files["csv"],
        video_root,
        model_config.video.num_frames,
        size,
        split="train",
        sentence_csv=files["sentence_csv"],
        relevancy_path=files["relevancy"],
        strict=d.strict,
        backend=d.backend,
        seed=cfg.seed,
    )
    test = epic_test_dataset(root, video_root, eval_frames, size, strict=d.strict)
    return train, test


def build_charades_datasets(cfg: TrainConfig, model_config: EgoVLPv2Config, eval_frames: int):
    """Charades-Ego: one training clip per action of metadata_train.csv and the test split with the class prompts
    (the official fine-tuning validates on the test split)."""
    from egovlp_deploy.data.charades import CharadesEgoDataset

    d, size = cfg.data, model_config.video.img_size
    root, video_root = cfg.resolve(d.annotations), cfg.resolve(d.video_root)
    train = CharadesEgoDataset(
        root / "metadata_train.csv",
        video_root,
        model_config.video.num_frames,
        size,
        split="train",
        num_classes=d.num_classes,
        strict=d.strict,
        backend=d.backend,
        seed=cfg.seed,
    )
    test = charades_test_dataset(root, video_root, eval_frames, size, d.num_classes, strict=d.strict)
    return train, test


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """None = fp32. On CPU everything runs in fp32 whatever `precision` says; bf16 autocast would be faster on a CPU
    with AVX512-BF16, and the CPU recipes keep fp32 all the same (TRAINING_LOG.md)."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class MetricsLog:
    """Append-only JSONL (rank 0), flushed per line; optional TensorBoard mirror. `rows` counts the file's lines
    (`rows` at the start: those already there), which each checkpoint stores for `rewind_log`. A resumed run passes
    its first step as `purge_step`: TensorBoard then hides the points the interrupted run logged from that step on,
    as `rewind_log` cuts them from the JSONL."""

    def __init__(self, path: Path, enabled: bool, tensorboard: bool, rows: int = 0, purge_step: int | None = None):
        self.enabled = enabled
        self.rows = rows
        self.file = open(path, "a", buffering=1) if enabled else None
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise TrainingError("log.tensorboard is on but the tensorboard package is not installed") from exc
            self.writer = SummaryWriter(str(path.parent / "tensorboard"), purge_step=purge_step)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json_text(record) + "\n")
        self.rows += 1
        if self.writer is not None:
            for key, value in _flat(record).items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.writer:
            self.writer.close()


def logged_evaluation(path: Path, rows: int | None, step: int) -> dict | None:
    """The evaluation result a run logged as the first row after a checkpoint of `step` that holds `rows` lines
    of the log (the epoch-end evaluation a run finished after that checkpoint), or None."""
    if rows is None or not path.is_file():
        return None
    lines = path.read_bytes().splitlines(keepends=True)
    if len(lines) <= rows or not lines[rows].endswith(b"\n"):
        return None
    try:
        record = json.loads(lines[rows])
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    results = [v for k, v in record.items() if k in EVAL_NAMES]
    return results[0] if record.get("step") == step and len(results) == 1 and isinstance(results[0], dict) else None


def rewind_log(path: Path, rows: int | None, step: int) -> int:
    """Cut metrics.jsonl back to what it held when the resumed checkpoint was saved, so that the resumed run's rows
    follow without duplicates: its first `rows` lines (the count the checkpoint stores), or, for a checkpoint that
    has no count, the lines up to the first one past `step` (or the first unreadable one, which a kill can leave
    half-written). Rewritten atomically; returns the number of lines kept."""
    if not path.is_file():
        return 0
    lines = path.read_bytes().splitlines(keepends=True)
    if rows is not None:
        kept = lines[:rows]
    else:
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                break
            if not (line.endswith(b"\n") and isinstance(record, dict) and isinstance(record.get("step"), int)):
                break
            if record["step"] > step:
                break
            kept.append(line)
    if len(kept) < len(lines):
        atomic_write_bytes(path, kept)
    return len(kept)


def _flat(d: dict, prefix: str = "", sep: str = "/") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}{sep}", sep))
        else:
            out[f"{prefix}{k}"] = v
    return out


# -- the run -----------------------------------------------------------------------------------------------------
def train(
    cfg: TrainConfig, output_dir: str | Path, resume: bool = False, device: str = "auto", progress: bool = True
) -> dict:
    output_dir = Path(output_dir)
    cfg.validate()  # a config built in code gets the checks a loaded one had
    if cfg.data.tokenizer == "demo":  # saved into the run folder: refused before the folder is made
        check_savable_path(output_dir / "tokenizer", "the run's demo tokenizer")
    info = D.setup(device)
    try:
        with contextlib.ExitStack() as stack:
            refused = None
            if info.is_main:  # the one process that writes the run's files
                try:
                    stack.enter_context(run_lock(output_dir, resume))
                except TrainingError as exc:
                    refused = str(exc)
            # every process learns whether the run goes on: the others would wait for rank 0 at its first collective
            refused = D.broadcast_object(refused)
            if refused is not None:
                raise TrainingError(refused)
            return _train(cfg, output_dir, resume, info, progress)
    except BaseException as exc:
        if info.distributed:  # a collective failed: say which process stopped and why; else tell the others
            message = D.failure_message(info, exc)
            if message is not None:
                hint = "" if "--resume" in message else f" ({_continue_hint(output_dir / 'checkpoints')})"
                raise TrainingError(message + hint) from exc
            D.report_failure(info, exc)
        raise
    finally:
        D.teardown()


@contextlib.contextmanager
def run_lock(output_dir: Path, resume: bool):
    """One train process per --output: the folder's writer lock (`folder_lock`; the folder is created for a new run)
    for the whole run, so that a second `train` (a `--resume` started while the run still goes, a job restarted by a
    scheduler) is refused at once (TrainingError) instead of removing the running save's temp directory and writing
    checkpoints, metrics.jsonl and summary.json over the first's. No lock where the folder is not there (a refused
    --resume: `_train` says so)."""
    created = not resume and not output_dir.exists()
    if created:
        output_dir.mkdir(parents=True, exist_ok=True)
    if not output_dir.is_dir():
        yield
        return
    then = "--resume continues from its newest checkpoint"
    try:
        with exclusive_writer(output_dir, "training run", TrainingError, then=then):
            yield
    finally:
        if created:  # a run refused before it wrote anything leaves no folder behind
            with contextlib.suppress(OSError):
                output_dir.rmdir()  # only where it is empty


# What a run writes into its --output directory: any of them there (an empty folder aside) means a run lives there.
RUN_FILES = ("checkpoints", "metrics.jsonl", "summary.json", "tokenizer", "tensorboard")


def check_output_dir(output_dir: Path, resume: bool) -> bool:
    """A new run (no --resume) needs a new directory or one that holds no run: in another run's directory its
    checkpoints (later steps) would prune this run's as they are saved, and the two runs' metrics.jsonl and
    summary.json would mix. A run that stopped before its first optimizer step (`trained_no_step`: a setup error
    such as a bad data row, after its tokenizer was written) holds nothing to mix with: a new run takes its place
    and True is returned (its log is to be cleared). ValueError (a bad argument) before anything is written."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output {output_dir} is a file, not a directory")
    if resume:
        return False
    found = [
        name
        for name in RUN_FILES
        if (path := output_dir / name).is_symlink() or path.is_file() or (path.is_dir() and any(path.iterdir()))
    ]
    if found and trained_no_step(output_dir):
        return True
    if found:
        raise ValueError(
            f"--output {output_dir} already holds a training run ({', '.join(found)}): add --resume to continue it, "
            "or give a new or empty directory"
        )


def trained_no_step(output_dir: Path) -> bool:
    """The folder holds only what a run writes before its first optimizer step: no checkpoint (nor a killed save's
    temp directory), no summary.json, and a metrics.jsonl (if any) without a row past step 0 (the data row, the
    non-finite steps a diverging start skipped)."""
    ckpt = output_dir / "checkpoints"
    if (output_dir / "summary.json").exists() or ckpt.is_symlink() or ckpt.is_file():
        return False
    if ckpt.is_dir() and any(ckpt.iterdir()):
        return False
    log = output_dir / "metrics.jsonl"
    if log.is_symlink() or (log.exists() and not log.is_file()):
        return False
    if log.is_file():
        raw = log.read_bytes()
        lines = raw.split(b"\n")
        if lines[-1]:  # a last row without its newline: a kill cut it while it was written
            lines.pop()
        for line in filter(None, lines):
            try:
                record = json.loads(line)
            except ValueError:  # a whole line that is not a record: not a log of ours
                return False
            if not (isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] == 0):
                return False
    return True


def resumed_plan(state: dict, num_clips: int, s) -> tuple[int, int]:
    """(epoch, the optimizer steps planned for the epochs before it) of a checkpoint's data position, under schedule
    `s`; a position at its epoch's end, counted in the clips it was saved with, is the next epoch's start.
    Checkpoints of older trainers record no planned steps: they planned every epoch at their saved size."""
    saved_steps = steps_in_epoch(state.get("clips") or num_clips, s)
    epoch = state.get("epoch", 0)
    before = state.get("planned_steps_before_epoch", saved_steps * epoch)
    if state.get("next_micro", 0) >= saved_steps * s.grad_accum_steps:
        return epoch + 1, before + saved_steps
    return epoch, before


def steps_in_epoch(num_clips: int, s) -> int:
    """Optimizer steps in an epoch of `num_clips` clips under schedule `s`: full global micro-batches only (what
    GlobalBatchSampler yields, the same for any number of processes), full steps only, at most
    `max_samples_per_epoch` clips."""
    steps = num_clips // (s.batch_size // s.grad_accum_steps) // s.grad_accum_steps
    if s.max_samples_per_epoch is not None:
        steps = min(steps, s.max_samples_per_epoch // s.batch_size)
    return steps


def check_batch_split(cfg: TrainConfig, world_size: int) -> None:
    """Each micro-batch (batch_size / grad_accum_steps clips) is cut into equal slices, one per process: ValueError (a
    bad config for this launch) before anything is written where it cannot be."""
    s = cfg.schedule
    micro_batch = s.batch_size // s.grad_accum_steps
    if micro_batch % world_size:
        raise ValueError(
            f"schedule.batch_size {s.batch_size} / schedule.grad_accum_steps {s.grad_accum_steps} = {micro_batch} "
            f"clips per micro-batch cannot be split over {world_size} processes: make it a multiple of {world_size}"
        )


# Settings that fix what a checkpoint's step and data position mean (which clips make a step, in which order, for
# which model). A resume with another value would carry the run's position into a different run: the position would
# skip or repeat clips, or end the run at once, so --resume refuses it. Every other setting may change on resume and
# applies from the resumed step: the learning rate, weight decay, multipliers and schedule (epochs, max_steps: the
# schedule is planned for the new length), the objective's weights, paths, workers, checkpoint, eval and log settings.
RESUME_FIXED = (
    "seed",
    "task",
    "model.preset",
    "model.num_frames",
    "model.projection",
    "model.img_size",
    "model.patch_size",
    "model.cross_gate_init",
    "model.time_init",
    "model.temporal_embed_std",
    "data.neg_window",
    "data.tokenizer",  # the ids the text embeddings were trained on
    "data.text_max_length",
    "data.num_verbs",
    "data.num_nouns",
    "data.num_classes",
    "schedule.batch_size",
    "schedule.grad_accum_steps",
    "schedule.max_samples_per_epoch",
)


def resume_changes(checkpoint: Path, cfg: TrainConfig) -> list[str]:
    """The settings of `cfg` that differ from those `checkpoint` was trained with (its run.json), as
    "key old -> new" lines; ConfigError (before any work) when one of them is in RESUME_FIXED. Keys the stored
    config does not have (a config from an older trainer) are not compared."""
    stored = _flat(read_json(checkpoint / "run.json", CheckpointError, expect=dict), sep=".")
    current = _flat(cfg.to_dict(), sep=".")
    changed = [key for key, value in current.items() if key in stored and stored[key] != value]
    fixed = [key for key in changed if key in RESUME_FIXED]
    if fixed:
        diffs = ", ".join(f"{key} {stored[key]!r} -> {current[key]!r}" for key in fixed)
        raise ConfigError(
            f"--resume: {diffs}: {checkpoint} counts its steps and data position with the run's value; resume with "
            f"the values in {checkpoint / 'run.json'}, or start a new run from its weights "
            f"(model.init_from: {checkpoint})"
        )
    return [f"{key} {stored[key]!r} -> {current[key]!r}" for key in changed]


def apply_optim_settings(optimizer, scheduler, configured: list[tuple[float, float]]) -> None:
    """After a resume loaded the optimizer's and the schedule's state: put back this config's base learning rate and
    weight decay of each parameter group (`configured`, as build_optimizer set them; the loaded state holds the
    interrupted run's) and set each group's learning rate to its base x this config's schedule at the resumed step.
    With an unchanged config every value is the loaded one, bit for bit."""
    scheduler.base_lrs = [lr for lr, _ in configured]
    for group, (lr, weight_decay), factor in zip(optimizer.param_groups, configured, scheduler.lr_lambdas):
        group["initial_lr"], group["weight_decay"] = lr, weight_decay
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def killed_before_first_checkpoint(output_dir: Path) -> bool:
    """The folder holds a run that wrote its log or tokenizer but neither a checkpoint nor its summary: it was stopped
    before its first save, so `--resume` has nothing to continue and starts it again."""
    if (output_dir / "summary.json").exists() or list_checkpoints(output_dir / "checkpoints"):
        return False
    return any((output_dir / name).exists() for name in ("metrics.jsonl", "tokenizer", "tensorboard"))


# Settings each machine of a launch may set for itself: its paths (the files they name are compared instead) and its
# resources. Every other setting changes what the processes compute, and must be the same in all of them.
PER_MACHINE = {f"{section}.{key}" for section, rules in RULES.items() for key, rule in rules.items() if rule is TEXT}
# ... and those that change only how this process reads, holds or keeps things, not what it computes: its decoder,
# its evaluation batches (each process encodes its share, gathered once), the checkpoints rank 0 keeps and logs.
PER_MACHINE |= {"data.num_workers", "data.frame_cache_mb", "data.backend", "data.allow_download"}
PER_MACHINE |= {"eval.batch_size", "checkpoint.keep_last", "log.tensorboard"}


def check_launch_agrees(
    info: D.DistInfo, cfg: TrainConfig, model, tokenizer, clips: int, fingerprint, eval_set, found
) -> None:
    """Every process of a launch reads its own config, data, tokenizer and checkpoint: ConfigError (before any
    training) on every process where one differs from rank 0's. DDP keeps only the weights in step; processes with
    other settings or data would train a silently different model, or wait in different collectives (an evaluation
    set missing on one machine, other class counts: label tensors of other widths gathered)."""
    settings = {k: v for k, v in _flat(cfg.to_dict(), sep=".").items() if k not in PER_MACHINE}
    problems = D.agreement_problems(
        info,
        settings
        | {
            "the model config": model.config.to_dict(),
            "the tokenizer's vocabulary": tokenizer.get_vocab(),
            "the training data": [clips, fingerprint],
            "the evaluation data": None if eval_set is None else len(eval_set),
            "the class counts (meta.json)": list(class_counts(cfg)) if cfg.task == "pretrain" else None,
            "the checkpoint --resume continues": found and [found.name, (found / MANIFEST).read_bytes()],
        },
    )
    if problems:
        raise ConfigError(
            f"the {info.world_size} processes of this launch disagree: {'; '.join(problems)}: start every process "
            "with the same config (paths aside), data, tokenizer and run folder"
        )


def _train(cfg: TrainConfig, output_dir: Path, resume: bool, info: D.DistInfo, progress: bool) -> dict:
    ckpt_dir = output_dir / "checkpoints"
    check_batch_split(cfg, info.world_size)
    taken_over = check_output_dir(output_dir, resume)
    if info.is_main:
        for path in remove_stale_temp_dirs(ckpt_dir):  # no save is running yet: these are from killed ones
            print(f"removed {path}, the temp directory of a checkpoint save that did not finish", file=sys.stderr)
    found = latest_valid_checkpoint(ckpt_dir) if resume else None
    changes = resume_changes(found, cfg) if found is not None else []
    if taken_over and info.is_main:
        print(
            f"note: {output_dir} holds a run that stopped before its first step: starting a new run there (its log "
            "is cleared)",
            file=sys.stderr,
        )
    start_over = resume and found is None  # before any work: nothing to continue from
    if start_over:
        if not killed_before_first_checkpoint(output_dir):
            raise TrainingError(f"--resume: no valid checkpoint under {ckpt_dir}")
        if info.is_main:
            print(
                f"--resume: the run in {output_dir} stopped before its first checkpoint: starting it again from "
                "step 0 (its log is cleared)",
                file=sys.stderr,
            )
    if info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    D.barrier()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    tokenizer = build_tokenizer(cfg, output_dir, info)
    init_reports: list = []
    # The pretrained towers and the text warm-up are skipped only where a checkpoint's weights replace them: a run
    # started over by --resume (stopped before its first checkpoint) starts as a new run does.
    model = build_model(cfg, len(tokenizer), init_reports, pretrained=found is None, resume_from=found).to(info.device)
    if info.is_main:
        for report in init_reports:
            print(report.summary(), file=sys.stderr if report.missing_from_file else sys.stdout)
    t = model.config.text
    try:  # its ids within the embedding table, the model's pad id, texts framed by the model's <s> and </s>
        check_tokenizer_fits(tokenizer, t.vocab_size, t.pad_token_id, t.bos_token_id, t.eos_token_id)
    except TokenizerError as exc:
        raise TrainingError(f"the tokenizer does not fit the model: {exc}") from exc
    if cfg.data.text_max_length > model.config.text.max_text_length:
        raise ConfigError(
            f"data.text_max_length {cfg.data.text_max_length} is longer than the model's text "
            f"({model.config.text.max_text_length} tokens)"
        )
    model.gradient_checkpointing = cfg.schedule.gradient_checkpointing
    eval_frames = cfg.eval.num_frames or model.config.video.num_frames
    train_set, eval_set = build_datasets(cfg, model.config, eval_frames)
    # What the checkpoints' data positions index: every process reads its own, and all must be rank 0's.
    fingerprint = training_data_fingerprint(train_set)
    check_launch_agrees(info, cfg, model, tokenizer, len(train_set), fingerprint, eval_set, found)
    resumed = load_checkpoint(found, map_location=info.device) if found is not None else None
    skipped_rows = len(getattr(train_set, "skipped_rows", []))
    finetune = cfg.task != "pretrain"
    if info.is_main:
        unit = "clips" if finetune else "questions"
        print(
            f"data: {len(train_set)} training clips ({skipped_rows} bad rows skipped), "
            f"{len(eval_set) if eval_set is not None else 0} {EVAL_NAMES[cfg.task]} {unit}"
        )
        if eval_set is None and cfg.data.egomcq_json is not None:  # a path set but not there: say why nothing is
            print(  # evaluated, rather than train a whole run without its evaluation unnoticed
                f"note: data.egomcq_json {cfg.resolve(cfg.data.egomcq_json)} is not there: the run is not evaluated "
                "(set it to null to train without EgoMCQ)",
                file=sys.stderr,
            )
        note = (
            None
            if eval_set is None
            else skipped_note(EVAL_NAMES[cfg.task], eval_set, "test rows" if finetune else "questions")
        )
        if note:  # lax recipes evaluate on what is left of the evaluation set: say so at the start
            print(note, file=sys.stderr)
    if cfg.model.text_warmup_steps and not cfg.model.init_from and found is None:
        t0 = time.perf_counter()
        losses = simcse_warmup(
            model,
            tokenizer,
            train_set.narrations(),
            cfg.model.text_warmup_steps,
            cfg.optim.lr,
            cfg.data.text_max_length,
            cfg.seed,
        )
        if info.is_main:
            print(
                f"text warm-up (SimCSE, {cfg.model.text_warmup_steps} steps): loss {losses[0]:.2f} -> "
                f"{losses[-1]:.2f} in {time.perf_counter() - t0:.0f} s"
            )

    s = cfg.schedule
    micro_batch = s.batch_size // s.grad_accum_steps
    sampler = D.GlobalBatchSampler(len(train_set), micro_batch, info.rank, info.world_size, seed=cfg.seed)
    steps_per_epoch = steps_in_epoch(len(train_set), s)
    if steps_per_epoch == 0:
        raise TrainingError(f"{len(train_set)} clips give no full step of batch_size {s.batch_size}")
    # The run's length: the steps planned for the epochs before the resumed one, at the sizes they had, and this
    # data's steps for the rest (a resume may come with more epochs, or at an epoch's end with data of another size).
    plan_epoch, planned_before = (0, 0) if resumed is None else resumed_plan(resumed[1], len(train_set), s)
    total_steps = max(planned_before + steps_per_epoch * (s.epochs - plan_epoch), 1)
    if s.max_steps is not None:
        total_steps = min(total_steps, s.max_steps)
    if finetune:
        collator = FinetuneCollator(tokenizer, cfg.data.text_max_length)
    else:
        collator = PretrainCollator(tokenizer, cfg.data.text_max_length, cfg.objective.mlm_probability, cfg.seed)
    loader_rng = torch.Generator().manual_seed(cfg.seed)  # keeps DataLoader seeding off the global RNG
    loader = torch.utils.data.DataLoader(
        IndexedDataset(train_set),
        batch_sampler=sampler,
        collate_fn=collator,
        num_workers=cfg.data.num_workers,
        generator=loader_rng,
        pin_memory=info.device.type == "cuda",
        # Workers outlive the epoch (the epoch reaches them through shared memory):
        # no re-fork per epoch, and their open-video caches stay warm.
        persistent_workers=cfg.data.num_workers > 0,
    )

    if finetune:
        objective = FinetuneObjective(model, cfg.task, cfg.objective.margin, cfg.objective.temperature)
    else:
        objective = PretrainObjective(
            model,
            cfg.objective.temperature,
            cfg.objective.verb,
            cfg.objective.noun,
            (cfg.objective.egonce_weight, cfg.objective.mlm_weight, cfg.objective.vtm_weight),
            seed=cfg.seed,
            vtm_negative_temperature=cfg.objective.vtm_negative_temperature,
            vtm_negative_anneal_steps=total_steps if cfg.objective.vtm_negative_anneal else 0,
            text_simcse_weight=cfg.objective.text_simcse_weight,
        )
    wrapped = objective
    if info.distributed:
        # Fine-tuning trains the dual encoder alone: the fusion layers and heads get no gradient, which DDP must
        # be told of.
        wrapped = torch.nn.parallel.DistributedDataParallel(
            objective,
            device_ids=[info.device.index] if info.device.type == "cuda" else None,
            find_unused_parameters=finetune,
        )
    o = cfg.optim
    freeze_steps = o.freeze_steps(total_steps)
    optimizer = build_optimizer(
        model, o.lr, o.weight_decay, o.lr_mult_head, o.lr_mult_cross_modal, o.lr_mult_text, split_text=freeze_steps > 0
    )
    scheduler = build_scheduler(optimizer, int(o.warmup_fraction * total_steps), total_steps, freeze_steps)
    configured = [(group["initial_lr"], group["weight_decay"]) for group in optimizer.param_groups]
    amp_dtype = resolve_precision(s.precision, info.device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    step, epoch, next_micro, skipped, consecutive_skips = 0, 0, 0, 0, 0
    log_rows = 0
    resumed_evaluation_due, logged_eval = False, None  # a resume at an epoch's end: its evaluation, unless logged
    load_failures, clips_read = 0, 0  # this process's clips (scene negatives included) and those unreadable
    if found is not None:
        weights, state, _ = resumed
        try:
            model.load_state_dict(weights)
        except RuntimeError as exc:  # torch lists every mismatched tensor: the first line says what happened
            raise TrainingError(
                f"--resume: {found} does not fit the model this config builds ({str(exc).splitlines()[0]})"
            ) from exc
        try:
            try:
                optimizer.load_state_dict(state["optimizer"])
            except ValueError as exc:  # torch: another number or size of parameter groups
                raise ConfigError(
                    f"--resume: the optimizer state of {found} does not fit this config's parameter groups "
                    f"({exc}): optim.lr_mult_text and optim.text_freeze_steps / text_freeze_fraction decide whether "
                    "the text tower has groups of its own; resume with the run's values of them"
                ) from None
            scheduler.load_state_dict(state["scheduler"])
            apply_optim_settings(optimizer, scheduler, configured)
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            step, epoch, next_micro = state["step"], state["epoch"], state["next_micro"]
            skipped, consecutive_skips = state["skipped"], state["consecutive_skips"]
            set_rng_state(state["rng"])
        except KeyError as exc:  # a state.json that verifies but was not written by this trainer (or was edited)
            raise CheckpointError(f"--resume: {found}/state.json lacks the key {exc.args[0]!r}") from exc
        saved_clips = state.get("clips")  # absent in checkpoints of older trainers
        # A position at or past its epoch's last step (a run that ended with an epoch, counted in the epoch's size
        # when it was saved: `resumed_plan` then plans from the next epoch) reads nothing more of that epoch,
        # whatever the data holds now: it resumes at the end of the epoch as this data counts it, so the epoch's end
        # (evaluation, checkpoint) comes next.
        if plan_epoch > epoch:
            next_micro = steps_per_epoch * s.grad_accum_steps
        elif saved_clips is not None and saved_clips != len(train_set) and next_micro > 0:
            raise DataError(
                f"--resume: the training data has {len(train_set)} clips, {found} was saved with {saved_clips}: its "
                f"data position (micro-batch {next_micro} of epoch {epoch}) indexes that epoch's order of "
                f"{saved_clips} clips, which would now skip or repeat clips; restore the data the run was trained on "
                f"(rows added, removed or now skipped as bad change the count), or start a new run from its weights "
                f"(model.init_from: {found})"
            )
        saved_fingerprint = state.get("data_fingerprint")  # absent in checkpoints of older trainers
        data_changes = None if saved_fingerprint is None else fingerprint_changes(saved_fingerprint, fingerprint)
        # a position at micro-batch 0, or at the epoch's end, reads no more of that epoch's order
        if data_changes and 0 < next_micro < steps_per_epoch * s.grad_accum_steps:
            raise DataError(
                f"--resume: the training data changed since {found} was saved ({'; '.join(data_changes)}): its data "
                f"position (micro-batch {next_micro} of epoch {epoch}) would now read other clips; restore the data "
                f"the run was trained on, or start a new run from its weights (model.init_from: {found}) (a "
                "checkpoint saved at an epoch's end resumes on changed data)"
            )
        load_failures, clips_read = resumed_load_counts(state, info)
        # The checkpoint of an epoch's end is saved before that epoch's evaluation (checkpoints of older trainers
        # after it: they record no due evaluation). The evaluation runs again at the resume unless the run logged it
        # right after the checkpoint; then that row is kept.
        resumed_evaluation_due = bool(state.get("evaluation_due"))
        if resumed_evaluation_due:
            log_path = output_dir / "metrics.jsonl"
            logged_eval = logged_evaluation(log_path, state.get("log_rows"), step) if info.is_main else None
            logged_eval = D.broadcast_object(logged_eval)
        if info.is_main:
            kept_rows = state.get("log_rows")
            if logged_eval is not None:
                kept_rows += 1
            log_rows = rewind_log(output_dir / "metrics.jsonl", kept_rows, step)
            print(f"resumed from {found} (step {step}, epoch {epoch})")
            if data_changes:
                print(
                    f"note: the training data changed since {found.name} ({'; '.join(data_changes)}): the run "
                    f"continues on it from the start of epoch {epoch if next_micro == 0 else epoch + 1}",
                    file=sys.stderr,
                )
            elif data_changes is None:
                print(
                    f"note: {found.name} records no fingerprint of its training data (an older trainer saved it): "
                    "whether the data is the one it was trained on could not be checked",
                    file=sys.stderr,
                )
            if changes:
                print(
                    f"note: settings changed since {found.name}, applied from step {step} on (the learning-rate "
                    f"schedule planned for {total_steps} steps): {'; '.join(changes)}",
                    file=sys.stderr,
                )
        resumed = weights = state = None  # the model has copied the weights: their loaded copy is freed

    if (start_over or taken_over) and info.is_main:
        log_rows = rewind_log(output_dir / "metrics.jsonl", 0, 0)
    # TensorBoard hides the interrupted run's points from here on
    purge_step = (step + 1 if found is not None else 0) if resume or taken_over else None
    log = MetricsLog(
        output_dir / "metrics.jsonl", info.is_main, cfg.log.tensorboard, rows=log_rows, purge_step=purge_step
    )
    bar = None
    if progress and info.is_main:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)

    saved_step = step  # the step the newest checkpoint holds (a new run's step 0 needs none: the config rebuilds it)
    good = (epoch, next_micro, skipped - consecutive_skips, 0)  # the data position and skip counts of the last step
    good_counts = (load_failures, clips_read)  # and its load counts

    def checkpoint(at_last_good_step: bool = False, evaluation_due: bool = False) -> None:
        """Save the run's state; `at_last_good_step`: in a run of skipped steps, with the data position and skip
        counts of the last step taken (the weights, optimizer and schedule are still that step's), so that a resume
        trains the batches that diverged; `evaluation_due`: saved at an epoch's end before its evaluation."""
        nonlocal saved_step
        position = good if at_last_good_step else (epoch, next_micro, skipped, consecutive_skips)
        # every process's load counts, which a resume continues from (a collective: every process saves)
        counts = D.gather(
            torch.tensor([good_counts if at_last_good_step else (load_failures, clips_read)], device=info.device)
        ).tolist()
        state = {
            "step": step,
            "epoch": position[0],
            "next_micro": position[1],
            "skipped": position[2],
            "consecutive_skips": position[3],
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler else None,
            "rng": rng_state(),
            "log_rows": log.rows,  # metrics.jsonl's lines so far: a resume cuts the log back to them
            "clips": len(train_set),  # the data the position indexes: a resume mid-epoch needs the same count
            # the steps planned for the epochs before the position's (a resume on data of another size plans on)
            "planned_steps_before_epoch": planned_before + steps_per_epoch * (position[0] - plan_epoch),
            "evaluation_due": evaluation_due and not at_last_good_step,
            "data_fingerprint": fingerprint,  # ... and the same rows and video files
            "load_failures": [failed for failed, _ in counts],  # per process, in rank order
            "clips_read": [read for _, read in counts],
        }
        if info.is_main:
            try:
                save_checkpoint(ckpt_dir, step, model, state, cfg.to_dict(), keep_last=cfg.checkpoint.keep_last)
            except OSError as exc:  # a full disk, a quota, a folder gone: the run cannot go on, the saved ones stand
                reason = exc.strerror or str(exc)
                raise TrainingError(
                    f"cannot save the checkpoint of step {step} in {ckpt_dir} ({reason}): {_continue_hint(ckpt_dir)} "
                    "once it can be written"
                ) from exc
        D.barrier()
        saved_step = step

    def epoch_end_evaluation(next_epoch: int) -> bool:
        """Whether the run evaluates at the start of `next_epoch` (the end of the one before), between epochs."""
        return 0 < next_epoch < s.epochs and next_epoch % cfg.eval.every_epochs == 0

    def checkpoint_unless_diverging(evaluation_due: bool = False) -> None:
        """The saves at an epoch's end and the run's end. In a run of skipped steps, the last good step's state
        (its data position: a resume with a lower learning rate trains the batches that diverged), or none where that
        is saved already (and a run that never took a step leaves no checkpoint)."""
        if not consecutive_skips:
            checkpoint(evaluation_due=evaluation_due)
        elif saved_step != step:
            checkpoint(at_last_good_step=True)

    def evaluate() -> dict | None:
        """The run's evaluation, leaving every random generator as it found it (its DataLoader draws its workers'
        seeds from the global one): the training's draws do not depend on whether or how often the run evaluates,
        a setting a resume may change."""
        if eval_set is None:
            return None
        draws = rng_state()
        try:
            return _evaluate()
        finally:
            set_rng_state(draws)

    def _evaluate() -> dict:
        eval_model = model_at_frames(model, eval_frames)
        loads: dict = {}  # the evaluation's clips and those scored as black clips (lax data), over every rank
        if not finetune:
            result = evaluate_egomcq(
                eval_model,
                eval_set,
                tokenizer,
                info.device,
                cfg.eval.batch_size,
                cfg.data.num_workers,
                cfg.eval.max_questions,
                progress=False,
                load_counts=loads,
            )
            text = format_table(result)
        else:  # every rank encodes its share of the test split; the embeddings are gathered for the metrics
            run_eval = evaluate_epic_mir if cfg.task == "epic_mir" else evaluate_charades
            result = run_eval(
                eval_model,
                eval_set,
                tokenizer,
                info.device,
                batch_size=cfg.eval.batch_size,
                num_workers=cfg.data.num_workers,
                load_counts=loads,
            )
            text = format_retrieval(cfg.task, result)
        record = {"step": step, "epoch": epoch, cfg.task: result}
        if loads.get("load_failures"):
            record["eval_load_failures"] = loads["load_failures"]
            record["eval_clips"] = loads["clips"]
            if info.is_main:  # the metrics count them as black clips: said where they are read
                print(
                    f"note: step {step}: {loads['load_failures']} of the {loads['clips']} {EVAL_NAMES[cfg.task]} "
                    "clips could not be decoded and were scored as black clips (data.strict is false)",
                    file=sys.stderr,
                )
        log.write(record)
        if bar is not None:
            bar.write(f"[epoch {epoch} step {step}] {EVAL_NAMES[cfg.task]}\n{text}")
        return result

    if found is None:  # a resumed run's log holds this record already
        log.write(
            {
                "step": step,
                "epoch": epoch,
                "data": {
                    "clips": len(train_set),
                    "skipped_rows": skipped_rows,
                    "skip_counts": dict(getattr(train_set, "skip_counts", {})),
                },
            }
        )
    started, last_eval = time.time(), None
    window_clips, window_start = 0, time.time()
    done = step >= total_steps
    if resumed_evaluation_due and not done:
        if logged_eval is not None:
            last_eval = logged_eval
        else:
            with _data_error_hint(ckpt_dir):
                last_eval = evaluate()
    while not done and epoch < s.epochs:
        sampler.set_epoch(epoch, start_batch=next_micro)
        collator.set_epoch(epoch)
        if hasattr(train_set, "set_epoch"):
            train_set.set_epoch(epoch)
        micro = next_micro
        step_parts: dict[str, torch.Tensor] = {}  # the step's loss terms summed over its micro-batches
        for batch in _reading(loader, ckpt_dir):
            if micro >= steps_per_epoch * s.grad_accum_steps:
                break  # leftover micro-batches that do not fill an optimizer step
            batch = batch.to(info.device)
            load_failures += int(batch.load_failures)
            clips_read += batch.video.shape[0]
            last_micro = (micro + 1) % s.grad_accum_steps == 0
            sync = contextlib.nullcontext() if last_micro or not info.distributed else wrapped.no_sync()
            autocast = (
                torch.autocast(info.device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
            )
            with sync, autocast:
                loss, parts = wrapped(batch, step)
            (scaler.scale(loss) if scaler else loss).div(s.grad_accum_steps).backward()
            for key, value in parts.items():
                step_parts[key] = step_parts[key] + value if key in step_parts else value
            micro += 1
            window_clips += batch.video.shape[0] * info.world_size
            if not last_micro:
                continue

            if scaler is not None:
                scaler.unscale_(optimizer)
            max_norm = o.grad_clip if o.grad_clip is not None else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            # The logged terms are the step's (the mean over its micro-batches, as its gradient), not the last
            # micro-batch's.
            parts, step_parts = {k: v / s.grad_accum_steps for k, v in step_parts.items()}, {}
            # every process skips the step, or none: one that skipped alone would wait in other collectives
            if not D.all_true(torch.isfinite(loss) and torch.isfinite(grad_norm), info.device):
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.update()
                skipped += 1
                consecutive_skips += 1
                log.write({"step": step, "epoch": epoch, "skipped_nonfinite": skipped})
                if consecutive_skips > s.max_skipped_steps:
                    raise TrainingError(
                        f"{consecutive_skips} consecutive steps had a non-finite loss or gradient; stopping at step "
                        f"{step} (lower the learning rate or use fp32/bf16; {_continue_hint(ckpt_dir)})"
                    )
                continue
            consecutive_skips = 0
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            next_micro = micro
            good, good_counts = (epoch, next_micro, skipped, 0), (load_failures, clips_read)

            if step % cfg.log.every_steps == 0 or step == total_steps:
                elapsed = time.time() - window_start
                record = {
                    "step": step,
                    "epoch": epoch,
                    "lr": scheduler.get_last_lr()[0],
                    "load_failures": load_failures,
                    "grad_norm": float(grad_norm),
                    "clips_per_s": window_clips / max(elapsed, 1e-9),
                }
                record |= {k: float(v) for k, v in parts.items()}
                log.write(record)
                window_clips, window_start = 0, time.time()
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", clips_s=f"{record['clips_per_s']:.1f}"
                    )
            if bar is not None:
                bar.update(1)
            out_of_time = s.max_minutes is not None and (time.time() - started) / 60 >= s.max_minutes
            if s.max_minutes is not None:  # rank 0's clock decides: ranks stopping at different steps would hang
                out_of_time = D.broadcast_object(out_of_time)  # in different collectives
            done = step >= total_steps or out_of_time
            if step % cfg.checkpoint.every_steps == 0 and not done:
                checkpoint()
            if done:
                break
        if not done:
            epoch, next_micro = epoch + 1, 0
            if epoch_end_evaluation(epoch):
                # first: an evaluation that fails or is killed loses no training
                checkpoint_unless_diverging(evaluation_due=True)
                with _data_error_hint(ckpt_dir):
                    last_eval = evaluate()
    if step == 0 and skipped:
        raise TrainingError(
            f"no step was taken: all {skipped} steps had a non-finite loss or gradient (lower the learning rate or "
            "use fp32/bf16, and rerun)"
        )
    checkpoint_unless_diverging()
    del loader  # stops the persistent workers, with their decoded videos, before the final evaluation
    release_frame_cache()  # no-op unless data.frame_cache_mb and num_workers=0 put the videos in this process
    with _data_error_hint(ckpt_dir):
        final_eval = evaluate()
    if bar is not None:
        bar.close()
    log.close()
    summary = {
        "task": cfg.task,
        "steps": step,
        "epochs_started": epoch + 1 if done else epoch,
        "minutes": (time.time() - started) / 60,
        "skipped_steps": skipped,
        "skipped_rows": skipped_rows,
        "load_failures": load_failures,
        "output_dir": str(output_dir),
        "world_size": info.world_size,
    }
    summary["egomcq" if cfg.task == "pretrain" else cfg.task] = final_eval or last_eval
    if info.is_main:
        atomic_write_bytes(output_dir / "summary.json", json_text(summary, indent=2).encode())
        if skipped and step < total_steps:
            print(
                f"note: {skipped} steps were skipped for a non-finite loss or gradient ({consecutive_skips} of them "
                f"at the end): the run trained {step} of its {total_steps} planned steps",
                file=sys.stderr,
            )
        if load_failures:
            print(
                f"note: {load_failures} of the {clips_read} clips this process read could not be decoded and were "
                "trained as black clips (data.strict is false; metrics.jsonl counts them as load_failures)",
                file=sys.stderr,
            )
    return summary


@contextlib.contextmanager
def _data_error_hint(ckpt_dir: Path):
    """A clip that cannot be read in the loop (strict mode: a video that does not decode, found when it is read) stops
    the run with its DataError, which then also says what the run keeps and how to go on."""
    try:
        yield
    except DataError as exc:
        raise DataError(f"{exc} ({_continue_hint(ckpt_dir)} once the data is fixed)") from exc


def _reading(loader, ckpt_dir: Path):
    with _data_error_hint(ckpt_dir):
        yield from loader


def _continue_hint(ckpt_dir: Path) -> str:
    """What a run stopped in its loop leaves to go on from: its newest checkpoint for --resume, or nothing."""
    saved = list_checkpoints(ckpt_dir)
    if not saved:
        return "no checkpoint was saved: --resume starts the run again"
    return f"the checkpoints up to {saved[-1].name} are kept: add --resume to continue from the newest"


# -- command line ---------------------------------------------------------------------------------------------------
def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`section.key=value` overrides; the value is parsed as JSON when it can be (numbers, true/false, null), except
    that a text field (a path, a tokenizer name) keeps a number-like value as written (`data.video_root=2024`). A
    JSON object given for a section or a nested key updates the keys it names and keeps the others (`--set
    'schedule={"epochs": 2}'` changes the epochs alone)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        target = data
        *path, last = key.split(".")
        for part in path:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--set {key}: {part} is not a section")
        if isinstance(value, (int, float)) and _is_text_field(path, last):  # bools are ints too
            value = raw
        if isinstance(value, dict) and isinstance(target.get(last), dict):
            _update_nested(target[last], value)
        else:
            target[last] = value
    return data


def _is_text_field(path: list[str], name: str) -> bool:
    """The config field at path + [name] is declared a string (unknown keys are not: strict_fields names them)."""
    if len(path) > 1:
        return False
    klass = TrainConfig.SECTIONS.get(path[0]) if path else TrainConfig
    if klass is None:
        return False
    field = next((f for f in dataclasses.fields(klass) if f.name == name), None)
    return field is not None and "str" in str(field.type)


def _update_nested(target: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _update_nested(target[key], value)
        else:
            target[key] = value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        required=True,
        metavar="JSON",
        help="run config: a path, or the name of a shipped one (tiny_synthetic.json, "
        "pretrain_egoclip.json, finetune_epic_mir.json, finetune_charades.json, "
        "finetune_epic_mir_tiny.json)",
    )
    parser.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="run directory: checkpoints/, metrics.jsonl, summary.json, the demo tokenizer",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest valid checkpoint in DIR/checkpoints (corrupt ones are skipped)",
    )
    parser.add_argument("--data", metavar="DIR", help="dataset root (overrides data.root)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value, e.g. --set schedule.epochs=2 (repeatable)",
    )
    parser.add_argument("--device", default="auto", help=D.DEVICE_HELP)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")


def run(args) -> int:
    path = Path(args.config)
    cfg = TrainConfig.load(path)  # validates the file itself
    data = cfg.to_dict()
    if args.data:
        data["data"]["root"] = args.data
    cfg = TrainConfig.from_dict(apply_overrides(data, args.set))
    summary = train(cfg, args.output, resume=args.resume, device=args.device, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {summary['steps']} steps in {summary['minutes']:.1f} min -> {summary['output_dir']}")
        if summary.get("egomcq"):
            print(format_table(summary["egomcq"]))
        for task in ("epic_mir", "charades"):
            if summary.get(task):
                print(format_retrieval(task, summary[task]))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="egovlp-deploy train", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
