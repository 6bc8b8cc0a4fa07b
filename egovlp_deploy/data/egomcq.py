"""EgoMCQ (the official `egomcq.json`): a narration and 5 candidate clips, one of them correct.

Format (EgoVLPv2/data_loader/EgoClip_EgoMCQ_dataset.py `_get_val_item`):
    {"0": {"types": 1 | 2, "query": {EgoClip row}, "choices": {"0": {EgoClip row}, ..., "4": {...}}, "answer": int}}
type 1 = inter-video, 2 = intra-video. The query contributes only its narration; each choice's clip is read with
'uniform' sampling (segment middles) and the eval transform, in the order of the choice keys 0..C-1 (`answer`
indexes that order, as the official enumerate over the JSON object does).

`read_egomcq` is the one parser and validator of the format: `egovlp-deploy eval` (EgoMCQDataset) and the runtime's
`mcq` both read through it, so they accept and reject the same files, with the same messages naming the key.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..tokenizer import has_visible_character
from .egoclip import NUM_NOUNS, NUM_VERBS, ClipReader, ClipRow, chunk_paths, clip_tensor, parse_clip_row, parse_tag_list
from .errors import DataError, FileCheck, RowFilter, RowProblem

MCQ_TYPES = {1: "inter", 2: "intra"}


@dataclass(frozen=True)
class MCQEntry:
    key: str
    text: str
    choices: tuple[ClipRow, ...]
    answer: int | None  # None only where the reader allows unanswered questions (the runtime's mcq)
    type: int


class _JSONObject(dict):
    """A JSON object as read by `read_egomcq`; `repeated` counts the copies of each key the file gives it more than
    once (Python's json keeps the last copy without a word)."""

    repeated: dict[str, int] = {}


def _json_object(pairs: list[tuple[str, Any]]) -> _JSONObject:
    obj = _JSONObject(pairs)
    if len(obj) != len(pairs):
        copies = collections.Counter(k for k, _ in pairs)
        obj.repeated = {k: n for k, n in copies.items() if n > 1}
    return obj


def _repeated_field(entry: Mapping) -> str | None:
    """Where an entry's objects (the entry, its query, its choices and each choice) name a field more than once."""
    for where, obj in (("", entry), ("query: ", entry.get("query")), ("choices: ", entry.get("choices"))):
        if getattr(obj, "repeated", ()):
            return f"{where}{next(iter(obj.repeated))!r}"
    choices = entry.get("choices")
    for k, row in choices.items() if isinstance(choices, Mapping) else ():
        if getattr(row, "repeated", ()):
            return f"choice {k}: {next(iter(row.repeated))!r}"
    return None


def parse_mcq_entry(
    key: str, entry: Any, num_choices: int, num_verbs: int, num_nouns: int, require_answer: bool = True
) -> MCQEntry:
    """One entry, validated; `require_answer=False` lets `answer` be absent (a present one is still checked)."""
    if not isinstance(entry, Mapping):
        raise RowProblem("malformed entry", f"expected an object, got {type(entry).__name__}")
    repeated = _repeated_field(entry)
    if repeated:
        raise RowProblem("repeated field", f"{repeated} is given more than once: which copy is meant is unknown")
    required = ("types", "query", "choices", "answer") if require_answer else ("types", "query", "choices")
    missing = [k for k in required if k not in entry]
    if missing:
        raise RowProblem("malformed entry", f"missing fields {missing}")
    kind = entry["types"]
    if isinstance(kind, bool) or kind not in MCQ_TYPES:
        raise RowProblem("bad types", f"types {kind!r} is not 1 (inter) or 2 (intra)")
    query = entry["query"]
    if not isinstance(query, Mapping):
        raise RowProblem("malformed entry", "query is not an object")
    text = query.get("clip_text")
    if not isinstance(text, str) or not text.strip():
        raise RowProblem("empty narration", f"query clip_text {text!r} is empty")
    if not has_visible_character(text):
        raise RowProblem("empty narration", f"query clip_text {text!r} has no visible character")
    # The official _get_caption evals the query's tags too, so they must parse even though only the text is used.
    parse_tag_list(query.get("tag_verb"), num_verbs, "tag_verb")
    parse_tag_list(query.get("tag_noun"), num_nouns, "tag_noun")
    choices = entry["choices"]
    if not isinstance(choices, Mapping):
        raise RowProblem("malformed entry", "choices is not an object")
    expected = [str(i) for i in range(num_choices)]
    if sorted(choices, key=lambda k: (len(k), k)) != expected:
        raise RowProblem(
            "wrong number of choices", f"choice keys {list(choices)}, expected {num_choices} keys 0..{num_choices - 1}"
        )
    rows = []
    for k in expected:
        if not isinstance(choices[k], Mapping):
            raise RowProblem("malformed entry", f"choice {k} is not an object")
        try:
            rows.append(parse_clip_row(choices[k], num_verbs, num_nouns))
        except RowProblem as problem:
            raise RowProblem(problem.kind, f"choice {k}: {problem.detail}") from None
    answer = entry.get("answer")
    if answer is None and not require_answer:
        return MCQEntry(key, text, tuple(rows), None, kind)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < num_choices:
        raise RowProblem("bad answer", f"answer {answer!r} is not a choice index in [0, {num_choices})")
    return MCQEntry(key, text, tuple(rows), answer, kind)


def read_egomcq(
    json_path: str | os.PathLike,
    video_root: str | os.PathLike | None,
    num_choices: int,
    num_verbs: int,
    num_nouns: int,
    rows: RowFilter,
    require_answer: bool = True,
) -> list[MCQEntry]:
    """Every valid entry, ordered by integer key; bad entries go to `rows` (raise or record, by JSON key). With
    `video_root`, every choice's video chunks must exist."""
    try:
        # utf-8-sig: a byte-order mark (the file saved again by a Windows editor) is no JSON error
        with open(json_path, encoding="utf-8-sig") as f:
            data = json.load(f, object_pairs_hook=_json_object)
    except OSError as e:
        raise rows.fail("open", str(e)) from e
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError names the line and column
        raise rows.fail("json", f"not valid JSON: {e}") from e
    except RecursionError as e:  # arrays or objects nested thousands deep exhaust the decoder's stack
        raise rows.fail("json", "not valid JSON: nested too deeply") from e
    if not isinstance(data, Mapping):
        raise rows.fail("top level", f"expected an object keyed '0', '1', ..., got {type(data).__name__}")
    keyed, numbers = [], {}
    for key in data:
        try:
            keyed.append((int(key), key))
        except ValueError:
            rows.reject(key, RowProblem("bad key", "the key is not an integer"))
            continue
        numbers.setdefault(int(key), []).append(key)
    # A question given twice (the same key, or keys of the same number such as '7' and '07') has no one answer to
    # score: each copy is a bad entry, not silently the last one read.
    twice = getattr(data, "repeated", {})
    same_number = {k: keys for keys in numbers.values() if len(keys) > 1 for k in keys}
    for _, key in sorted(keyed):
        for _ in range(twice.get(key, 0)):  # each copy is a question the file holds
            problem = f"the key is given {twice[key]} times: which copy is meant is unknown"
            rows.reject(key, RowProblem("repeated question", problem))
        if key in same_number and key not in twice:
            rows.reject(key, RowProblem("repeated question", f"keys {same_number[key]} give the same question number"))
    keyed = [(n, key) for n, key in keyed if key not in twice and key not in same_number]
    files = FileCheck()
    out = []
    for _, key in sorted(keyed):
        try:
            entry = parse_mcq_entry(key, data[key], num_choices, num_verbs, num_nouns, require_answer)
            if video_root is not None:
                for i, row in enumerate(entry.choices):
                    for path in chunk_paths(video_root, row):
                        files.require(path, prefix=f"choice {i}: ")
        except RowProblem as problem:
            rows.reject(key, problem)
            continue
        out.append(entry)
    return out


class EgoMCQDataset(torch.utils.data.Dataset):
    """EgoMCQ entries -> dict(text=str, videos=float (C,F,3,S,S), answer=int, type=int (1 inter, 2 intra),
    key=str (the JSON key), load_failed=int (choices that fell back to the black clip)).

    Strict/lax and `clip_reader` as in EgoClipDataset (the reader gets sample='uniform' and rng=None).
    Text length is dynamic in the official evaluation (padding=True, no max_length).
    """

    MAX_TEXT_LENGTH = None

    def __init__(
        self,
        json_path: str | os.PathLike,
        video_root: str | os.PathLike,
        num_frames: int,
        size: int,
        num_verbs: int = NUM_VERBS,
        num_nouns: int = NUM_NOUNS,
        strict: bool = True,
        backend: str = "auto",
        num_choices: int = 5,
        clip_reader: ClipReader | None = None,
        check_files: bool = True,
    ):
        from egovlp_deploy.decoding import ClipLoader

        if num_frames < 1 or size < 1 or num_choices < 2:
            raise ValueError(
                f"need num_frames, size >= 1 and num_choices >= 2, got {num_frames}, {size}, {num_choices}"
            )
        self.json_path, self.video_root = str(json_path), str(video_root)
        self.num_frames, self.size, self.num_choices, self.strict = num_frames, size, num_choices, strict
        rows = RowFilter(json_path, strict)
        self.entries = read_egomcq(
            json_path, video_root if check_files else None, num_choices, num_verbs, num_nouns, rows
        )
        if not self.entries:
            raise rows.none_usable("all entries", "entry")
        self.skipped_rows, self.skip_counts = rows.skipped_rows, rows.counts
        self._loader = ClipLoader(strict=strict, backend=backend)
        self.failures = self._loader.failures
        self.first_errors = self._loader.first_errors  # failure reason -> its first message
        if clip_reader is None:
            from egovlp_deploy.decoding import read_egoclip_clip as clip_reader  # ClipLoader passes backend=
        self._read = clip_reader

    @property
    def clip_loads(self) -> int:
        """How many clips this process has asked its loader for, decoded or not (the count `failures` is out of)."""
        return self._loader.loads

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from egovlp_deploy.decoding import VideoReadError

        entry = self.entries[index]
        videos = torch.zeros(self.num_choices, self.num_frames, 3, self.size, self.size)
        failed = 0
        for i, row in enumerate(entry.choices):
            try:
                frames = self._loader.load(
                    self._read,
                    self.video_root,
                    row.video_uid,
                    row.start_sec,
                    row.end_sec,
                    self.num_frames,
                    "uniform",
                    rng=None,
                )
            except VideoReadError as e:
                raise DataError(self.json_path, f"key {entry.key!r}", f"choice {i}, video {row.video_uid}: {e}") from e
            videos[i], missed = clip_tensor(frames, self.num_frames, self.size)
            failed += missed
        return {
            "text": entry.text,
            "videos": videos,
            "answer": entry.answer,
            "type": entry.type,
            "key": entry.key,
            "load_failed": failed,
        }
