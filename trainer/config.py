"""The training run config: one validated schema, JSON on disk, stored inside every checkpoint.

Unknown keys are errors; omitted keys take the defaults below (which are the official pre-training recipe where the
official code has one). `task` picks what a run trains: "pretrain" (EgoClip, EgoNCE + MLM + VTM, EgoMCQ evaluation),
"epic_mir" (EK-100 multi-instance retrieval fine-tuning, nDCG/mAP evaluation) or "charades" (Charades-Ego
fine-tuning, mAP evaluation). Shipped configs: `egovlp_deploy/configs/pretrain_egoclip.json` (the official
pre-training recipe), `tiny_synthetic.json` (the CPU demo recipe), `finetune_epic_mir.json` and
`finetune_charades.json` (the official fine-tuning recipes) and `finetune_epic_mir_tiny.json` (a CPU fine-tuning
recipe on the synthetic EK-100 files, from a tiny pre-trained checkpoint).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from egovlp_deploy.config import ConfigError, strict_fields
from egovlp_deploy.jsonfile import read_json

# The package's configs folder, found through the package itself: in an editable install this module lives in the
# checkout's top-level trainer/ folder, not beside egovlp_deploy/configs.
SHIPPED = Path(importlib.import_module("egovlp_deploy").__file__).resolve().parent / "configs"
TASKS = ("pretrain", "epic_mir", "charades")  # what a run trains (TrainConfig.task)


@dataclass
class ModelSection:
    preset: str = "base"  # "base" (paper sizes) or "tiny"
    num_frames: int = 4
    projection: str = "big"
    config_file: str | None = None  # a model config.json instead of the preset
    # An official .pth or a save_pretrained directory (a training checkpoint step_N) to start from; fine-tuning
    # needs one. Its temporal embedding is resized to num_frames by the official rule (frame inflation).
    init_from: str | None = None
    # The official pre-training's starting point for a new model (local files, relative to the working directory):
    # the video tower's spatial layers from an image ViT-B/16 (timm .pth/.safetensors or Google .npz; temporal
    # attention, fusion and projections keep their own init) and the text tower from a Hugging Face roberta-base
    # folder (the fused layers' cross-attention keeps its init, the gates 0). Not with init_from.
    init_video: str | None = None
    init_text: str | None = None
    text_dropout: float | None = None  # override RoBERTa's hidden/attention dropout (0.1)
    # Frame and patch size instead of the preset's (None: keep them). Ignored with init_from and config_file.
    # E.g. 64/16 on the 64 px synthetic videos: the tiny preset's 16 tokens per frame, each patch seeing 4x the
    # pixels of 32/8, so the small objects (1-2 patches at 32/8) reach the video tower in more detail at the same
    # sequence length (TRAINING_LOG.md compares the sizes). The tiny recipe uses 48/12.
    img_size: int | None = None
    patch_size: int | None = None
    # Start value of the cross-attention gates (alpha_i2t, alpha_t2i) for a model trained from scratch. The official
    # 0 suits its pretrained towers; from random towers a zero gate keeps each fused layer blind to the other
    # modality, and its cross-attention weights without gradient, until the gate itself grows. Ignored with
    # init_from (the checkpoint's gates are kept).
    cross_gate_init: float = 0.0
    # Temporal-attention init for a model trained from scratch (model config video.time_init): "zeros" (official,
    # meant for a pretrained image ViT) or "rand". Ignored with init_from and config_file.
    time_init: str = "zeros"
    # Std of a trunc-normal init of the temporal embedding for a model trained from scratch (0: keep time_init's).
    # The official zeros suit a pretrained tower; from random weights the frame-order features wait behind a long
    # plateau, which a std at about the patch tokens' scale (0.5) shortens most (TRAINING_LOG.md). Ignored with
    # init_from and config_file.
    temporal_embed_std: float = 0.0
    # Steps of unsupervised SimCSE on the training narrations for a from-scratch text tower before pre-training
    # (trainer/text_warmup.py says why; 0: off, the official recipe's pretrained RoBERTa needs none). Ignored with
    # init_from.
    text_warmup_steps: int = 0


@dataclass
class DataSection:
    root: str | None = None  # a dataset directory (e.g. from `egovlp-deploy synth`); other paths are relative to it
    egoclip_csv: str = "egoclip.csv"
    video_root: str = "videos"
    egomcq_json: str | None = "egomcq.json"
    meta_json: str | None = "meta.json"  # synthetic data: verb/noun class counts
    num_verbs: int = 118  # Ego4D taxonomy sizes; meta.json overrides them
    num_nouns: int = 582
    neg_window: int | None = 60  # scene-aware negatives from the same 60 s bucket (None: off)
    strict: bool = True
    backend: str = "auto"
    tokenizer: str = "demo"  # a local tokenizer dir, "demo" (trained on the synthetic vocabulary) or a hub id
    allow_download: bool = False
    text_max_length: int = 15
    num_workers: int = 0
    # Decoded training videos kept in each DataLoader worker, in MiB (0: off). For small datasets that are read
    # again every epoch (the synthetic one: 1.8 GB at 64 px); a video larger than this is read from the file.
    # Pre-training only.
    frame_cache_mb: int = 0
    # Fine-tuning: the task's annotation directory (relative to root), which fine-tuning needs. epic_mir: the EK-100
    # retrieval annotations (EPIC_100_retrieval_{train,test}.csv, their _sentence.csv and
    # relevancy/caption_relevancy_EPIC_100_retrieval_{train,test}.npy, the .pkl converted once as
    # egovlp_deploy/data/epic.py describes); charades: metadata_train.csv, CharadesEgo_v1_test_only1st.csv and
    # Charades_v1_classes.txt. The videos are under video_root.
    annotations: str | None = None
    num_classes: int = 157  # charades: the classes of Charades_v1_classes.txt


@dataclass
class ObjectiveSection:
    egonce_weight: float = 1.0
    mlm_weight: float = 1.0
    vtm_weight: float = 2.0
    temperature: float = 0.05
    # Temperature of the softmax the VTM hard negatives are drawn from (None: the EgoNCE temperature, official).
    # With from-scratch towers, 0.05 draws nearly every negative from the few clips the dual encoder already confuses
    # (the time-reversed verb, the scene's other object): pairs the fusion layers cannot yet separate either, so VTM
    # sits at ln 2 and gives them no gradient. A higher value mixes in easier negatives (trainer/objectives.py).
    vtm_negative_temperature: float | None = None
    # Anneal that temperature geometrically to the EgoNCE one over the run (easy negatives first, hard at the end).
    vtm_negative_anneal: bool = False
    # Weight of an unsupervised SimCSE term on the batch's narrations (0: official, no such term). For a
    # from-scratch text tower: EgoNCE alone lets it merge narrations the video tower cannot yet tell apart
    # ("picks up X" / "puts down X"), and the video tower then never gets a frame-order target. Its softmax
    # temperature is `temperature` (EgoNCE's; 0.05 is also SimCSE's own).
    text_simcse_weight: float = 0.0
    verb: bool = True  # action-aware positives (both off = InfoNCE)
    noun: bool = True
    mlm_probability: float = 0.15
    # epic_mir fine-tuning: the margin of the adaptive max-margin ranking loss, scaled per pair by its relevancy
    # (official 0.2). charades fine-tuning uses `temperature` for its symmetric softmax loss (official 0.05).
    margin: float = 0.2


@dataclass
class OptimSection:
    lr: float = 3e-5
    weight_decay: float = 0.01
    lr_mult_head: float = 4.0
    lr_mult_cross_modal: float = 4.0
    # Scales the text tower's learning rate (RoBERTa outside cross-attention, and txt_proj on top of lr_mult_head).
    # 1 is official. Below 1 keeps a from-scratch, warmed-up text tower from re-merging narrations the video tower
    # cannot yet tell apart (trainer/text_warmup.py).
    lr_mult_text: float = 1.0
    # Holds the text tower still (learning rate 0) for the first N optimizer steps, then lr_mult_text applies. 0 is
    # official. With a from-scratch text tower, the narrations a warm-up spread apart stay apart until the video tower
    # can tell them apart too; a lower lr_mult_text only slows their re-merging (trainer/text_warmup.py).
    text_freeze_steps: int = 0
    # The same hold as a fraction of the run's optimizer steps (0 <= f < 1; not with text_freeze_steps), so a recipe
    # keeps its shape when schedule.max_steps cuts a run short (as the demo does).
    text_freeze_fraction: float = 0.0
    warmup_fraction: float = 0.1
    grad_clip: float | None = None

    def freeze_steps(self, total_steps: int) -> int:
        """Optimizer steps the text tower is held still for, in a run of total_steps."""
        return self.text_freeze_steps or int(self.text_freeze_fraction * total_steps)


@dataclass
class ScheduleSection:
    epochs: int = 20
    batch_size: int = 32  # clips per global step (each brings its scene negative, so 2x pairs)
    grad_accum_steps: int = 1
    max_samples_per_epoch: int | None = None  # official: 500000 clips per "epoch" of EgoClip's 3.8 M
    max_steps: int | None = None  # stop early (tests, smoke runs)
    max_minutes: float | None = None  # wall-clock budget: the schedule is still planned for all epochs
    precision: str = "auto"  # auto: bf16 on GPUs that have it, else fp16 with a scaler; fp32 on CPU
    gradient_checkpointing: bool = False
    max_skipped_steps: int = 20  # NaN/inf guard: stop after this many skipped steps


@dataclass
class CheckpointSection:
    every_steps: int = 500
    keep_last: int = 3


@dataclass
class EvalSection:
    every_epochs: int = 1
    num_frames: int | None = None  # evaluate at a different frame count (paper: 16); None = training frames
    batch_size: int = 4  # EgoMCQ questions, or EK-100 / Charades-Ego clips, per step
    max_questions: int | None = None


@dataclass
class LogSection:
    every_steps: int = 10
    tensorboard: bool = False


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    log: LogSection = field(default_factory=LogSection)
    seed: int = 0
    task: str = "pretrain"  # one of TASKS

    SECTIONS = {
        "model": ModelSection,
        "data": DataSection,
        "objective": ObjectiveSection,
        "optim": OptimSection,
        "schedule": ScheduleSection,
        "checkpoint": CheckpointSection,
        "eval": EvalSection,
        "log": LogSection,
    }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        top = strict_fields(cls, data, "train config", nested=set(cls.SECTIONS), allow_missing=True)
        sections = {}
        for name, klass in cls.SECTIONS.items():
            section = data.get(name, {})
            check_float_sizes(klass, section, name)
            sections[name] = klass(**strict_fields(klass, section, name, allow_missing=True))
        config = cls(**sections, **top)
        config.validate()
        return config

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        if not path.is_file() and (SHIPPED / path.name).is_file() and path.parent == Path("."):
            path = SHIPPED / path.name  # a shipped config by name
        shipped = sorted(p.name for p in SHIPPED.glob("*.json"))
        data = read_json(path, ConfigError, expect=dict, missing=f"{path}: no such config (shipped: {shipped})")
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Every field against its declared type and range (RULES), then the rules that tie fields together."""
        for name, rule in RULES[""].items():
            rule.check(name, getattr(self, name), _annotation(type(self), name))
        for section_name, klass in self.SECTIONS.items():
            section = getattr(self, section_name)
            if not isinstance(section, klass):
                raise ConfigError(f"{section_name} must be a {klass.__name__}, got {type(section).__name__}")
            for f in dataclasses.fields(klass):
                RULES[section_name][f.name].check(f"{section_name}.{f.name}", getattr(section, f.name), str(f.type))
        s, m, o = self.schedule, self.model, self.optim
        finetune = self.task != "pretrain"
        # The losses rank each pair against the other pairs of its micro-batch (gathered over the processes): a
        # micro-batch of one pair has none, so the fine-tuning losses and EgoNCE are 0 and VTM has no negative to
        # draw. Pre-training's scene negatives make every clip a pair of two.
        micro_batch = s.batch_size // s.grad_accum_steps
        pairs = micro_batch * (1 if finetune or self.data.neg_window is None else 2)
        checks = [
            (
                not finetune or m.init_from is not None,
                f"task {self.task} fine-tunes a model: set model.init_from "
                "(an official .pth or one of our checkpoints)",
            ),
            (
                not finetune or self.data.annotations is not None,
                f"task {self.task} reads its files from data.annotations (the annotation directory): set it",
            ),
            (not finetune or m.text_warmup_steps == 0, "model.text_warmup_steps is for pre-training only"),
            (
                not (o.text_freeze_steps and o.text_freeze_fraction),
                "set optim.text_freeze_steps or optim.text_freeze_fraction, not both",
            ),
            (
                not self.objective.vtm_negative_anneal or self.objective.vtm_negative_temperature is not None,
                "objective.vtm_negative_anneal needs objective.vtm_negative_temperature (the start value)",
            ),
            (
                not (m.init_from and (m.init_video or m.init_text)),
                "model.init_from loads a whole model; model.init_video / model.init_text start a new one from "
                "pretrained towers: set one or the other",
            ),
            (
                s.batch_size % s.grad_accum_steps == 0,
                f"schedule.batch_size {s.batch_size} must be divisible by schedule.grad_accum_steps "
                f"{s.grad_accum_steps}",
            ),
            (
                pairs >= 2,
                f"schedule.batch_size {s.batch_size} / schedule.grad_accum_steps {s.grad_accum_steps} leaves "
                f"{micro_batch} clip per micro-batch{'' if finetune else ' and data.neg_window is null'}: "
                "the loss ranks each clip against the others of its micro-batch and needs at least 2",
            ),
            (
                s.max_samples_per_epoch is None or s.max_samples_per_epoch >= s.batch_size,
                f"schedule.max_samples_per_epoch {s.max_samples_per_epoch} is less than one step of "
                f"schedule.batch_size {s.batch_size}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if not m.init_from and not m.config_file:
            self._check_preset_sizes()

    def _check_preset_sizes(self) -> None:
        """Frame and patch size, and the text length, against the preset model they build (init_from and
        config_file bring their own sizes, checked when the model is built)."""
        from egovlp_deploy.config import EgoVLPv2Config

        m = self.model
        preset = EgoVLPv2Config.tiny() if m.preset == "tiny" else EgoVLPv2Config.base()
        img_size = m.img_size or preset.video.img_size
        patch_size = m.patch_size or preset.video.patch_size
        if img_size % patch_size:
            raise ConfigError(f"model.img_size {img_size} is not a multiple of model.patch_size {patch_size}")
        if self.data.text_max_length > preset.text.max_text_length:
            raise ConfigError(
                f"data.text_max_length must be in [3, {preset.text.max_text_length}] for the "
                f"{m.preset} model, got {self.data.text_max_length}"
            )

    def resolve(self, name: str | None) -> Path | None:
        """A data path: absolute, or relative to data.root."""
        if name is None:
            return None
        path = Path(name)
        return path if path.is_absolute() or self.data.root is None else Path(self.data.root) / path


# -- declared ranges ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """What one field allows beyond its declared type (int, float, str, bool, or null where the type says so).

    A number is always finite and within [low, high] (an end is open where low_open/high_open says so, absent where
    None); a string is non-empty and, with `choices`, one of them."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()

    def describe(self, annotation: str) -> str:
        kinds = [a.strip() for a in annotation.split("|")]
        if "bool" in kinds:
            text = "true or false"
        elif "str" in kinds:
            text = f"one of {list(self.choices)}" if self.choices else "a non-empty string"
        else:
            noun = "an integer" if "int" in kinds else "a finite number"
            if self.low is not None and self.high is not None:
                text = (
                    f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'} "
                    f"({noun})"
                )
            elif self.low is not None:
                text = f"{'>' if self.low_open else '>='} {self.low} ({noun})"
            elif self.high is not None:
                text = f"{'<' if self.high_open else '<='} {self.high} ({noun})"
            else:
                text = noun
        return text + (" or null" if "None" in kinds else "")

    def allows(self, value: Any, annotation: str) -> bool:
        kinds = [a.strip() for a in annotation.split("|")]
        if value is None:
            return "None" in kinds
        if isinstance(value, bool) or "bool" in kinds:
            return isinstance(value, bool) and "bool" in kinds
        if "str" in kinds:
            return isinstance(value, str) and bool(value.strip()) and (not self.choices or value in self.choices)
        if "int" in kinds:
            if not isinstance(value, int):
                return False
        elif not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def check(self, key: str, value: Any, annotation: str) -> None:
        if not self.allows(value, annotation):
            raise ConfigError(f"{key} must be {self.describe(annotation)}, got {value!r}")


ANY = Rule()  # the declared type alone (bools, free numbers)
TEXT = Rule()  # a non-empty string (paths, tokenizer names)
POSITIVE = Rule(low=0, low_open=True)
NON_NEGATIVE = Rule(low=0)
FRACTION = Rule(low=0, high=1, high_open=True)  # [0, 1)
PROBABILITY = Rule(low=0, high=1)

# Every field of every section, by section name ("": the top-level fields).
RULES: dict[str, dict[str, Rule]] = {
    "": {
        "seed": Rule(low=0, high=2**32 - 1),  # numpy's seed range
        "task": Rule(choices=TASKS),
    },
    "model": {
        "preset": Rule(choices=("base", "tiny")),
        "num_frames": POSITIVE,
        "projection": Rule(choices=("big", "small")),
        "config_file": TEXT,
        "init_from": TEXT,
        "init_video": TEXT,
        "init_text": TEXT,
        "text_dropout": FRACTION,
        "img_size": POSITIVE,
        "patch_size": POSITIVE,
        "cross_gate_init": ANY,
        "time_init": Rule(choices=("zeros", "rand")),
        "temporal_embed_std": NON_NEGATIVE,
        "text_warmup_steps": NON_NEGATIVE,
    },
    "data": {
        "root": TEXT,
        "egoclip_csv": TEXT,
        "video_root": TEXT,
        "egomcq_json": TEXT,
        "meta_json": TEXT,
        "num_verbs": POSITIVE,
        "num_nouns": POSITIVE,
        "neg_window": POSITIVE,
        "strict": ANY,
        "backend": Rule(choices=("auto", "decord", "pyav")),
        "tokenizer": TEXT,
        "allow_download": ANY,
        "text_max_length": Rule(low=3),
        "num_workers": NON_NEGATIVE,
        "frame_cache_mb": NON_NEGATIVE,
        "annotations": TEXT,
        "num_classes": POSITIVE,
    },
    "objective": {
        "egonce_weight": NON_NEGATIVE,
        "mlm_weight": NON_NEGATIVE,
        "vtm_weight": NON_NEGATIVE,
        "temperature": POSITIVE,
        "vtm_negative_temperature": POSITIVE,
        "vtm_negative_anneal": ANY,
        "text_simcse_weight": NON_NEGATIVE,
        "verb": ANY,
        "noun": ANY,
        "mlm_probability": PROBABILITY,
        "margin": NON_NEGATIVE,  # below 0 a pair could rank below the others at no cost
    },
    "optim": {
        # AdamW moves each weight by about lr per step: above 1 a run diverges in a few steps.
        "lr": Rule(low=0, high=1, low_open=True),
        "weight_decay": PROBABILITY,
        "lr_mult_head": POSITIVE,
        "lr_mult_cross_modal": POSITIVE,
        "lr_mult_text": POSITIVE,
        "text_freeze_steps": NON_NEGATIVE,
        "text_freeze_fraction": FRACTION,
        "warmup_fraction": FRACTION,
        "grad_clip": POSITIVE,  # a norm: 0 would zero every gradient, a negative one flips its sign
    },
    "schedule": {
        "epochs": POSITIVE,
        "batch_size": POSITIVE,
        "grad_accum_steps": POSITIVE,
        "max_samples_per_epoch": POSITIVE,
        "max_steps": POSITIVE,
        "max_minutes": POSITIVE,
        "precision": Rule(choices=("auto", "fp32", "bf16", "fp16")),
        "gradient_checkpointing": ANY,
        "max_skipped_steps": NON_NEGATIVE,
    },
    "checkpoint": {"every_steps": POSITIVE, "keep_last": NON_NEGATIVE},  # keep_last 0: keep every checkpoint
    "eval": {"every_epochs": POSITIVE, "num_frames": POSITIVE, "batch_size": POSITIVE, "max_questions": POSITIVE},
    "log": {"every_steps": POSITIVE, "tensorboard": ANY},
}


def _annotation(klass, name: str) -> str:
    return next(str(f.type) for f in dataclasses.fields(klass) if f.name == name)


def check_float_sizes(klass, data: Any, where: str) -> None:
    """An integer given for a float field must fit a float (strict_fields converts it; 1e400 written as an integer
    would raise OverflowError there)."""
    if not isinstance(data, dict):
        return
    for f in dataclasses.fields(klass):
        value = data.get(f.name)
        if "float" in str(f.type) and isinstance(value, int) and not isinstance(value, bool):
            try:
                float(value)
            except OverflowError:
                raise ConfigError(
                    f"{where}.{f.name} must be {RULES[where][f.name].describe(str(f.type))}, "
                    f"got an integer of {len(str(abs(value)))} digits"
                ) from None
