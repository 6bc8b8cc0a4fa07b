"""Validation of exported artifacts against PyTorch: numbers and task-level agreement, failing on a miss.

Per artifact, at batch and text sizes the trace never saw (`VALIDATION_SIZES`):
- `max_abs`: max |artifact - torch| over all elements;
- `max_rel`: max_abs / max |torch| (error relative to the output's scale: an element-wise ratio explodes on the
  near-zero entries every embedding has, and then checks nothing);
- `min_cosine`: the smallest per-row cosine (each row flattened) between artifact and torch outputs.
Per precision, across roles (`task_agreement`):
- retrieval: the text->video and video->text top-1 of the artifacts' dual embeddings vs torch's;
- EgoMCQ answers in dual, fusion and ensemble mode, scored by the trainer's own `score_questions` over an adapter
  that runs the artifacts (on the synthetic set when given, else random questions);
- the fusion head fed with the exported prefixes vs `fusion` in one graph and vs torch's `fuse`.
A disagreement only counts as "decisive" where torch's own top-1 margin exceeds the artifact's error scale:
random weights give near-ties that any rounding flips, and those say nothing about the export.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .specs import ROLES, example_inputs, export_patches, role_module

# (cosine floor, max_rel ceiling, decisive task agreement floor) per precision. fp32: the artifact matches torch to
# float rounding and agrees on every decisive answer. fp16: a trained model's fusion logits (larger activations than
# random weights give) carry far more half-precision error than random weights' outputs, so max_rel is held to 0.1.
# int8: dynamic quantization, loose on numbers; its real gate is EgoMCQ accuracy (EGOMCQ_MAX_DROP).
THRESHOLDS = {
    "fp32": {"min_cosine": 0.99999, "max_rel": 1e-4, "agreement": 1.0},
    "fp16": {"min_cosine": 0.999, "max_rel": 1e-1, "agreement": 0.9},
    "int8": {"min_cosine": 0.99, "max_rel": 0.1, "agreement": 0.8},
}
HEAD_VS_FUSION_ATOL = {"fp32": 1e-5, "fp16": 5e-3, "int8": 5e-2}
EGOMCQ_MAX_DROP = 2.0  # EgoMCQ accuracy points below torch fp32 an artifact may lose (with answers; int8's real gate)


def accuracy_drops(what: str, reference: dict, got: dict, types) -> list[str]:
    """Failures for each EgoMCQ group whose accuracy is more than EGOMCQ_MAX_DROP points below the reference's, or
    more than one question below where one question is worth more points than that (12 questions: 8.3 points
    each). A gate finer than one answer would fail on the first near-tie that rounding flips; the decisive-answer
    agreement still holds those answers to the precision's floor."""
    counts = {
        "Inter-video": int((torch.as_tensor(types) == 1).sum()),
        "Intra-video": int((torch.as_tensor(types) == 2).sum()),
    }
    failures = []
    for kind, value in got.items():
        drop = reference[kind] - value
        one_answer = 100.0 / counts[kind] if counts.get(kind) else 0.0
        if drop > max(EGOMCQ_MAX_DROP, one_answer) + 1e-6:
            failures.append(
                f"{what} {kind} accuracy {value:.1f} is {drop:.1f} points below torch fp32 ({reference[kind]:.1f})"
            )
    return failures


def validation_sizes(max_batch: int, max_text_len: int) -> list[tuple[int, int]]:
    """(batch, text_len) pairs that differ from the trace sizes (`onnx_export.trace_sizes`, (3, 11) by default) in
    the text length, and the first in the batch: B = 1 (the device's case) and B = 2. In a short range the trace
    takes the longest text (--max-text-len 3 traces 3), so one token less is validated there."""
    from .onnx_export import trace_sizes

    traced = trace_sizes(max_batch, max_text_len)[1]

    def untraced(length: int) -> int:
        return length - 1 if length == traced and length > 1 else length

    return [(1, untraced(min(5, max_text_len))), (min(2, max_batch), untraced(min(13, max_text_len)))]


@dataclass
class OutputMetrics:
    max_abs: float
    max_rel: float
    min_cosine: float


@dataclass
class Check:
    """One validation: its metrics, its thresholds and the verdict."""

    name: str
    passed: bool
    metrics: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def compare(ref: np.ndarray, got: np.ndarray) -> OutputMetrics:
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    if ref.shape != got.shape:
        raise ValueError(f"output shape {got.shape} differs from torch's {ref.shape}")
    diff = np.abs(ref - got)
    scale = float(np.abs(ref).max()) or 1.0
    a, b = ref.reshape(ref.shape[0], -1), got.reshape(got.shape[0], -1)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(denom > 0, (a * b).sum(1) / np.maximum(denom, 1e-300), 1.0)
    if not np.isfinite(got).all():
        return OutputMetrics(float("inf"), float("inf"), -1.0)
    return OutputMetrics(float(diff.max()), float(diff.max()) / scale, float(cos.min()))


def torch_outputs(model, role: str, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    with torch.no_grad(), export_patches(model):
        out = role_module(model, role)(**inputs)
    out = out if isinstance(out, tuple) else (out,)
    return {name: t.float().cpu().numpy() for name, t in zip(ROLES[role].output_names, out)}


def as_numpy_inputs(inputs: dict[str, torch.Tensor], precision: str) -> dict[str, np.ndarray]:
    out = {}
    for name, t in inputs.items():
        arr = t.detach().cpu().numpy()
        if arr.dtype == np.float32 and precision == "fp16":
            arr = arr.astype(np.float16)
        out[name] = arr
    return out


def validate_artifact(model, role: str, run, precision: str, sizes: list[tuple[int, int]], seed: int = 7) -> Check:
    """Run `run(numpy inputs) -> {name: array}` against torch at each size; return the verdict."""
    limits = THRESHOLDS[precision]
    metrics, failures = {}, []
    for batch, text_len in sizes:
        inputs = example_inputs(model, role, batch, text_len, seed=seed + batch * 100 + text_len)
        ref = torch_outputs(model, role, inputs)
        got = run(as_numpy_inputs(inputs, precision))
        for name in ROLES[role].output_names:
            m = compare(ref[name], got[name])
            key = f"{name}@B{batch}" + (f"L{text_len}" if ROLES[role].uses_text else "")
            metrics[key] = asdict(m)
            if m.min_cosine < limits["min_cosine"]:
                failures.append(f"{key}: cosine {m.min_cosine:.7f} < {limits['min_cosine']}")
            if m.max_rel > limits["max_rel"]:
                failures.append(f"{key}: max rel err {m.max_rel:.2e} > {limits['max_rel']:.0e}")
    worst = {
        "max_abs": max(v["max_abs"] for v in metrics.values()),
        "max_rel": max(v["max_rel"] for v in metrics.values()),
        "min_cosine": min(v["min_cosine"] for v in metrics.values()),
    }
    return Check(
        f"{role}/{precision}", not failures, {"worst": worst, "per_output": metrics, "thresholds": limits}, failures
    )


# -- task level ---------------------------------------------------------------------------------------------------
class ArtifactModel:
    """Duck-types the model methods `egovlp_deploy.evaluation.score_questions` calls (`encode_text`, `encode_video`,
    `fuse`) with exported artifacts, so EgoMCQ is scored by the evaluation's exact code. `runs[role](inputs) ->
    outputs`. `fusion_via_head` re-ranks from the prefixes (the device's path) instead of the one-graph fusion
    artifact."""

    def __init__(self, runs: dict, precision: str, max_batch: int, fusion_via_head: bool = False):
        self.runs, self.precision, self.max_batch = runs, precision, max_batch
        self.fusion_via_head = fusion_via_head

    def _run(self, role: str, **inputs: torch.Tensor) -> list[torch.Tensor]:
        n = next(iter(inputs.values())).shape[0]
        chunks = []
        for start in range(0, n, self.max_batch):  # the artifact's batch axis is bounded by --max-batch
            part = {k: v[start : start + self.max_batch] for k, v in inputs.items()}
            out = self.runs[role](as_numpy_inputs(part, self.precision))
            chunks.append(
                [torch.from_numpy(np.asarray(out[name], dtype=np.float32)) for name in ROLES[role].output_names]
            )
        return [torch.cat(parts) for parts in zip(*chunks)]

    def encode_video(self, video):
        return self._run("video_encoder", video=video)[0]

    def encode_text(self, input_ids, attention_mask):
        return self._run("text_encoder", input_ids=input_ids, attention_mask=attention_mask)[0]

    def fuse(self, video, input_ids, attention_mask):
        from egovlp_deploy.model.egovlp import FusionOutput

        if self.fusion_via_head:
            vp = self._run("video_fusion_prefix", video=video)[0]
            tp = self._run("text_encoder", input_ids=input_ids, attention_mask=attention_mask)[1]
            logits, vcls, text = self._run(
                "fusion_head", video_prefix=vp, text_prefix=tp, attention_mask=attention_mask
            )
        else:
            logits, vcls, text = self._run("fusion", video=video, input_ids=input_ids, attention_mask=attention_mask)
        return FusionOutput(vcls, text, logits)


class PreTokenized:
    """A tokenizer stand-in for random questions, whose texts are their row numbers ("0", "1", ...): returns the
    given ids and mask of those rows (a chunk of the questions gets its own rows)."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor):
        self.ids, self.mask = ids, mask

    def __call__(self, texts, **kwargs):
        rows = [int(t) for t in texts]
        return {"input_ids": self.ids[rows], "attention_mask": self.mask[rows]}


@dataclass
class TaskSet:
    """Questions for task-level checks: texts + candidate clips (Q, C, F, 3, S, S), answers when known."""

    texts: list[str]
    videos: torch.Tensor
    tokenizer: object
    answers: torch.Tensor | None = None
    types: torch.Tensor | None = None
    source: str = "random"


def random_task_set(model, questions: int = 6, choices: int = 5, text_len: int = 9, seed: int = 11) -> TaskSet:
    inp = example_inputs(model, "fusion", questions * choices, text_len, seed=seed)
    ids = example_inputs(model, "text_encoder", questions, text_len, seed=seed + 1)
    videos = inp["video"].view(questions, choices, *inp["video"].shape[1:])
    return TaskSet(
        [str(i) for i in range(questions)],
        videos,
        PreTokenized(ids["input_ids"], ids["attention_mask"]),
        source="random",
    )


def egomcq_task_set(json_path, video_root, tokenizer_dir, model, max_questions: int = 24) -> TaskSet:
    from egovlp_deploy.data.egomcq import EgoMCQDataset
    from egovlp_deploy.tokenizer import load_tokenizer

    cfg = model.config.video
    dataset = EgoMCQDataset(json_path, video_root, cfg.num_frames, cfg.img_size)
    items = [dataset[i] for i in range(min(max_questions, len(dataset)))]
    return TaskSet(
        [it["text"] for it in items],
        torch.stack([it["videos"] for it in items]),
        load_tokenizer(tokenizer_dir),
        torch.tensor([it["answer"] for it in items]),
        torch.tensor([it["type"] for it in items]),
        source=str(json_path),
    )


def _decisive_agreement(ref: torch.Tensor, got: torch.Tensor, tol: float) -> tuple[float, float]:
    """(raw, decisive) top-1 agreement over rows of score matrices; decisive ignores rows whose torch top-1
    margin over the artifact's choice is within `tol` (a tie at the artifact's precision)."""
    r_top, g_top = ref.argmax(-1), got.argmax(-1)
    raw = float((r_top == g_top).float().mean())
    margin = ref.gather(-1, r_top[:, None])[:, 0] - ref.gather(-1, g_top[:, None])[:, 0]
    decisive = margin > tol
    agree = (r_top == g_top) | ~decisive
    return raw, float(agree.float().mean())


def _scores_in_chunks(model, tasks: TaskSet, length: int, max_batch: int) -> dict[str, torch.Tensor]:
    """`score_questions` over as many questions at a time as put at most `max_batch` clips (or one question's) in one
    call: torch runs every clip of a call in one batch, and 30 paper-size 16-frame clips through `fuse` at once
    took over 10 GB. A question's scores do not depend on the others'."""
    from egovlp_deploy.evaluation import score_questions

    per_call = max(1, max_batch // tasks.videos.shape[1])
    parts = [
        score_questions(model, tasks.tokenizer, tasks.texts[i : i + per_call], tasks.videos[i : i + per_call], length)
        for i in range(0, len(tasks.texts), per_call)
    ]
    return {mode: torch.cat([p[mode] for p in parts]) for mode in parts[0]}


def task_agreement(model, runs: dict, precision: str, tasks: TaskSet, max_batch: int, name: str = "") -> Check:
    """Retrieval, EgoMCQ answers and the head-vs-fusion equality for the artifacts in `runs` (role -> run); the
    check is named `task/<name>` (default: the precision)."""
    from egovlp_deploy.losses import sim_matrix
    from egovlp_deploy.metrics import egomcq_accuracy

    limits = THRESHOLDS[precision]
    tol = {"fp32": 1e-5, "fp16": 2e-3, "int8": 1e-2}[precision]
    metrics: dict = {"source": tasks.source, "questions": len(tasks.texts)}
    failures: list[str] = []
    have = set(runs)

    with torch.no_grad(), export_patches(model):
        if {"video_encoder", "text_encoder"} <= have:
            art = ArtifactModel(runs, precision, max_batch)
            enc = tasks.tokenizer(tasks.texts, padding=True, truncation=True, return_tensors="pt")
            clips = (
                tasks.videos[:, 0]
                if tasks.answers is None
                else tasks.videos[torch.arange(len(tasks.texts)), tasks.answers]
            )  # one clip per text
            ref = sim_matrix(model.encode_text(enc["input_ids"], enc["attention_mask"]), model.encode_video(clips))
            got = sim_matrix(art.encode_text(enc["input_ids"], enc["attention_mask"]), art.encode_video(clips))
            t2v, t2v_d = _decisive_agreement(ref, got, tol)
            v2t, v2t_d = _decisive_agreement(ref.T, got.T, tol)
            metrics["retrieval"] = {
                "t2v_top1_agreement": t2v,
                "v2t_top1_agreement": v2t,
                "t2v_decisive": t2v_d,
                "v2t_decisive": v2t_d,
            }
            for key, value in (("t2v", t2v_d), ("v2t", v2t_d)):
                if value < limits["agreement"]:
                    failures.append(f"retrieval {key} top-1 agreement {value:.3f} < {limits['agreement']}")

        modes = []
        if {"video_encoder", "text_encoder", "fusion"} <= have:
            modes.append(("egomcq", ArtifactModel(runs, precision, max_batch)))
        if {"video_encoder", "text_encoder", "video_fusion_prefix", "fusion_head"} <= have:
            modes.append(("egomcq_via_head", ArtifactModel(runs, precision, max_batch, fusion_via_head=True)))
        if modes:
            length = model.config.text.max_text_length  # the artifacts' texts are tokenized as the model's
            ref_scores = _scores_in_chunks(model, tasks, length, max_batch)
            for label, art in modes:
                got_scores = _scores_in_chunks(art, tasks, length, max_batch)
                entry = {}
                for mode in ("dual", "fusion", "ensemble"):
                    raw, dec = _decisive_agreement(ref_scores[mode], got_scores[mode], tol)
                    entry[mode] = {"answer_agreement": raw, "decisive": dec}
                    if tasks.answers is not None:
                        acc_ref = egomcq_accuracy(ref_scores[mode], tasks.answers, tasks.types)
                        acc_got = egomcq_accuracy(got_scores[mode], tasks.answers, tasks.types)
                        entry[mode]["accuracy_torch_fp32"] = acc_ref
                        entry[mode]["accuracy_artifact"] = acc_got
                        failures += accuracy_drops(f"{label} {mode}", acc_ref, acc_got, tasks.types)
                    if dec < limits["agreement"]:
                        failures.append(f"{label} {mode} answer agreement {dec:.3f} < {limits['agreement']}")
                metrics[label] = entry

        if {"video_fusion_prefix", "text_encoder", "fusion_head", "fusion"} <= have:
            b, L = min(2, max_batch), 9
            inp = example_inputs(model, "fusion", b, L, seed=99)
            head = ArtifactModel(runs, precision, max_batch, fusion_via_head=True).fuse(**inp).vtm_logits
            whole = ArtifactModel(runs, precision, max_batch).fuse(**inp).vtm_logits
            torch_logits = model.fuse(**inp).vtm_logits.float()
            d_whole = float((head - whole).abs().max())
            d_torch = float((head - torch_logits).abs().max())
            # the same graph split two ways must agree to 1e-5; against torch the runtime's own error adds, so
            # there the artifact's relative tolerance applies, scaled by the logits' magnitude
            tol_torch = max(HEAD_VS_FUSION_ATOL[precision], limits["max_rel"] * float(torch_logits.abs().max()))
            metrics["fusion_head_vs_fusion"] = {
                "max_abs_vs_fusion_graph": d_whole,
                "max_abs_vs_torch_fuse": d_torch,
                "atol": HEAD_VS_FUSION_ATOL[precision],
                "atol_vs_torch": tol_torch,
            }
            for what, d, tol in (
                ("fusion graph", d_whole, HEAD_VS_FUSION_ATOL[precision]),
                ("torch fuse", d_torch, tol_torch),
            ):
                if d > tol:
                    failures.append(f"fusion_head over prefixes differs from the {what} by {d:.2e} (> {tol:.1e})")
    return Check(f"task/{name or precision}", not failures, metrics, failures)
