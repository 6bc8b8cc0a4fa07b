"""Evaluation, one module for the trainer, the export validation, the runtime and `egovlp-deploy eval`.

EgoMCQ in the three modes of the official validation: dual (cosine of the projected embeddings), fusion (VTM match
probability), and ensemble (their sum); the questions are read by data/egomcq.py and counted by
`metrics.egomcq_accuracy`.
Zero-shot EK-100 multi-instance retrieval (nDCG, mAP) and Charades-Ego action recognition (mAP over the class
prompts) on their official test files, with the dual encoder at the official evaluation frame counts.

Resuming (`egovlp-deploy eval --resume-dir DIR`): given an `eval_work.EvalWork`, the evaluate_* functions hand it
each batch's per-item outputs (EgoMCQ's choice scores, EK-100's and Charades-Ego's embeddings) to commit, and read
back those an earlier run of the same identity committed instead of computing them again.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from .eval_work import Chunk, agree
from .losses import sim_matrix
from .metrics import charades_map, egomcq_accuracy, mir_scores
from .model import EgoVLPv2

if TYPE_CHECKING:
    import os
    from collections.abc import Callable

    from transformers import PreTrainedTokenizerBase

    from .data.charades import CharadesEgoDataset
    from .data.egomcq import EgoMCQDataset
    from .data.epic import EpicMIRDataset
    from .eval_work import EvalWork

MODES = ("dual", "fusion", "ensemble")


def _collate(items):
    return (
        [it["text"] for it in items],
        torch.stack([it["videos"] for it in items]),
        torch.tensor([it["answer"] for it in items]),
        torch.tensor([it["type"] for it in items]),
        [it["key"] for it in items],
        sum(int(it.get("load_failed", 0)) for it in items),
    )


def _count_loads(load_counts: dict | None, failed: int, clips: int) -> None:
    """Add a batch's clips and those of them that fell back to the black clip to `load_counts` (when given): the
    items carry the count, so it holds in DataLoader workers too, where the dataset's own `failures` stay there."""
    if load_counts is not None:
        load_counts["load_failures"] = load_counts.get("load_failures", 0) + int(failed)
        load_counts["clips"] = load_counts.get("clips", 0) + int(clips)


COUNTS = ("load_failures", "clips")
RESUMED_COUNTS = ("resumed_load_failures", "resumed_clips")  # the part of COUNTS that an earlier run read (EvalWork)


def _sum_over_ranks(load_counts: dict | None, world: int) -> None:
    """Every rank's `load_counts`, summed in place (on every rank). The RESUMED_COUNTS are set only where some rank
    resumed an earlier run's work: a run that resumed nothing reports as one without --resume-dir."""
    if load_counts is None or world == 1:
        return
    shards = [None] * world
    dist.all_gather_object(shards, tuple(load_counts.get(k, 0) for k in (*COUNTS, *RESUMED_COUNTS)))
    for k, total in zip((*COUNTS, *RESUMED_COUNTS), (sum(column) for column in zip(*shards))):
        if k in COUNTS or total:
            load_counts[k] = total


def choice_scores(text_emb: torch.Tensor, video_emb: torch.Tensor, match_prob: torch.Tensor) -> dict[str, torch.Tensor]:
    """Scores (Q, C) of each mode for Q questions with C candidate clips each, from the narrations' embeddings
    (Q, P), the candidates' embeddings (Q, C, P) and the fusion encoder's match probabilities (Q, C)."""
    q = text_emb.shape[0]
    dual = torch.stack([sim_matrix(text_emb[i : i + 1], video_emb[i])[0] for i in range(q)]).float()
    fusion = match_prob.float()
    return {"dual": dual, "fusion": fusion, "ensemble": dual + fusion}


@torch.no_grad()
def score_questions(
    model: EgoVLPv2,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    videos: torch.Tensor,
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Scores (Q, C) of each mode for Q questions with C candidate clips each; videos (Q, C, F, 3, S, S). Texts are
    cut at `max_length` tokens (default: the model's text length, the official tokenizer's 512 for the base model),
    not at whatever model_max_length a tokenizer folder declares."""
    q, c = videos.shape[:2]
    length = max_length or model.config.text.max_text_length
    enc = tokenizer(texts, padding=True, truncation=True, max_length=length, return_tensors="pt")  # dynamic length
    ids, mask = enc["input_ids"].to(videos.device), enc["attention_mask"].to(videos.device)
    clips = videos.flatten(0, 1)  # (Q*C, F, 3, S, S)
    text_emb = model.encode_text(ids, mask)  # (Q, P)
    video_emb = model.encode_video(clips).view(q, c, -1)  # (Q, C, P)
    logits = model.fuse(clips, ids.repeat_interleave(c, 0), mask.repeat_interleave(c, 0)).vtm_logits
    return choice_scores(text_emb, video_emb, F.softmax(logits.float(), dim=-1)[:, 1].view(q, c))


def evaluate_egomcq(
    model: EgoVLPv2,
    dataset: EgoMCQDataset,
    tokenizer: PreTrainedTokenizerBase,
    device: str | torch.device,
    batch_size: int = 4,
    num_workers: int = 0,
    max_questions: int | None = None,
    progress: bool = False,
    predictions: dict | None = None,
    load_counts: dict | None = None,
    work: EvalWork | None = None,
) -> dict[str, dict[str, float]]:
    """{'dual'|'fusion'|'ensemble': {'Inter-video': %, 'Intra-video': %}}; questions are sharded over ranks.
    A `predictions` dict receives each question's chosen clip per mode, {JSON key: {mode: choice index}}; a
    `load_counts` dict receives {'load_failures': candidate clips scored as the black clip, 'clips': candidate clips
    read}, summed over ranks. With `work` (an `EvalWork`), the scores are committed there as they are made and those
    an earlier run of the same identity committed are read back instead of computed again (`load_counts` then also
    holds 'resumed_load_failures' and 'resumed_clips', the part of its counts that earlier run read)."""
    was_training = model.training
    model.eval()
    indices = list(range(len(dataset) if max_questions is None else min(max_questions, len(dataset))))
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0

    def step(batch) -> tuple[tuple[torch.Tensor, ...], list[str], int, int]:
        texts, videos, answers, types, batch_keys, failed = batch
        scores = score_questions(model, tokenizer, texts, videos.to(device))
        columns = (*(scores[m].cpu() for m in MODES), answers, types)
        return columns, batch_keys, failed, videos.shape[0] * videos.shape[1]

    shard = indices[rank::world]
    names = schema = None
    if work is not None:  # what the chunks read back must hold: the questions' keys, scores of each choice
        names = [dataset.entries[i].key for i in shard]
        scores = (torch.float32, (dataset.num_choices,))
        schema = (*(scores for _ in MODES), (torch.int64, ()), (torch.int64, ()))
        work.check()
    columns, keys = _encode_resumable(
        dataset,
        shard,
        step,
        batch_size,
        num_workers,
        progress,
        "EgoMCQ",
        load_counts,
        None if work is None else work.for_rank(rank, world),
        collate_fn=_collate,
        unit="questions",
        names=names,
        schema=schema,
    )
    fields = (*MODES, "answer", "type")
    local = dict(zip(fields, columns)) if columns else {k: torch.empty(0) for k in fields}
    keys = keys or []
    if world > 1:
        shards = [None] * world
        dist.all_gather_object(shards, (local, keys))
        local = {k: torch.cat([s[k] for s, _ in shards if s[k].numel()]) for k in local}
        keys = [key for _, shard_keys in shards for key in shard_keys]
    _sum_over_ranks(load_counts, world)
    model.train(was_training)
    if predictions is not None:
        for i, key in enumerate(keys):  # argmax: the first of equal scores, as egomcq_accuracy counts it
            predictions[key] = {m: int(torch.argmax(local[m][i])) for m in MODES}
    return {m: egomcq_accuracy(local[m], local["answer"], local["type"]) for m in MODES}


def _encode_resumable(
    dataset,
    indices: list[int],
    step: Callable,
    batch_size: int,
    num_workers: int,
    progress: bool,
    desc: str,
    load_counts: dict | None,
    work: EvalWork | None,
    collate_fn=None,
    unit: str = "clips",
    names: list[str] | None = None,
    schema: tuple | None = None,
) -> tuple[list[torch.Tensor], list[str] | None]:
    """`step(batch)` -> (per-item tensors (CPU), the items' names or None, clips scored black, clips read) over
    dataset[indices] in order, batched as given; returns (each tensor concatenated over the items ([] for no item),
    the names or None). With `work` (this rank's `EvalWork`), the batches are committed there as they are made and
    the items an earlier run of the same identity committed are read back, not encoded again, where they fit the
    split (`names`: the items' names, `schema`: the columns' dtypes and shapes, as `EvalWork.resume` checks them):
    the batches after them are those an uninterrupted run makes, so at the same batch size the outputs are the same,
    bit for bit. Under torch.distributed a rank that cannot resume makes every rank raise (`eval_work.agree`)."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    chunks: list[Chunk] = []
    if work is not None:
        problem = None
        try:
            chunks = work.resume(len(indices), unit, desc, batch_size, names, schema)
        except (OSError, ValueError) as exc:
            problem = str(exc)
        agree(problem, world)
    done = sum(chunk.count for chunk in chunks)
    if work is not None and load_counts is not None:
        failed, clips = sum(c.failed for c in chunks), sum(c.clips for c in chunks)
        _count_loads(load_counts, failed, clips)
        load_counts["resumed_load_failures"] = load_counts.get("resumed_load_failures", 0) + failed
        load_counts["resumed_clips"] = load_counts.get("resumed_clips", 0) + clips
    rest = Subset(dataset, indices[done:])
    # in order; no worker is started for a split an earlier run finished
    loader = DataLoader(rest, batch_size=batch_size, collate_fn=collate_fn, num_workers=num_workers if rest else 0)
    if progress:
        from tqdm import tqdm

        before = -(-done // batch_size)
        loader = tqdm(loader, desc=desc, leave=False, initial=before, total=before + len(loader))
    try:
        for batch in loader:
            columns, batch_names, failed, clips = step(batch)
            _count_loads(load_counts, failed, clips)
            chunk = Chunk(tuple(columns), None if batch_names is None else list(batch_names), failed, clips)
            if work is None:
                chunks.append(chunk)  # joined once at the end
            else:
                work.add(chunk)  # committed every few hundred items or minute
        if work is not None:
            chunks = work.finish()
    except BaseException:
        if work is not None and work.record is not None:
            print(
                f"note: {desc}: {work.kept_items} of {len(indices)} {unit} are kept in {work.folder}: rerun the same "
                "command to continue",
                file=sys.stderr,
            )
        raise
    if not chunks:
        return [], None
    whole = Chunk.merge(chunks)
    return list(whole.columns), whole.names


# -- EK-100 MIR and Charades-Ego (zero-shot, dual encoder) ---------------------------------------------------------
EPIC_FRAMES = 16  # the official EK-100 MIR evaluation config's num_frames
CHARADES_FRAMES = 32  # the official Charades-Ego evaluation config's num_frames
CHARADES_TEXT_LENGTH = 30  # class prompts are padded / truncated to 30 tokens, as official


def _encode_split(
    dataset,
    encode,
    batch_size: int,
    num_workers: int,
    progress: bool,
    desc: str,
    load_counts: dict | None = None,
    work: EvalWork | None = None,
    schema: tuple | None = None,
) -> list[torch.Tensor]:
    """`encode(batch)` -> a tuple of per-item tensors (CPU), over every item of `dataset`, returned whole and in
    dataset order; `load_counts` and `work` as `evaluate_egomcq`'s (one clip per item), `schema` the tensors'
    dtypes and shapes after the item dimension (`eval_work.Chunk.schema`: what resumed chunks must hold). Under
    torch.distributed each rank encodes every world-th item and the pieces are gathered to every rank, as the
    official validation gathers its embeddings: the split is read W times faster, and no rank waits alone at a
    collective while one rank reads the whole split (NCCL stops a job whose collective waits past its timeout, 10
    minutes by default, which the EK-100 test split read by one GPU can exceed)."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    indices = list(range(rank, len(dataset), world))

    def step(batch):
        failed = batch.get("load_failed") if isinstance(batch, dict) else None
        clips = len(batch["video"]) if isinstance(batch, dict) and "video" in batch else 0
        return encode(batch), None, 0 if failed is None else int(failed.sum()), clips

    if work is not None:
        work.check()
    rank_work = None if work is None else work.for_rank(rank, world)
    parts, _ = _encode_resumable(
        dataset, indices, step, batch_size, num_workers, progress, desc, load_counts, rank_work, schema=schema
    )
    _sum_over_ranks(load_counts, world)
    if world == 1:
        return parts
    shards = [None] * world
    dist.all_gather_object(shards, (indices, parts))
    shards = [shard for shard in shards if shard[0]]  # a rank with no item (a split smaller than the world) has none
    whole = []
    for column in range(len(shards[0][1])):
        first = shards[0][1][column]
        out = first.new_empty((len(dataset), *first.shape[1:]))
        for shard_indices, shard_parts in shards:
            out[shard_indices] = shard_parts[column]
        whole.append(out)
    return whole


def epic_test_dataset(
    annotations: str | os.PathLike,
    video_root: str | os.PathLike,
    num_frames: int,
    size: int,
    strict: bool = True,
) -> EpicMIRDataset:
    """The EK-100 MIR test split from the official retrieval annotation directory: EPIC_100_retrieval_test.csv,
    EPIC_100_retrieval_test_sentence.csv and relevancy/caption_relevancy_EPIC_100_retrieval_test.npy (or .npz: the
    official .pkl converted once, as egovlp_deploy/data/epic.py describes)."""

    from .data.epic import EpicMIRDataset, split_files

    files = split_files(annotations, "test")
    return EpicMIRDataset(
        files["csv"],
        video_root,
        num_frames,
        size,
        split="test",
        sentence_csv=files["sentence_csv"],
        relevancy_path=files["relevancy"],
        strict=strict,
    )


def charades_test_files(annotations: str | os.PathLike) -> dict[str, Path]:
    """The files of the Charades-Ego test split in the official annotation directory: {'csv', 'classes'}."""
    root = Path(annotations)
    return {"csv": root / "CharadesEgo_v1_test_only1st.csv", "classes": root / "Charades_v1_classes.txt"}


def charades_test_dataset(
    annotations: str | os.PathLike,
    video_root: str | os.PathLike,
    num_frames: int,
    size: int,
    num_classes: int = 157,
    strict: bool = True,
) -> CharadesEgoDataset:
    """The Charades-Ego test split from the official annotation directory (`charades_test_files`):
    CharadesEgo_v1_test_only1st.csv and Charades_v1_classes.txt (the class prompts, `dataset.prompts`)."""
    from .data.charades import CharadesEgoDataset

    files = charades_test_files(annotations)
    return CharadesEgoDataset(
        files["csv"],
        video_root,
        num_frames,
        size,
        split="test",
        classes_path=files["classes"],
        num_classes=num_classes,
        strict=strict,
    )


@torch.no_grad()
def evaluate_epic_mir(
    model: EgoVLPv2,
    dataset: EpicMIRDataset,
    tokenizer: PreTrainedTokenizerBase,
    device: str | torch.device,
    batch_size: int = 16,
    num_workers: int = 0,
    progress: bool = False,
    load_counts: dict | None = None,
    work: EvalWork | None = None,
) -> dict[str, float]:
    """Zero-shot EK-100 multi-instance retrieval: {'nDCG_V2T', 'nDCG_T2V', 'nDCG_AVG', 'mAP_V2T', 'mAP_T2V',
    'mAP_AVG'} in percent (`metrics.mir_scores`).

    As the official validation: every test clip gives a video embedding (segment-middle frames) and its narration a
    text embedding (dynamic padding, truncated to the model's text length), both projected by the dual encoder; the
    cosine matrix (texts x videos) in dataset order is scored against the relevancy matrix, each sentence by the
    caption of the first clip with its narration id. Rows skipped in lax mode leave the matrix with their relevancy
    rows; a sentence whose own clip was skipped is embedded from its sentence-CSV text, and one with no clip of
    relevancy 1 left is not scored (`EpicMIRDataset.scored_sentences`). `load_counts` and `work` as
    `evaluate_egomcq`'s.
    """
    if dataset.relevancy is None or dataset.sentence_ids is None or dataset.scored_sentences is None:
        raise ValueError("EK-100 MIR evaluation needs the test split's sentence CSV and relevancy matrix")
    was_training = model.training
    model.eval()

    def encode_texts(texts: list[str]) -> torch.Tensor:
        enc = tokenizer(
            texts, padding=True, truncation=True, max_length=model.config.text.max_text_length, return_tensors="pt"
        )
        return model.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device)).float().cpu()

    def encode_clips(batch) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_texts(batch["text"]), model.encode_video(batch["video"].to(device)).float().cpu()

    schema = None if work is None else ((torch.float32, (model.config.projection_dim,)),) * 2  # the embeddings
    text_emb, video_emb = _encode_split(
        dataset, encode_clips, batch_size, num_workers, progress, "EK-100 MIR", load_counts, work, schema
    )
    columns, items = dataset.scored_sentences, dataset.sentence_items
    own_text = [j for j, item in zip(columns, items) if item is None]  # sentences whose clip was skipped
    own_emb = [
        encode_texts([dataset.sentences[j] for j in own_text[i : i + batch_size]])
        for i in range(0, len(own_text), batch_size)
    ]
    model.train(was_training)
    # (texts, videos) as official: the clips' captions, then the sentences embedded from their own text
    text_by_video = torch.cat([sim_matrix(text_emb, video_emb)] + [sim_matrix(e, video_emb) for e in own_emb])
    extra = iter(range(len(dataset), len(dataset) + len(own_text)))
    text_rows = [item if item is not None else next(extra) for item in items]
    return mir_scores(text_by_video[text_rows].T, dataset.relevancy[dataset.row_indices][:, columns])


@torch.no_grad()
def evaluate_charades(
    model: EgoVLPv2,
    dataset: CharadesEgoDataset,
    tokenizer: PreTrainedTokenizerBase,
    device: str | torch.device,
    prompts: list[str] | None = None,
    batch_size: int = 16,
    num_workers: int = 0,
    progress: bool = False,
    load_counts: dict | None = None,
    work: EvalWork | None = None,
) -> dict[str, float]:
    """Zero-shot Charades-Ego action recognition: {'mAP': percent} (`metrics.charades_map` x 100).

    As the official validation: each class name (`prompts`, default `dataset.prompts`: Charades_v1_classes.txt from
    character 5 on) is embedded by the dual text encoder, padded / truncated to 30 tokens; each test video (the
    whole video, 'uniform' frames) by the dual video encoder; a video's class scores are the cosine similarities.
    `load_counts` and `work` as `evaluate_egomcq`'s.
    """
    prompts = dataset.prompts if prompts is None else prompts
    if not prompts:
        raise ValueError("Charades-Ego evaluation needs the class prompts (the dataset's classes_path)")
    was_training = model.training
    model.eval()
    length = min(CHARADES_TEXT_LENGTH, model.config.text.max_text_length)
    enc = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    classes = model.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device)).float().cpu()

    def encode_clips(batch) -> tuple[torch.Tensor, torch.Tensor]:
        return model.encode_video(batch["video"].to(device)).float().cpu(), batch["target"]

    schema = None  # the embeddings and the multi-hot targets
    if work is not None:
        schema = ((torch.float32, (model.config.projection_dim,)), (torch.float32, (dataset.num_classes,)))
    videos, targets = _encode_split(
        dataset, encode_clips, batch_size, num_workers, progress, "Charades-Ego", load_counts, work, schema
    )
    model.train(was_training)
    scores = sim_matrix(classes, videos).T  # (videos, classes)
    return {"mAP": 100 * charades_map(scores, targets)}


def skipped_note(
    name: str, dataset: EpicMIRDataset | CharadesEgoDataset | EgoMCQDataset, unit: str = "test rows"
) -> str | None:
    """The line that says what a lax evaluation split leaves out (rows or EgoMCQ questions skipped as bad, such as
    those whose video is missing, EK-100 sentences without a clip of relevancy 1 left, and EK-100 sentences whose
    id names no row of the split, embedded from their own text), or None when it scores the whole split as given:
    its metrics are otherwise those of a subset, not comparable with the benchmark's."""
    skipped = len(dataset.skipped_rows)
    scored = getattr(dataset, "scored_sentences", None)
    left_out = 0 if scored is None else len(dataset.sentences) - len(scored)
    unknown = len(getattr(dataset, "unknown_sentences", None) or ())
    if not skipped and not left_out and not unknown:
        return None
    note = f"note: {name}: {skipped} of {len(dataset) + skipped} {unit} skipped"
    if skipped:
        note += " (" + ", ".join(f"{kind}: {count}" for kind, count in sorted(dataset.skip_counts.items())) + ")"
    if left_out:
        note += f", {left_out} of {len(dataset.sentences)} sentences not scored (no clip of relevancy 1 left)"
    if unknown:
        note += (
            f", {unknown} scored sentence ids name no row of the test CSV (embedded from their sentence-CSV text), "
            f"e.g. {dataset.unknown_sentences[0]!r}"
        )
    return note + ": the metrics cover the rest of the split, not the whole benchmark"


def load_failure_note(name: str, dataset, load_counts: dict | None = None) -> str | None:
    """The line that says how many clips a lax evaluation could not decode and scored as the black clip, or None
    when every clip it read was decoded. By reason, with the first error, where the clips were read in this process
    (the dataset's loader counts them); from the items' counts (`load_counts` of the evaluate_* functions) where
    DataLoader workers read them, whose loaders' reasons stay in the workers. After a resumed run (`EvalWork`), the
    counts cover the clips an earlier run read as well (`load_counts`' resumed_*), as an uninterrupted run's."""
    failures = dataset.failures
    failed = sum(failures.values())
    counts = load_counts or {}
    resumed, resumed_failed = counts.get("resumed_clips", 0), counts.get("resumed_load_failures", 0)
    if failed:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(failures.items()))
        first = next(iter(dataset.first_errors.values()), "")
        detail, clips = f"{reasons}; first: {first}", dataset.clip_loads
        if resumed:  # this process read only the clips after those an earlier run committed
            failed, clips = counts["load_failures"], counts["clips"]
            if resumed_failed:
                detail += f"; {resumed_failed} more in the earlier run this one resumed"
    elif counts.get("load_failures"):
        failed, clips = counts["load_failures"], counts["clips"]
        if resumed_failed == failed:
            detail = "read by the earlier run this one resumed: rerun without --resume-dir to name the reasons"
        else:
            detail = "read in DataLoader workers: --workers 0 names the reasons"
    else:
        return None
    return (
        f"note: {name}: {failed} of {clips} clips could not be read and were scored as black clips "
        f"({detail}): the metrics count them as such"
    )


def format_retrieval(name: str, result: dict[str, float]) -> str:
    """One line per metric, as 'name  metric  value'."""
    return "\n".join(f"{name:<12}{metric:<10}{value:>8.2f}" for metric, value in result.items())


def format_table(result: dict) -> str:
    lines = [f"{'mode':<10}{'inter %':>9}{'intra %':>9}"]
    for mode, r in result.items():
        lines.append(f"{mode:<10}{r.get('Inter-video', float('nan')):>9.1f}{r.get('Intra-video', float('nan')):>9.1f}")
    return "\n".join(lines)
