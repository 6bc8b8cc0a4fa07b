"""EgoClip pre-training rows (the official `egoclip.csv`) as a torch Dataset with scene-aware negatives.

Format (EgoVLPv2/data_loader/EgoClip_EgoMCQ_dataset.py): TAB-separated, one header line, columns
video_uid, video_dur, narration_source, narration_ind, narration_time, clip_start, clip_end, clip_text, tag_verb,
tag_noun; the tags are Python list strings such as "[3, 17]" (118 verb and 582 noun classes of the Ego4D taxonomy).
Videos use the chunked layout {video_root}/{video_uid}/{chunk}.mp4 with 600-s chunks.

Differences from the official reader, all deliberate:
- tags are parsed with json / `ast.literal_eval`, never `eval` (the official code evals file contents);
- every row is validated at construction (the official reader finds a bad row when it reaches it, mid-epoch);
- randomness (frame offsets, crop, flip, the negative) comes from a generator seeded by (seed, epoch, index), not
  the process-global RNG, so an item is the same whatever DataLoader worker draws it, and epochs are reproducible;
- the rows live in numpy arrays and one packed text buffer, not a DataFrame: 3.8M rows of Python objects would be
  copied into every forked worker as their refcounts are touched.
"""

from __future__ import annotations

import ast
import inspect
import json
import math
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..tokenizer import has_visible_character
from ..transforms import train_short_side
from .csv_rows import csv_records
from .errors import DataError, FileCheck, RowFilter, RowProblem

EGOCLIP_COLUMNS = (
    "video_uid",
    "video_dur",
    "narration_source",
    "narration_ind",
    "narration_time",
    "clip_start",
    "clip_end",
    "clip_text",
    "tag_verb",
    "tag_noun",
)
NUM_VERBS, NUM_NOUNS = 118, 582  # Ego4D taxonomy sizes (official noun_dim / verb_dim)
CHUNK_SEC = 600  # official chunk_sec: videos are cut into 600-s files (utils/video_chunk.py)
EGOCLIP_MAX_TEXT_LENGTH = 15  # the official trainer pads pre-training narrations to 15 tokens

ClipReader = Callable[..., torch.Tensor]


# -- row parsing (shared with egomcq.py, whose rows have the same fields) ------------------------------------------
@dataclass(frozen=True)
class ClipRow:
    video_uid: str
    start_sec: float  # clamped at 0 like the official _get_video_path
    end_sec: float
    text: str
    verbs: tuple[int, ...]
    nouns: tuple[int, ...]
    narration_time: float | None


def parse_number(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise RowProblem(f"bad {name}", f"{value!r} is not a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RowProblem(f"bad {name}", f"{value!r} is not a number") from None
    if not math.isfinite(number):
        raise RowProblem(f"bad {name}", f"{value!r} is not finite")
    return number


def parse_tag_list(value: Any, num_classes: int, name: str) -> tuple[int, ...]:
    """A tag column ("[3, 17]") -> class ids, each checked to be an int in [0, num_classes).

    json.loads covers the official spelling at C speed; ast.literal_eval (safe: literals only) covers Python
    spellings such as "(3,)" . Neither can run code, unlike the official eval().
    """
    parsed = value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            try:
                parsed = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                raise RowProblem(f"bad {name}", f"{value!r} is not a list of class ids") from None
    if not isinstance(parsed, (list, tuple)):
        raise RowProblem(f"bad {name}", f"{value!r} is not a list of class ids")
    for tag in parsed:
        if isinstance(tag, bool) or not isinstance(tag, int):
            raise RowProblem(f"bad {name}", f"{value!r}: {tag!r} is not an integer class id")
        if not 0 <= tag < num_classes:
            raise RowProblem(
                f"unknown {name.removeprefix('tag_')} id", f"{tag} in {name} is outside [0, {num_classes})"
            )
    return tuple(parsed)


def parse_clip_row(fields: Mapping[str, Any], num_verbs: int, num_nouns: int) -> ClipRow:
    """Validate one EgoClip-format row (a CSV row or an EgoMCQ query/choice) and keep what the loader needs."""
    uid = fields.get("video_uid")
    if not isinstance(uid, str) or not uid.strip() or "/" in uid or uid in (".", ".."):
        raise RowProblem("bad video_uid", f"{uid!r} is not a video uid")
    start = parse_number(fields.get("clip_start"), "clip_start")
    end = parse_number(fields.get("clip_end"), "clip_end")
    if end <= start:
        raise RowProblem("bad clip times", f"clip_end {end} is not after clip_start {start}")
    if end <= 0:
        raise RowProblem("clip outside video", f"the clip [{start}, {end}] s ends before the video starts")
    if fields.get("video_dur") is not None:  # the CSV always has it; EgoMCQ rows may not
        duration = parse_number(fields["video_dur"], "video_dur")
        if duration <= 0:
            raise RowProblem("bad video_dur", f"video_dur {duration} is not positive")
        if max(start, 0.0) >= duration:
            raise RowProblem("clip outside video", f"clip_start {start} is not inside the {duration}-s video")
    narration_time = fields.get("narration_time")
    if narration_time is not None:
        narration_time = parse_number(narration_time, "narration_time")
    text = fields.get("clip_text")
    if not isinstance(text, str) or not text.strip():
        raise RowProblem("empty narration", f"clip_text {text!r} is empty")
    verbs = parse_tag_list(fields.get("tag_verb"), num_verbs, "tag_verb")
    nouns = parse_tag_list(fields.get("tag_noun"), num_nouns, "tag_noun")
    # Negative times are clamped, not rejected: the official _get_video_path does max(t, 0) on real EgoClip rows.
    return ClipRow(uid, max(start, 0.0), max(end, 0.0), text, verbs, nouns, narration_time)


def chunk_paths(video_root: str | os.PathLike, row: ClipRow) -> list[Path]:
    """The distinct chunk files a clip touches (official _get_video_path; a clip may span two 600-s chunks)."""
    from egovlp_deploy.decoding import egoclip_chunk

    paths, _, _ = egoclip_chunk(video_root, row.video_uid, row.start_sec, row.end_sec, CHUNK_SEC)
    if int(row.end_sec // CHUNK_SEC) > int(row.start_sec // CHUNK_SEC) + 1:
        raise RowProblem(
            "bad clip times", f"the clip [{row.start_sec}, {row.end_sec}] s spans more than two {CHUNK_SEC}-s chunks"
        )
    return list(dict.fromkeys(paths))


def multi_hot(ids: Sequence[int], num_classes: int) -> torch.Tensor:
    """float32 (num_classes,) with ones at `ids` (the official noun_vec / verb_vec)."""
    vec = torch.zeros(num_classes, dtype=torch.float32)
    if len(ids):
        vec[torch.as_tensor(list(ids), dtype=torch.long)] = 1.0
    return vec


def item_seeds(seed: int, epoch: int, index: int, count: int) -> list[int]:
    """`count` independent 32-bit seeds for one item, a pure function of (seed, epoch, index).

    SeedSequence mixes the three numbers (seeding with seed + index would make neighbouring items of neighbouring
    epochs share streams). Being a pure function, it does not matter which worker process draws the item.
    """
    return [int(s) for s in np.random.SeedSequence([seed, epoch, index]).generate_state(count)]


class SharedEpoch:
    """The epoch number in shared memory, so `set_epoch` in the main process reaches DataLoader workers,
    persistent ones included (they hold a copy of the dataset, where a plain int would keep its old value)."""

    def __init__(self):
        self._value = torch.zeros((), dtype=torch.int64).share_memory_()

    def set(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._value.fill_(int(epoch))

    def get(self) -> int:
        return int(self._value)


class EpochSeededDataset(torch.utils.data.Dataset):
    """A dataset whose random draws are a pure function of (seed, epoch, index); `set_epoch` selects the epoch."""

    def __init__(self):
        self._epoch = SharedEpoch()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random draws __getitem__ makes (call before iterating each epoch)."""
        self._epoch.set(epoch)

    @property
    def epoch(self) -> int:
        return self._epoch.get()


class PackedStrings:
    """A read-only list of strings stored as one utf-8 buffer + offsets: no per-string Python objects to copy."""

    def __init__(self, strings: Sequence[str]):
        encoded = [s.encode("utf-8") for s in strings]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        self._data = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self._data[self._offsets[i] : self._offsets[i + 1]].tobytes().decode("utf-8")


class PackedIds:
    """Ragged int lists (the tag ids of every row) as one flat array + offsets."""

    def __init__(self, lists: Sequence[Sequence[int]]):
        self._offsets = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in lists], out=self._offsets[1:])
        self._flat = np.fromiter((i for x in lists for i in x), dtype=np.int32, count=int(self._offsets[-1]))

    def __getitem__(self, i: int) -> np.ndarray:
        return self._flat[self._offsets[i] : self._offsets[i + 1]]


# -- the CSV ---------------------------------------------------------------------------------------------------
def read_egoclip_rows(
    csv_path: str | os.PathLike, video_root: str | os.PathLike | None, num_verbs: int, num_nouns: int, rows: RowFilter
) -> list[tuple[int, ClipRow]]:
    """Every valid row of an egoclip.csv as (line number, ClipRow); bad rows go to `rows` (raise or record).

    With `video_root`, a row whose chunk file(s) are missing is bad too (checked once per file).
    """
    out: list[tuple[int, ClipRow]] = []
    files = FileCheck()
    # The official pd.read_csv(sep='\t') quotes with '"' too, so a narration containing tabs can be quoted.
    records = csv_records(
        csv_path, rows, EGOCLIP_COLUMNS, delimiter="\t", hint=" (is it TAB-separated?)", one_line=True
    )
    for line, _, fields in records:
        try:
            row = parse_clip_row(fields, num_verbs, num_nouns)
            if row.narration_time is None:
                raise RowProblem("bad narration_time", "narration_time is empty")
            if not has_visible_character(row.text):  # it would train on byte tokens that stand for nothing
                raise RowProblem("empty narration", f"clip_text {row.text!r} has no visible character")
            if video_root is not None:
                for path in chunk_paths(video_root, row):
                    files.require(path)
        except RowProblem as problem:
            rows.reject(line, problem)
            continue
        out.append((line, row))
    return out


SEGMENT_COLUMNS = ("video_uid", "clip_start", "clip_end")  # clip_text is optional in a segments file


def read_segments_by_uid(csv_path: str | os.PathLike) -> dict[str, list[tuple[float, float, str | None]]]:
    """{video_uid: [(start s, end s, clip_text or None)]} of an EgoClip-format TAB file that needs only the segment
    columns (video_uid, clip_start, clip_end, optional clip_text), in file order: the runtime's annotated segments.
    A bad row raises DataError naming the file and the line (strict: a segments file is the user's own list)."""
    rows = RowFilter(csv_path, strict=True)
    out: dict[str, list[tuple[float, float, str | None]]] = {}
    records = csv_records(
        csv_path, rows, SEGMENT_COLUMNS, delimiter="\t", hint=" (is it TAB-separated?)", one_line=True
    )
    for line, _, fields in records:
        try:
            start, end = parse_number(fields["clip_start"], "clip_start"), parse_number(fields["clip_end"], "clip_end")
            if not fields["video_uid"]:
                raise RowProblem("bad video_uid", "the video_uid is empty")
        except RowProblem as problem:
            rows.reject(line, problem)
            continue
        out.setdefault(fields["video_uid"], []).append((start, end, fields.get("clip_text")))
    return out


class EgoClipDataset(EpochSeededDataset):
    """EgoClip rows -> dict(video=float (F,3,S,S), text=str, verb=float (num_verbs,), noun=float (num_nouns,),
    [neg_window set:] video_neg, text_neg, verb_neg, noun_neg, and index=int, load_failed=int).

    split 'train': 'rand' frame offsets + train_transform on frames scaled, as they are decoded, to a short side of at
    most `transforms.train_short_side(size)` (2 x size: a 256-px official chunk is read as it is, a 4K file costs no
    more memory than a 448-px one); other splits: 'uniform' (segment middles) + eval_transform('egoclip').
    The scene-aware negative is another row (possibly the same one, as in the official `.sample(1)`) of the same
    video whose narration_time falls in the same `neg_window`-second bucket:
    segment_id = video_uid + '_' + str(narration_time // neg_window).

    strict=True: a bad metadata row raises DataError at construction, an unreadable video raises DataError (with
    the row) at __getitem__. strict=False: bad rows are skipped (`skipped_rows`, `skip_counts`) and an unreadable
    clip becomes the official lax black clip, counted in `failures` (per process: with DataLoader workers,
    sum the items' `load_failed` instead).

    `clip_reader(video_root, video_uid, start_sec, end_sec, num_frames, sample, rng=random.Random)` -> uint8
    (F,H,W,3) replaces the video reader (tests); the default is egovlp_deploy.decoding.read_egoclip_clip.
    `check_files` verifies at construction that every row's chunk files exist. `frame_cache_bytes` > 0 keeps whole
    decoded videos in each worker process up to that many bytes (`video.read_egoclip_clip`), for small datasets.
    """

    MAX_TEXT_LENGTH = EGOCLIP_MAX_TEXT_LENGTH

    def __init__(
        self,
        csv_path: str | os.PathLike,
        video_root: str | os.PathLike,
        num_frames: int,
        size: int,
        split: str = "train",
        num_verbs: int = NUM_VERBS,
        num_nouns: int = NUM_NOUNS,
        neg_window: int | None = 60,
        strict: bool = True,
        backend: str = "auto",
        seed: int = 0,
        clip_reader: ClipReader | None = None,
        check_files: bool = True,
        frame_cache_bytes: int = 0,
    ):
        from egovlp_deploy.decoding import ClipLoader

        if num_frames < 1 or size < 1:
            raise ValueError(f"num_frames and size must be positive, got {num_frames} and {size}")
        if neg_window is not None and neg_window <= 0:
            raise ValueError(f"neg_window must be positive or None, got {neg_window}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.csv_path, self.video_root = str(csv_path), str(video_root)
        self.num_frames, self.size, self.split = num_frames, size, split
        self.num_verbs, self.num_nouns, self.neg_window = num_verbs, num_nouns, neg_window
        self.strict, self.seed = strict, seed
        self.sample = "rand" if split == "train" else "uniform"

        rows = RowFilter(csv_path, strict)
        parsed = read_egoclip_rows(csv_path, video_root if check_files else None, num_verbs, num_nouns, rows)
        if not parsed:
            raise rows.none_usable()
        self.skipped_rows, self.skip_counts = rows.skipped_rows, rows.counts

        uids = sorted({r.video_uid for _, r in parsed})
        code = {u: i for i, u in enumerate(uids)}
        self._uids = uids
        self._uid = np.array([code[r.video_uid] for _, r in parsed], dtype=np.int32)
        self._line = np.array([line for line, _ in parsed], dtype=np.int64)
        self._start = np.array([r.start_sec for _, r in parsed], dtype=np.float64)
        self._end = np.array([r.end_sec for _, r in parsed], dtype=np.float64)
        self._text = PackedStrings([r.text for _, r in parsed])
        self._verbs = PackedIds([r.verbs for _, r in parsed])
        self._nouns = PackedIds([r.nouns for _, r in parsed])
        if neg_window is not None:
            bucket = np.floor_divide(np.array([r.narration_time for _, r in parsed]), neg_window).astype(np.int64)
            self._group, self._members, self._offsets = _segments(self._uid, bucket)
        del parsed

        self._loader = ClipLoader(strict=strict, backend=backend, frame_cache_bytes=frame_cache_bytes)
        self.failures = self._loader.failures
        self.first_errors = self._loader.first_errors  # failure reason -> its first message
        if clip_reader is None:
            from egovlp_deploy.decoding import read_egoclip_clip as clip_reader  # ClipLoader passes backend=
        self._read = clip_reader
        # Training frames are scaled to a bounded short side as they are decoded (`transforms.shrink_frames`), by the
        # reader where it takes max_short_side, else by clip_tensor.
        self._short_side = train_short_side(size)
        self._read_bounds = takes_max_short_side(clip_reader)
        EpochSeededDataset.__init__(self)

    @property
    def clip_loads(self) -> int:
        """How many clips this process has asked its loader for, decoded or not (the count `failures` is out of)."""
        return self._loader.loads

    def __len__(self) -> int:
        return len(self._line)

    def narrations(self) -> list[str]:
        """Every row's narration (clip_text), in item order."""
        return [self._text[i] for i in range(len(self))]

    def annotation_files(self) -> list[str]:
        """The annotation files the rows were read from (what a checkpoint's data fingerprint hashes)."""
        return [self.csv_path]

    def video_files(self) -> list[str]:
        """The distinct chunk files the rows read, as "video_uid/chunk.mp4" relative to video_root, sorted (what a
        checkpoint's data fingerprint records the sizes of)."""
        # a clip reads its start's chunk and its end's (`chunk_paths`); one int64 key per (video, chunk)
        chunks = np.floor_divide(np.concatenate([self._start, self._end]), CHUNK_SEC).astype(np.int64)
        keys = np.unique((np.concatenate([self._uid, self._uid]).astype(np.int64) << 32) + chunks)
        return sorted(f"{self._uids[k >> 32]}/{k & 0xFFFFFFFF}.mp4" for k in keys.tolist())

    def line_of(self, index: int) -> int:
        """The CSV line number of item `index` (skipped rows make it differ from index + 2)."""
        return int(self._line[index])

    def segment_members(self, index: int) -> np.ndarray:
        """Item indices sharing item `index`'s (video_uid, narration_time // neg_window) bucket (itself included)."""
        g = self._group[index]
        return self._members[self._offsets[g] : self._offsets[g + 1]]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} rows")
        s_neg, s_frames, s_crop, s_frames_neg, s_crop_neg = item_seeds(self.seed, self.epoch, index, 5)
        video, failed = self._clip(index, s_frames, s_crop)
        item = {
            "video": video,
            "text": self._text[index],
            "verb": multi_hot(self._verbs[index], self.num_verbs),
            "noun": multi_hot(self._nouns[index], self.num_nouns),
            "index": index,
        }
        if self.neg_window is not None:
            members = self.segment_members(index)
            neg = int(members[random.Random(s_neg).randrange(len(members))])
            video_neg, failed_neg = self._clip(neg, s_frames_neg, s_crop_neg)
            failed += failed_neg
            item.update(
                video_neg=video_neg,
                text_neg=self._text[neg],
                verb_neg=multi_hot(self._verbs[neg], self.num_verbs),
                noun_neg=multi_hot(self._nouns[neg], self.num_nouns),
            )
        item["load_failed"] = failed
        return item

    def _clip(self, index: int, frame_seed: int, crop_seed: int) -> tuple[torch.Tensor, int]:
        """Row -> float (F,3,S,S) and 1 if it fell back to the lax black clip."""
        from egovlp_deploy.decoding import VideoReadError

        uid = self._uids[self._uid[index]]
        train = self.split == "train"
        bound = {"max_short_side": self._short_side} if train and self._read_bounds else {}
        try:
            frames = self._loader.load(
                self._read,
                self.video_root,
                uid,
                float(self._start[index]),
                float(self._end[index]),
                self.num_frames,
                self.sample,
                rng=random.Random(frame_seed),
                **bound,
            )
        except VideoReadError as e:
            raise DataError(self.csv_path, f"line {self.line_of(index)}", f"video {uid}: {e}") from e
        if not train:
            return clip_tensor(frames, self.num_frames, self.size)
        return clip_tensor(frames, self.num_frames, self.size, crop_seed, max_short_side=self._short_side)


def takes_max_short_side(clip_reader: Callable[..., Any]) -> bool:
    """Whether a clip reader scales frames down as it decodes them (it takes `max_short_side`, as this package's
    readers do); a dataset bounds the frames of another reader after it returns them (`clip_tensor`)."""
    try:
        return "max_short_side" in inspect.signature(clip_reader).parameters
    except (TypeError, ValueError):  # a callable without a signature to read
        return False


def clip_tensor(
    frames: torch.Tensor | None,
    num_frames: int,
    size: int,
    crop_seed: int | None = None,
    variant: str = "egoclip",
    max_short_side: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Decoded uint8 frames -> (float (num_frames,3,size,size), 1 if it is the lax black clip else 0).

    `frames` None (a lax-mode read failure) gives the official black clip; `crop_seed` selects the train transform
    (seeded crop and flip), None the eval transform (`preprocess.eval_clip`: C++ when built); fewer frames than
    num_frames are zero-padded as official. `max_short_side`: larger frames are first scaled down to that short side
    (`transforms.shrink_frames`; a no-op on frames a reader already bounded).
    """
    from egovlp_deploy.preprocess import eval_clip
    from egovlp_deploy.transforms import black_clip, shrink_frames, train_transform

    if frames is None:
        return black_clip(num_frames, size), 1
    if max_short_side is not None:
        frames = shrink_frames(frames, max_short_side)
    if crop_seed is not None:
        video = train_transform(frames, size, generator=torch.Generator().manual_seed(crop_seed), variant=variant)
    else:
        video = eval_clip(frames, size, variant=variant)  # the C++ path when built
    return pad_frames(video, num_frames), 0


def pad_frames(video: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Zero-pad (F',3,S,S) to num_frames like the official `final[:imgs.shape[0]] = imgs`."""
    if video.shape[0] == num_frames:
        return video
    final = video.new_zeros((num_frames, *video.shape[1:]))
    final[: min(num_frames, video.shape[0])] = video[:num_frames]
    return final


def _segments(uid: np.ndarray, bucket: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group rows by (uid, bucket): per-row group id, members sorted by group, and CSR offsets into them."""
    keys = np.stack([uid.astype(np.int64), bucket], axis=1)
    _, group = np.unique(keys, axis=0, return_inverse=True)
    group = group.reshape(-1)
    members = np.argsort(group, kind="stable")
    offsets = np.zeros(group.max() + 2, dtype=np.int64)
    np.cumsum(np.bincount(group), out=offsets[1:])
    return group, members, offsets
