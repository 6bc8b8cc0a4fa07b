"""EPIC-KITCHENS-100 multi-instance retrieval (EK-100 MIR) from the official annotation files.

Files (EgoVLPv2/data_loader/EpicKitchens_MIR_dataset.py; epic-kitchens-100-annotations/retrieval_annotations):
- EPIC_100_retrieval_{train,test}.csv: comma-separated with a header. Used columns: narration_id, participant_id,
  video_id, start_timestamp, stop_timestamp ("HH:MM:SS.ff"), narration (the official reads them by position 0-2,
  4, 5, 8; we read them by name, and start_frame/stop_frame are ignored as by the official code).
- EPIC_100_retrieval_{train,test}_sentence.csv: the de-duplicated captions, columns (narration_id, narration) by
  name, or by position (the official's reading) in a file whose header lacks those names.
- relevancy/caption_relevancy_EPIC_100_retrieval_{train,test}.pkl: a pickled numpy array (rows: CSV rows, columns:
  sentences). We never unpickle data files: convert it once, in an environment you trust, with
        python -c "import pickle, numpy as np; np.save('caption_relevancy_EPIC_100_retrieval_test.npy', \
np.asarray(pickle.load(open('caption_relevancy_EPIC_100_retrieval_test.pkl', 'rb'))))"
  and pass the .npy (or an .npz holding one array, or the array under 'relevancy').
Videos: {video_root}/{participant_id}/{video_id}.MP4 (the 256-px resized copies), read with the file's real fps
(presentation times on variable-rate files):
start/end frame = round/ceil(fps * timestamp), then LaViLa-style segment frame ids (`epic_frame_indices`),
jittered in train. Pixels are normalised with the 'epic' eval transform; text is padded to 30 tokens.
"""

from __future__ import annotations

import csv
import os
import random
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..tokenizer import has_visible_character
from ..transforms import train_short_side
from .csv_rows import csv_records
from .egoclip import EpochSeededDataset, clip_tensor, item_seeds, takes_max_short_side
from .errors import DataError, FileCheck, RowFilter, RowProblem

EPIC_COLUMNS = ("narration_id", "participant_id", "video_id", "start_timestamp", "stop_timestamp", "narration")
EPIC_MAX_TEXT_LENGTH = 30  # the official trainer_epic pads/truncates captions to 30 tokens
RELEVANCY_THRESHOLD = 0.1  # official self.relevancy: a sentence is a positive when relevancy > 0.1

EpicReader = Callable[..., torch.Tensor]


_TIMESTAMP = re.compile(r"([0-9]+):([0-9]{1,2}):([0-9]{1,2}(?:\.[0-9]*)?)")


def timestamp_seconds(value: str, name: str) -> float:
    """'HH:MM:SS.ff' -> seconds, as the official datetime2sec, but rejecting anything else.

    ASCII digits only: int() and float() would also take a sign ("-00:00:01.00" is 1 s to datetime2sec, the "-"
    vanishing into int("-00")), underscores and other scripts' digits."""
    match = _TIMESTAMP.fullmatch(value.strip())
    if not match:
        raise RowProblem(f"bad {name}", f"{value!r} is not HH:MM:SS.ff")
    hours, minutes, seconds = int(match[1]), int(match[2]), float(match[3])
    if not minutes < 60 or not seconds < 60:
        raise RowProblem(f"bad {name}", f"{value!r} is not HH:MM:SS.ff")
    return hours * 3600 + minutes * 60 + seconds


def epic_video_path(video_root: str | os.PathLike, participant_id: str, video_id: str) -> Path:
    return Path(video_root, participant_id, f"{video_id}.MP4")


def read_epic_clip(
    path: str | os.PathLike,
    start_sec: float,
    stop_sec: float,
    num_frames: int,
    jitter: bool,
    rng: random.Random | None = None,
    backend: str = "auto",
    max_short_side: int | None = None,
) -> torch.Tensor:
    """One EK-100 segment -> uint8 (num_frames, H, W, 3), frames chosen as the official __getitem__ does.
    `max_short_side`: frames whose short side is longer are scaled down to it as they are decoded.

    Raises VideoReadError for an unreadable file or frames outside the video (official: decord IndexError)."""
    from egovlp_deploy.decoding import (
        OUT_OF_RANGE,
        VideoReadError,
        epic_frame_indices,
        epic_frame_range,
        read_frames,
        video_timeline,
    )

    timeline = video_timeline(path, backend=backend)
    if timeline.constant_rate:
        start_frame, end_frame = epic_frame_range(start_sec, stop_sec, timeline.fps)
    else:  # variable frame rate: the frames shown in [start, stop) (the official range's last index is inclusive)
        start_frame, stop_frame = timeline.frames_in(start_sec, stop_sec)
        end_frame = stop_frame - 1
    try:
        ids = epic_frame_indices(start_frame, end_frame, num_frames, jitter, rng=rng)
    except ValueError as e:  # a segment shorter than one frame at this fps
        raise VideoReadError(path, OUT_OF_RANGE, f"clip [{start_sec}, {stop_sec}] s: {e}") from e
    return read_frames(path, ids, backend=backend, max_short_side=max_short_side)


def split_files(annotations: str | os.PathLike, split: str) -> dict[str, Path]:
    """The official retrieval annotation directory's files of `split` ("train" or "test"): {"csv", "sentence_csv",
    "relevancy"}, the relevancy matrix as .npy or .npz (DataError when neither is there: the official .pkl is read
    only once converted, as this module's docstring describes)."""
    root = Path(annotations)
    stem = root / "relevancy" / f"caption_relevancy_EPIC_100_retrieval_{split}"
    relevancy = next((stem.with_suffix(s) for s in (".npy", ".npz") if stem.with_suffix(s).is_file()), None)
    if relevancy is None:
        raise DataError(
            stem.with_suffix(".npy"),
            "file",
            "missing (the official .pkl is read only once converted to .npy, as egovlp_deploy/data/epic.py describes)",
        )
    return {
        "csv": root / f"EPIC_100_retrieval_{split}.csv",
        "sentence_csv": root / f"EPIC_100_retrieval_{split}_sentence.csv",
        "relevancy": relevancy,
    }


def load_relevancy(path: str | os.PathLike) -> np.ndarray:
    """The (num_videos, num_sentences) relevancy matrix from .npy/.npz, never through pickle."""
    unreadable = (
        "not a readable .npy/.npz without pickle ({}); convert the official .pkl once as described in "
        "egovlp_deploy/data/epic.py"
    )
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                names = list(loaded.files)
                if len(names) != 1 and "relevancy" not in names:
                    raise DataError(path, "file", f"expected one array or one named 'relevancy', found {names}")
                # an .npz member is parsed only here: a pickled (object) or truncated one fails now, not at np.load
                loaded = loaded["relevancy" if "relevancy" in names else names[0]]
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(path, "file", unreadable.format(e)) from e
    if not isinstance(loaded, np.ndarray):  # an .npz member that is no .npy comes back as raw bytes
        raise DataError(path, "file", unreadable.format("an .npz member is not an .npy array"))
    # real numbers only: complex passes np.number, and `relevancy > 0.1` on it compares only the real part
    if loaded.ndim != 2 or not (np.issubdtype(loaded.dtype, np.integer) or np.issubdtype(loaded.dtype, np.floating)):
        raise DataError(path, "file", f"expected a 2-D numeric matrix, got {loaded.dtype} {loaded.shape}")
    if not np.isfinite(loaded).all():
        raise DataError(path, "file", "the relevancy matrix has NaN or inf entries")
    # the metrics count a relevancy of exactly 1 as a hit and sum the others as graded gains: another scale (percent,
    # a similarity in [-1, 1]) would give numbers without meaning
    if loaded.size and (loaded.min() < 0 or loaded.max() > 1):
        raise DataError(path, "file", f"relevancy values must be in [0, 1], found [{loaded.min():g}, {loaded.max():g}]")
    return loaded


def sentence_columns(header: list[str]) -> tuple[int, int]:
    """(id column, text column) of the sentence CSV: by name where its header has them (a file saved by pandas with
    its index comes with an unnamed first column, which by position would make the ids the captions), else the
    first two, as the official reads them."""
    names = [name.strip().lstrip("\ufeff") for name in header]
    if "narration_id" in names and "narration" in names:
        return names.index("narration_id"), names.index("narration")
    return 0, 1


def read_sentences(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """The sentence CSV -> (narration ids, sentences). Any bad row is fatal, lax or not: its position is a column
    of the relevancy matrix, so skipping it would misalign every later sentence."""
    ids, texts = [], []
    try:
        f = open(path, newline="", encoding="utf-8")
    except OSError as e:
        raise DataError(path, "open", str(e)) from e
    with f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None or len(header) < 2:
                raise DataError(path, "line 1", f"expected a header with at least 2 columns, got {header}")
            id_column, text_column = sentence_columns(header)
            last = reader.line_num
            for values in reader:
                first, last = last + 1, reader.line_num
                if not values:
                    continue  # a blank line is no sentence (pandas' skip_blank_lines), so it takes no column
                if last > first:  # the lines up to the next quote would vanish inside this sentence
                    raise DataError(
                        path, f"line {first}", f"a quoted field runs on to line {last} (an unbalanced quote?)"
                    )
                # more fields than the header: an unquoted comma would cut the narration short (pandas refuses too)
                if (
                    len(values) != len(header)
                    or not values[id_column].strip()
                    or not has_visible_character(values[text_column])
                ):
                    raise DataError(
                        path,
                        f"line {reader.line_num}",
                        f"expected {len(header)} fields, a narration id and a narration with a visible character "
                        f"(quoted if it holds a comma), got {values}",
                    )
                ids.append(values[id_column])
                texts.append(values[text_column])
        except (csv.Error, UnicodeDecodeError) as e:
            raise DataError(path, f"line {reader.line_num}", f"malformed CSV: {e}") from e
    if not ids:
        raise DataError(path, "all rows", "no sentence")
    return ids, texts


def read_epic_rows(
    csv_path: str | os.PathLike,
    video_root: str | os.PathLike | None,
    rows: RowFilter,
    narration_ids: set[str] | None = None,
) -> tuple[list[tuple[int, int, dict[str, Any]]], int]:
    """Valid rows as (line number, data-row index, fields) and the total number of data rows; `narration_ids`
    receives the narration id of every row that has one, valid or skipped (malformed rows included)."""
    out = []
    files = FileCheck()
    records = csv_records(csv_path, rows, EPIC_COLUMNS, one_line=True, key="narration_id")
    for line, position, fields in records:
        try:
            start = timestamp_seconds(fields["start_timestamp"], "start_timestamp")
            stop = timestamp_seconds(fields["stop_timestamp"], "stop_timestamp")
            if stop <= start:
                raise RowProblem(
                    "bad clip times",
                    f"stop_timestamp {fields['stop_timestamp']} is not after "
                    f"start_timestamp {fields['start_timestamp']}",
                )
            if not has_visible_character(fields["narration"]):
                raise RowProblem("empty narration", f"narration {fields['narration']!r} has no visible character")
            for name in ("narration_id", "participant_id", "video_id"):
                # participant_id is a folder of the video path: ".." there would leave video_root
                if not fields[name].strip() or "/" in fields[name] or fields[name] in (".", ".."):
                    raise RowProblem(f"bad {name}", f"{fields[name]!r}")
            if video_root is not None:
                path = epic_video_path(video_root, fields["participant_id"], fields["video_id"])
                files.require(path)
        except RowProblem as problem:
            rows.reject(line, problem)
            continue
        out.append(
            (
                line,
                position,
                {
                    "narration_id": fields["narration_id"],
                    "start": start,
                    "stop": stop,
                    "participant_id": fields["participant_id"],
                    "video_id": fields["video_id"],
                    "narration": fields["narration"],
                },
            )
        )
    if narration_ids is not None:
        narration_ids.update(records.keys)
    return out, records.data_rows


def rows_with_a_relevant_sentence(
    parsed: list[tuple[int, int, dict[str, Any]]], relevancy: np.ndarray, rows: RowFilter
) -> list[tuple[int, int, dict[str, Any]]]:
    """The evaluation rows whose clip has a sentence of relevancy 1 (its own narration's, in the official files);
    the others go to `rows` (an error in strict mode): their average precision, as a query, is 0/0."""
    kept = []
    for line, position, fields in parsed:
        if not (relevancy[position] == 1).any():
            rows.reject(
                line,
                RowProblem(
                    "no relevant sentence",
                    f"row {position} of the relevancy matrix has no sentence of relevancy 1 (as a query its average "
                    "precision is 0/0)",
                ),
            )
            continue
        kept.append((line, position, fields))
    return kept


class EpicMIRDataset(EpochSeededDataset):
    """EK-100 MIR rows -> dict(video=float (F,3,S,S), text=str, relation=float, index=int (the CSV data row, the
    official item_v), text_index=int (the sentence column, official item_t: -1 outside train), load_failed=int).

    split 'train': the caption is a random sentence whose relevancy to the row is > 0.1 (official _get_caption;
    the row's own narration with relation 1 and text_index 0 when there is none, as the official), frame ids are
    jittered, train_transform on frames scaled, as they are decoded, to a short side of at most
    `transforms.train_short_side(size)` (the official 256-px copies are read as they are); needs `sentence_csv`
    and `relevancy_path`. Other splits: the row's narration, segment-middle frames at full size,
    eval_transform('epic'). Both files are optional there and exposed (`sentence_ids`, `sentences`, `relevancy`) for
    the metrics.

    Lax mode skips bad rows, so `index` (the row of the relevancy matrix) differs from the item number: evaluate
    on `relevancy[dataset.row_indices]`, with the sentence columns `scored_sentences`, each embedded from the
    caption of item `sentence_items[k]` or, where that is None, from its own text (`_scored_sentences`). An
    evaluation row without a sentence of relevancy 1 is a bad row.
    `clip_reader(path, start_sec, stop_sec, num_frames, jitter, rng=...)` -> uint8 (F,H,W,3) replaces the video
    reader (tests); the default is `read_epic_clip`.
    """

    MAX_TEXT_LENGTH = EPIC_MAX_TEXT_LENGTH

    def __init__(
        self,
        csv_path: str | os.PathLike,
        video_root: str | os.PathLike,
        num_frames: int,
        size: int,
        split: str = "test",
        sentence_csv: str | os.PathLike | None = None,
        relevancy_path: str | os.PathLike | None = None,
        strict: bool = True,
        backend: str = "auto",
        seed: int = 0,
        clip_reader: EpicReader | None = None,
        check_files: bool = True,
    ):
        from egovlp_deploy.decoding import ClipLoader

        if num_frames < 1 or size < 1 or seed < 0:
            raise ValueError(f"need num_frames, size >= 1 and seed >= 0, got {num_frames}, {size}, {seed}")
        self.csv_path, self.video_root = str(csv_path), str(video_root)
        self._annotation_files = [str(p) for p in (csv_path, sentence_csv, relevancy_path) if p is not None]
        self.num_frames, self.size, self.split, self.strict, self.seed = num_frames, size, split, strict, seed
        self.train = split == "train"
        if self.train and (sentence_csv is None or relevancy_path is None):
            raise ValueError(
                "split 'train' samples captions from the sentence CSV by relevancy: pass sentence_csv "
                "and relevancy_path"
            )

        rows = RowFilter(csv_path, strict)
        csv_narration_ids: set[str] = set()
        parsed, num_rows = read_epic_rows(
            csv_path, video_root if check_files else None, rows, narration_ids=csv_narration_ids
        )
        if not parsed:
            raise rows.none_usable()

        self.sentence_ids = self.sentences = self.relevancy = None
        if sentence_csv is not None:
            self.sentence_ids, self.sentences = read_sentences(sentence_csv)
        if relevancy_path is not None:
            self.relevancy = load_relevancy(relevancy_path)
            expected = (num_rows, len(self.sentences) if self.sentences is not None else self.relevancy.shape[1])
            if self.relevancy.shape != expected:
                raise DataError(
                    relevancy_path, "shape", f"{self.relevancy.shape}, expected (CSV data rows, sentences) = {expected}"
                )
            if not self.train:  # found now, not after the whole split is encoded (or a fine-tuning epoch trained)
                parsed = rows_with_a_relevant_sentence(parsed, self.relevancy, rows)
                if not parsed:
                    raise rows.none_usable()

        self.skipped_rows, self.skip_counts = rows.skipped_rows, rows.counts
        self._lines = [line for line, _, _ in parsed]
        self.row_indices = np.array([pos for _, pos, _ in parsed], dtype=np.int64)
        self.narration_ids = [r["narration_id"] for _, _, r in parsed]
        self._rows = [r for _, _, r in parsed]
        for r in self._rows:
            r["path"] = epic_video_path(video_root, r.pop("participant_id"), r.pop("video_id"))
        self.scored_sentences = self.sentence_items = None
        # the scored sentences whose id names no row of the CSV, valid or skipped (lax mode: embedded from their
        # own text, which `evaluation.skipped_note` counts)
        self.unknown_sentences: list[str] = []
        if not self.train and self.sentences is not None and self.relevancy is not None:
            self.scored_sentences, self.sentence_items = self._scored_sentences(sentence_csv, relevancy_path)
            self.unknown_sentences = [
                self.sentence_ids[j]
                for j, item in zip(self.scored_sentences, self.sentence_items)
                if item is None and self.sentence_ids[j] not in csv_narration_ids
            ]

        self._loader = ClipLoader(strict=strict, backend=backend)
        self.failures = self._loader.failures
        self.first_errors = self._loader.first_errors  # failure reason -> its first message
        self._read = clip_reader or read_epic_clip  # ClipLoader passes backend=
        # Training frames are scaled to a bounded short side as they are decoded, as EgoClipDataset's are (by the
        # reader where it takes max_short_side, else by clip_tensor); evaluation frames are read at full size.
        self._short_side = train_short_side(size)
        self._read_bounds = takes_max_short_side(self._read)
        EpochSeededDataset.__init__(self)

    @property
    def clip_loads(self) -> int:
        """How many clips this process has asked its loader for, decoded or not (the count `failures` is out of)."""
        return self._loader.loads

    def __len__(self) -> int:
        return len(self._rows)

    def annotation_files(self) -> list[str]:
        """The annotation files the split was read from: rows, sentences, relevancy (what a checkpoint's data
        fingerprint hashes)."""
        return list(self._annotation_files)

    def video_files(self) -> list[str]:
        """The distinct video files the rows read, as "participant_id/video_id.MP4" relative to video_root, sorted
        (what a checkpoint's data fingerprint records the sizes of)."""
        return sorted({Path(r["path"]).relative_to(self.video_root).as_posix() for r in self._rows})

    def _scored_sentences(
        self, sentence_csv: str | os.PathLike, relevancy_path: str | os.PathLike
    ) -> tuple[np.ndarray, list[int | None]]:
        """The sentence columns the retrieval metrics score, and for each the item whose caption embeds it: the
        first usable row with the sentence's narration id (official `mir_metrics_vtc`), or None where lax mode
        skipped that row, and the sentence is then embedded from its own text in the sentence CSV (the same words:
        the official file holds each narration once, under the id of a row that has it). Real sentences are shared
        by many clips, so leaving such a sentence out instead would leave those clips without their relevancy-1
        sentence, and the metrics undefined. A sentence with no usable clip of relevancy 1 is a query with no
        answer: left out in lax mode (its clips were skipped), a DataError in strict mode; so is, in strict mode,
        a sentence id that names no row."""
        first_item: dict[str, int] = {}
        for item, narration_id in enumerate(self.narration_ids):
            first_item.setdefault(narration_id, item)
        if self.strict:
            unknown = [s for s in self.sentence_ids if s not in first_item]
            if unknown:
                raise DataError(
                    sentence_csv,
                    "narration_id",
                    f"{len(unknown)} sentence ids name no row of {self.csv_path}, e.g. {unknown[:3]} (the sentence "
                    "CSV of another split?)",
                )
        answerable = (self.relevancy[self.row_indices] == 1).any(axis=0)
        if self.strict and not answerable.all():
            column = int(np.argmin(answerable))
            raise DataError(
                relevancy_path,
                f"column {column}",
                f"sentence {self.sentence_ids[column]!r} has no clip of relevancy 1: as a query its average precision "
                "is 0/0",
            )
        columns = np.flatnonzero(answerable)
        return columns, [first_item.get(self.sentence_ids[j]) for j in columns]

    def sentence_row_indices(self) -> np.ndarray:
        """For each sentence, the CSV data row with the same narration_id (official mir_metrics_vtc `indexes`,
        which prints and drops a missing id, misaligning the matrix; here it is an error)."""
        if self.sentence_ids is None:
            raise ValueError("no sentence_csv was given")
        where = {nid: int(pos) for nid, pos in zip(self.narration_ids, self.row_indices)}
        missing = [s for s in self.sentence_ids if s not in where]
        if missing:
            raise DataError(
                self.csv_path, "narration_id", f"{len(missing)} sentence ids have no (usable) row, e.g. {missing[:3]}"
            )
        return np.array([where[s] for s in self.sentence_ids], dtype=np.int64)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from egovlp_deploy.decoding import VideoReadError

        row, position = self._rows[index], int(self.row_indices[index])
        s_text, s_frames, s_crop = item_seeds(self.seed, self.epoch, index, 3)
        text, relation, text_index = row["narration"], 1.0, -1
        if self.train:
            positives = np.flatnonzero(self.relevancy[position] > RELEVANCY_THRESHOLD)
            if len(positives):
                text_index = int(positives[random.Random(s_text).randrange(len(positives))])
                text, relation = self.sentences[text_index], float(self.relevancy[position, text_index])
            else:
                text_index = 0  # the official returns 0 here (not -1), and its training mask reads it
        bound = {"max_short_side": self._short_side} if self.train and self._read_bounds else {}
        try:
            frames = self._loader.load(
                self._read,
                row["path"],
                row["start"],
                row["stop"],
                self.num_frames,
                self.train,
                rng=random.Random(s_frames),
                **bound,
            )
        except VideoReadError as e:
            raise DataError(self.csv_path, f"line {self._lines[index]}", f"video: {e}") from e
        if self.train:
            video, failed = clip_tensor(
                frames, self.num_frames, self.size, s_crop, variant="epic", max_short_side=self._short_side
            )
        else:
            video, failed = clip_tensor(frames, self.num_frames, self.size, variant="epic")
        return {
            "video": video,
            "text": text,
            "relation": relation,
            "index": position,
            "text_index": text_index,
            "load_failed": failed,
        }
