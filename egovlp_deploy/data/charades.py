"""Charades-Ego (first-person videos) for zero-shot / fine-tuned action recognition with class-name prompts.

Files (EgoVLPv2/data_loader/CharadesEgo_dataset.py, trainer/trainer_charades.py, utils/charades_meta.py):
- test/val: CharadesEgo_v1_test_only1st.csv, comma-separated with a header; used columns `id`, `script` (the
  official caption, column 6) and `actions`, e.g. "c092 11.90 21.20;c147 0.00 12.60" (class, start s, end s; empty
  for no action). The target is the 157-class multi-hot of the classes named in `actions`; the whole video is read
  with 'uniform' sampling (segment middles over all its frames).
- train: metadata_train.csv as written by utils/charades_meta.py: TAB-separated `id, cls, t_start, t_end,
  narration`, one row per action; the clip [t_start, t_end] is read at the video's own fps with 'rand' sampling,
  its frames scaled, as they are decoded, to a short side of at most `transforms.train_short_side(size)`.
- Charades_v1_classes.txt: lines "c000 Holding some clothes"; the prompt is the line from character 5 on
  (`line[5:]`), of its first comma-separated field, as the official csv.reader / pd.read_csv do.
Videos: {video_root}/{id}.mp4. Prompts are padded to 30 tokens (trainer_charades).
"""

from __future__ import annotations

import csv
import os
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..tokenizer import has_visible_character
from ..transforms import train_short_side
from .csv_rows import csv_records
from .egoclip import EpochSeededDataset, clip_tensor, item_seeds, multi_hot, parse_number, takes_max_short_side
from .errors import DataError, FileCheck, RowFilter, RowProblem

# The official fine-tuning reads the 480-px copies (CharadesEgo_v1_480): training never scales them down.
OFFICIAL_SHORT_SIDE = 480

NUM_CLASSES = 157
CHARADES_MAX_TEXT_LENGTH = 30
_CLASS_ID = re.compile(r"c(\d{3})")

CharadesReader = Callable[..., torch.Tensor]


def parse_class_id(token: str, num_classes: int) -> int:
    match = _CLASS_ID.fullmatch(token)
    if not match:
        raise RowProblem("bad class", f"{token!r} is not a class id like c092")
    cls = int(match.group(1))
    if cls >= num_classes:
        raise RowProblem("unknown class id", f"{token} is outside [0, {num_classes})")
    return cls


def parse_actions(value: str, num_classes: int = NUM_CLASSES) -> list[tuple[int, float, float]]:
    """'c092 11.90 21.20;c147 0.00 12.60' -> [(92, 11.9, 21.2), (147, 0.0, 12.6)]; '' -> []."""
    if not value.strip():
        return []
    actions = []
    for action in value.split(";"):
        parts = action.split()
        if len(parts) != 3:
            raise RowProblem("bad actions", f"{action!r} is not 'cNNN start end'")
        actions.append(
            (
                parse_class_id(parts[0], num_classes),
                parse_number(parts[1], "action start"),
                parse_number(parts[2], "action end"),
            )
        )
    return actions


def load_charades_classes(path: str | os.PathLike, num_classes: int = NUM_CLASSES) -> list[str]:
    """Charades_v1_classes.txt -> the num_classes prompts, in class order (checked against the c### ids)."""
    prompts = []
    try:
        # utf-8-sig: a byte-order mark would otherwise hide the first line's "c000"
        with open(path, newline="", encoding="utf-8-sig") as f:
            for line_no, fields in enumerate(csv.reader(f), start=1):
                if not fields or not fields[0].strip():
                    continue
                first = fields[0]
                if first[:4] != f"c{len(prompts):03d}" or not first[5:].strip():
                    raise DataError(
                        path, f"line {line_no}", f"expected 'c{len(prompts):03d} <class name>', got {first!r}"
                    )
                prompts.append(first[5:])
    except OSError as e:
        raise DataError(path, "open", str(e)) from e
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(path, "file", f"unreadable text: {e}") from e
    if len(prompts) != num_classes:
        raise DataError(path, "all lines", f"{len(prompts)} classes, expected {num_classes}")
    return prompts


def read_charades_clip(
    path: str | os.PathLike,
    start_sec: float | None,
    end_sec: float | None,
    num_frames: int,
    sample: str,
    rng: random.Random | None = None,
    backend: str = "auto",
    max_short_side: int | None = None,
) -> torch.Tensor:
    """uint8 (K<=F,H,W,3): the whole video when the times are None (official test), else [start_sec, end_sec]
    at the file's fps (official read_frames_cv2_charades); the dataset zero-pads to F after the transform.
    `max_short_side`: frames whose short side is longer are scaled down to it as they are decoded."""
    from egovlp_deploy.decoding import read_clip

    return read_clip(
        path, start_sec, end_sec, num_frames, sample, backend=backend, rng=rng, max_short_side=max_short_side
    )[0]


class CharadesEgoDataset(EpochSeededDataset):
    """Charades-Ego -> dict(video=float (F,3,S,S), text=str, target=float (num_classes,) multi-hot, index=int,
    load_failed=int). In train the target is the one-hot of the row's `cls` (the official returns the int).

    Strict/lax as EgoClipDataset (bad rows: malformed fields, unknown class ids, non-numeric or empty clip times,
    empty narrations in train, missing videos, a test id on an earlier row); a test split in which no usable row
    names an action is an error. `clip_reader(path, start_sec|None, end_sec|None, num_frames, sample,
    rng=random.Random|None)` -> uint8 (F,H,W,3) replaces the video reader (tests).
    Prompts for evaluation: `load_charades_classes(classes_path)`, or `dataset.prompts` when classes_path is given.
    """

    MAX_TEXT_LENGTH = CHARADES_MAX_TEXT_LENGTH

    def __init__(
        self,
        csv_path: str | os.PathLike,
        video_root: str | os.PathLike,
        num_frames: int,
        size: int,
        split: str = "test",
        classes_path: str | os.PathLike | None = None,
        num_classes: int = NUM_CLASSES,
        strict: bool = True,
        backend: str = "auto",
        seed: int = 0,
        clip_reader: CharadesReader | None = None,
        check_files: bool = True,
    ):
        from egovlp_deploy.decoding import ClipLoader

        if num_frames < 1 or size < 1 or seed < 0:
            raise ValueError(f"need num_frames, size >= 1 and seed >= 0, got {num_frames}, {size}, {seed}")
        self.csv_path, self.video_root = str(csv_path), str(video_root)
        self.num_frames, self.size, self.split, self.strict, self.seed = num_frames, size, split, strict, seed
        self.num_classes, self.train = num_classes, split == "train"
        self.prompts = load_charades_classes(classes_path, num_classes) if classes_path is not None else None

        rows = RowFilter(csv_path, strict)
        self._items = self._read_train(rows) if self.train else self._read_test(rows)
        if check_files:
            files = FileCheck()
            kept = []
            for item in self._items:
                try:
                    files.require(item["path"])
                except RowProblem as problem:
                    rows.reject(item["line"], problem)
                    continue
                kept.append(item)
            self._items = kept
        if not self._items:
            raise rows.none_usable()
        if not self.train and not any(item["classes"] for item in self._items):
            # mAP averages over the classes with a positive video: found now, not after every video is encoded
            raise rows.fail("all rows", "no usable row names an action (empty `actions`): there is no mAP to take")
        self.skipped_rows, self.skip_counts = rows.skipped_rows, rows.counts
        self._loader = ClipLoader(strict=strict, backend=backend)
        self.failures = self._loader.failures
        self.first_errors = self._loader.first_errors  # failure reason -> its first message
        self._read = clip_reader or read_charades_clip  # ClipLoader passes backend=
        # Training frames are scaled to a bounded short side as they are decoded, as EgoClipDataset's are (by the
        # reader where it takes max_short_side, else by clip_tensor), never below the official copies' 480 px;
        # evaluation frames are read at full size.
        self._short_side = max(train_short_side(size), OFFICIAL_SHORT_SIDE)
        self._read_bounds = takes_max_short_side(self._read)
        EpochSeededDataset.__init__(self)

    def _rows(self, rows: RowFilter, delimiter: str, required: tuple[str, ...]):
        """Yield (line, fields) of well-formed rows; malformed ones go to `rows`."""
        # charades_meta.py writes metadata_train.csv unquoted (QUOTE_NONE); the official test CSV is quoted CSV.
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        for line, _, fields in csv_records(self.csv_path, rows, required, delimiter, quoting):
            yield line, fields

    def _check_id(self, vid: str) -> Path:
        if not vid.strip() or "/" in vid or vid in (".", ".."):
            raise RowProblem("bad id", f"{vid!r} is not a video id")
        return Path(self.video_root, f"{vid}.mp4")

    def _read_test(self, rows: RowFilter) -> list[dict[str, Any]]:
        items = []
        first_line: dict[str, int] = {}  # id -> the line that has it
        for line, fields in self._rows(rows, ",", ("id", "actions")):
            try:
                path = self._check_id(fields["id"])
                classes = sorted({cls for cls, _, _ in parse_actions(fields["actions"], self.num_classes)})
                # a test video is one row: a second row would count the video twice in every class's AP (the
                # official reads both, with the labels of the last)
                if fields["id"] in first_line:
                    raise RowProblem("duplicate id", f"{fields['id']!r} is on line {first_line[fields['id']]} already")
            except RowProblem as problem:
                rows.reject(line, problem)
                continue
            first_line[fields["id"]] = line
            items.append(
                {
                    "line": line,
                    "path": path,
                    "text": fields.get("script", ""),
                    "classes": classes,
                    "start": None,
                    "end": None,
                }
            )
        return items

    def _read_train(self, rows: RowFilter) -> list[dict[str, Any]]:
        items = []
        for line, fields in self._rows(rows, "\t", ("id", "cls", "t_start", "t_end", "narration")):
            try:
                path = self._check_id(fields["id"])
                try:
                    cls = int(fields["cls"])
                except ValueError:
                    raise RowProblem("bad class", f"cls {fields['cls']!r} is not an integer") from None
                if not 0 <= cls < self.num_classes:
                    raise RowProblem("unknown class id", f"cls {cls} is outside [0, {self.num_classes})")
                start, end = parse_number(fields["t_start"], "t_start"), parse_number(fields["t_end"], "t_end")
                if start < 0 or end <= start:
                    raise RowProblem("bad clip times", f"[{start}, {end}] s is not a clip")
                if not has_visible_character(fields["narration"]):
                    raise RowProblem("empty narration", f"narration {fields['narration']!r} has no visible character")
            except RowProblem as problem:
                rows.reject(line, problem)
                continue
            items.append(
                {"line": line, "path": path, "text": fields["narration"], "classes": [cls], "start": start, "end": end}
            )
        return items

    @property
    def clip_loads(self) -> int:
        """How many clips this process has asked its loader for, decoded or not (the count `failures` is out of)."""
        return self._loader.loads

    def __len__(self) -> int:
        return len(self._items)

    def annotation_files(self) -> list[str]:
        """The annotation files the rows were read from (what a checkpoint's data fingerprint hashes)."""
        return [self.csv_path]

    def video_files(self) -> list[str]:
        """The distinct video files the rows read, as "id.mp4" relative to video_root, sorted (what a checkpoint's
        data fingerprint records the sizes of)."""
        return sorted({Path(item["path"]).relative_to(self.video_root).as_posix() for item in self._items})

    def __getitem__(self, index: int) -> dict[str, Any]:
        from egovlp_deploy.decoding import VideoReadError

        item = self._items[index]
        s_frames, s_crop = item_seeds(self.seed, self.epoch, index, 2)
        sample = "rand" if self.train else "uniform"
        bound = {"max_short_side": self._short_side} if self.train and self._read_bounds else {}
        try:
            frames = self._loader.load(
                self._read,
                item["path"],
                item["start"],
                item["end"],
                self.num_frames,
                sample,
                rng=random.Random(s_frames) if self.train else None,
                **bound,
            )
        except VideoReadError as e:
            raise DataError(self.csv_path, f"line {item['line']}", f"video: {e}") from e
        if self.train:
            video, failed = clip_tensor(frames, self.num_frames, self.size, s_crop, max_short_side=self._short_side)
        else:
            video, failed = clip_tensor(frames, self.num_frames, self.size)
        return {
            "video": video,
            "text": item["text"],
            "target": multi_hot(item["classes"], self.num_classes),
            "index": index,
            "load_failed": failed,
        }
