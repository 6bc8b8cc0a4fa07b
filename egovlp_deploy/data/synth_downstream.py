"""EK-100 MIR and Charades-Ego stand-ins written from the synthetic world, in the official file formats.

`egovlp-deploy synth` calls `write_downstream` after rendering, so the zero-shot evaluation and fine-tuning paths
run end to end on files that `EpicMIRDataset` and `CharadesEgoDataset` read in strict mode. The train files come
from the training scene-videos, the test files from the held-out ones (the videos of egoclip_eval.csv and
egomcq.json), so no test clip is ever seen in training.

Layout (under the `synth` output directory; videos are relative symlinks into OUT/videos, a copy where the file
system has no symlinks):

    epic/EPIC_100_retrieval_{train,test}.csv            one row per clip, the official 15 columns
    epic/EPIC_100_retrieval_{train,test}_sentence.csv   the distinct narrations: narration_id, narration
    epic/relevancy/caption_relevancy_EPIC_100_retrieval_{train,test}.npy
                                                        float32 (CSV rows, sentences), the .npy form of the .pkl
    epic/videos/{participant_id}/{video_id}.MP4          the scene-video of each row
    charades/CharadesEgo_v1_{train,test}_only1st.csv     one row per scene-video, the official 11 columns
    charades/metadata_train.csv                          one row per action, TAB-separated: id, cls, t_start, t_end,
                                                        narration (the training file the official loader reads)
    charades/Charades_v1_classes.txt                     'c000 picks up the cup', one class per line
    charades/videos/{id}.mp4                             the scene-video of each row

EK-100 MIR: narrations are the EgoClip narration without its '#C C ' prefix ('picks up the red cup'); verb_class
and noun_class index meta.json's `verbs` and `nouns` (the EgoClip tag ids). The relevancy of clip i to sentence s
follows the EK-100 definition: 0.5 if their verb classes agree plus 0.5 times the intersection over union of their
noun-class sets; here each clip has one verb and one noun class, so the values are 0, 0.5 and 1, and exactly the
clips narrated by the sentence itself have relevancy 1.

Charades-Ego: a class is a verb acting on a bare noun ('opens the box'), the (noun, verb) pairs the world can show;
the colour is left out, as Charades classes name an object type. `actions` lists each clip's class and its clip
times; a scene-video's target is the set of its clips' classes.
"""

from __future__ import annotations

import csv
import io
import math
import os
import shutil
from pathlib import Path

import numpy as np

from .. import vocabulary as vocab

EPIC_DIR, CHARADES_DIR = "epic", "charades"
EPIC_COLUMNS = (
    "narration_id",
    "participant_id",
    "video_id",
    "narration_timestamp",
    "start_timestamp",
    "stop_timestamp",
    "start_frame",
    "stop_frame",
    "narration",
    "verb",
    "verb_class",
    "noun",
    "noun_class",
    "all_nouns",
    "all_noun_classes",
)
CHARADES_COLUMNS = (
    "id",
    "subject",
    "scene",
    "quality",
    "relevance",
    "verified",
    "script",
    "objects",
    "descriptions",
    "actions",
    "length",
)
EPIC_SPLITS = {"train": "train", "eval": "test"}  # synthetic split -> EK-100 / Charades-Ego split name
PARTICIPANT = {"train": "synth_train", "eval": "synth_eval"}  # participant_id: the video folder of each split
NARRATION_PREFIX = "#C C "


def charades_classes() -> list[tuple[str, str]]:
    """The Charades-Ego stand-in classes, (verb, noun) in class-id order: per noun, the verbs the world can show."""
    return [(verb, noun) for noun in vocab.NOUNS for verb in vocab.verbs_for(noun)]


def charades_class_name(verb: str, noun: str) -> str:
    return f"{vocab.VERBS[verb]} the {noun}"


def _hundredths(seconds: float, up: bool) -> int:
    """Seconds in whole 1/100 s, rounded up (a clip start) or down (a clip end): a written clip never reaches past
    the clip it stands for, into a neighbouring action."""
    hundredths = round(seconds * 100, 6)
    return math.ceil(hundredths) if up else math.floor(hundredths)


def charades_time(seconds: float, up: bool) -> str:
    """Seconds -> '12.34', the precision of the official `actions` field."""
    hundredths = _hundredths(seconds, up)
    return f"{hundredths // 100}.{hundredths % 100:02d}"


def epic_timestamp(seconds: float, up: bool) -> str:
    """Seconds -> 'HH:MM:SS.ff' (the official timestamp format), rounded as `_hundredths`."""
    minutes, rest = divmod(_hundredths(seconds, up), 6000)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:02d}:{minutes:02d}:{rest // 100:02d}.{rest % 100:02d}"


def _clip_labels(row: dict) -> tuple[str, str, int, str, int]:
    """An EgoClip row -> (narration, verb, verb class, noun class name, noun class)."""
    verb_class = int(row["tag_verb"][1:-1])
    noun_class = int(row["tag_noun"][1:-1])
    narration = row["clip_text"]
    if narration.startswith(NARRATION_PREFIX):
        narration = narration[len(NARRATION_PREFIX) :]
    return narration, list(vocab.VERBS)[verb_class], verb_class, vocab.noun_classes()[noun_class], noun_class


def epic_rows(videos: list[list[dict]], split: str, fps: int) -> list[dict]:
    """EK-100 MIR CSV rows (EPIC_COLUMNS) for the clips of `videos` (each video's EgoClip rows); start_frame and
    stop_frame are frame numbers at the videos' rate `fps`, as in the official files (our reader ignores them)."""
    out = []
    for clips in videos:
        for row in clips:
            uid = row["video_uid"]
            narration, verb, verb_class, noun, noun_class = _clip_labels(row)
            start = epic_timestamp(float(row["clip_start"]), up=True)
            stop = epic_timestamp(float(row["clip_end"]), up=False)
            out.append(
                {
                    "narration_id": f"{uid}_{row['narration_ind']}",
                    "participant_id": PARTICIPANT[split],
                    "video_id": uid,
                    "narration_timestamp": epic_timestamp(float(row["narration_time"]), up=False),
                    "start_timestamp": start,
                    "stop_timestamp": stop,
                    "start_frame": round(_seconds(start) * fps),
                    "stop_frame": round(_seconds(stop) * fps),
                    "narration": narration,
                    "verb": verb,
                    "verb_class": verb_class,
                    "noun": noun,
                    "noun_class": noun_class,
                    "all_nouns": str([noun]),
                    "all_noun_classes": str([noun_class]),
                }
            )
    return out


def epic_sentences(rows: list[dict]) -> list[dict]:
    """The distinct narrations in order of first appearance, each with the narration_id of its first row."""
    seen: dict[str, dict] = {}
    for row in rows:
        seen.setdefault(row["narration"], row)
    return [
        {
            "narration_id": r["narration_id"],
            "narration": r["narration"],
            "verb_class": r["verb_class"],
            "noun_class": r["noun_class"],
        }
        for r in seen.values()
    ]


def epic_relevancy(rows: list[dict], sentences: list[dict]) -> np.ndarray:
    """float32 (rows, sentences): 0.5 * same verb class + 0.5 * IoU of the noun-class sets (EK-100 definition).
    Every synthetic clip and sentence has one noun class, so the IoU is 1 for the same class and 0 otherwise."""
    verbs = np.array([r["verb_class"] for r in rows])[:, None]
    nouns = np.array([r["noun_class"] for r in rows])[:, None]
    sentence_verbs = np.array([s["verb_class"] for s in sentences])[None, :]
    sentence_nouns = np.array([s["noun_class"] for s in sentences])[None, :]
    return (0.5 * (verbs == sentence_verbs) + 0.5 * (nouns == sentence_nouns)).astype(np.float32)


def _csv_text(rows: list[dict], columns: tuple[str, ...]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _link(target: Path, link: Path) -> None:
    """A relative symlink link -> target (a copy where symlinks are not supported)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        link.symlink_to(os.path.relpath(target, link.parent))
    except OSError:
        shutil.copyfile(target, link)


def write_epic(out: Path, videos: dict[str, list[list[dict]]], fps: int) -> dict[str, int]:
    """The EK-100 MIR files of both splits under out/epic; `videos`: split -> each video's EgoClip rows."""
    root = out / EPIC_DIR
    (root / "relevancy").mkdir(parents=True)
    counts = {}
    for split, name in EPIC_SPLITS.items():
        rows = epic_rows(videos[split], split, fps)
        sentences = epic_sentences(rows)
        (root / f"EPIC_100_retrieval_{name}.csv").write_text(_csv_text(rows, EPIC_COLUMNS))
        (root / f"EPIC_100_retrieval_{name}_sentence.csv").write_text(
            _csv_text(sentences, ("narration_id", "narration"))
        )
        np.save(
            root / "relevancy" / f"caption_relevancy_EPIC_100_retrieval_{name}.npy", epic_relevancy(rows, sentences)
        )
        for clips in videos[split]:
            uid = clips[0]["video_uid"]
            _link(out / "videos" / uid / "0.mp4", root / "videos" / PARTICIPANT[split] / f"{uid}.MP4")
        counts[f"epic_{name}_rows"], counts[f"epic_{name}_sentences"] = len(rows), len(sentences)
    return counts


def _seconds(timestamp: str) -> float:
    hours, minutes, seconds = timestamp.split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def charades_rows(videos: list[list[dict]], scenes: dict[str, tuple[str, list[str]]]) -> list[dict]:
    """Charades-Ego CSV rows (CHARADES_COLUMNS), one per scene-video; `scenes`: uid -> (scene, visible nouns)."""
    class_id = {pair: k for k, pair in enumerate(charades_classes())}
    out = []
    for clips in videos:
        uid = clips[0]["video_uid"]
        actions, script = [], []
        for row in clips:
            narration, verb, _, noun_name, _ = _clip_labels(row)
            noun = noun_name.split(" ")[-1]
            start, end = float(row["clip_start"]), float(row["clip_end"])
            actions.append(f"c{class_id[(verb, noun)]:03d} {charades_time(start, True)} {charades_time(end, False)}")
            script.append(narration)
        scene, nouns = scenes[uid]
        text = ". ".join(script) + "."
        out.append(
            {
                "id": uid,
                "subject": "synth",
                "scene": scene,
                "quality": 7,
                "relevance": 7,
                "verified": "Yes",
                "script": text,
                "objects": ";".join(nouns),
                "descriptions": text,
                "actions": ";".join(actions),
                "length": f"{float(clips[0]['video_dur']):.2f}",
            }
        )
    return out


def charades_metadata_train(rows: list[dict]) -> str:
    """The per-action training file derived from the train CSV: TAB-separated, unquoted, one row per action, the
    class name as narration and the times as Python floats."""
    names = [charades_class_name(v, n) for v, n in charades_classes()]
    lines = ["id\tcls\tt_start\tt_end\tnarration"]
    for row in rows:
        for action in row["actions"].split(";"):
            cls, start, end = action.split(" ")
            k = int(cls[1:])
            lines.append(f"{row['id']}\t{k}\t{float(start)}\t{float(end)}\t{names[k]}")
    return "\n".join(lines) + "\n"


def write_charades(
    out: Path, videos: dict[str, list[list[dict]]], scenes: dict[str, tuple[str, list[str]]]
) -> dict[str, int]:
    """The Charades-Ego files of both splits under out/charades; `videos`: split -> each video's EgoClip rows."""
    root = out / CHARADES_DIR
    root.mkdir(parents=True)
    classes = charades_classes()
    (root / "Charades_v1_classes.txt").write_text(
        "".join(f"c{k:03d} {charades_class_name(v, n)}\n" for k, (v, n) in enumerate(classes))
    )
    counts = {"charades_classes": len(classes)}
    for split, name in EPIC_SPLITS.items():
        rows = charades_rows(videos[split], scenes)
        (root / f"CharadesEgo_v1_{name}_only1st.csv").write_text(_csv_text(rows, CHARADES_COLUMNS))
        if split == "train":
            (root / "metadata_train.csv").write_text(charades_metadata_train(rows))
        for row in rows:
            _link(out / "videos" / row["id"] / "0.mp4", root / "videos" / f"{row['id']}.mp4")
        counts[f"charades_{name}_videos"] = len(rows)
    return counts


def write_downstream(
    out: Path, videos: dict[str, list[list[dict]]], scenes: dict[str, tuple[str, list[str]]], fps: int
) -> dict[str, int]:
    """Write the EK-100 MIR and Charades-Ego files into `out`, whose videos/ already holds the scene-videos.

    videos: 'train' / 'eval' -> each scene-video's EgoClip rows; scenes: uid -> (scene name, visible nouns).
    Returns the row, sentence, video and class counts.
    """
    return {**write_epic(out, videos, fps), **write_charades(out, videos, scenes)}
