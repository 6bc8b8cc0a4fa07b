"""A built-in synthetic egocentric dataset in the EgoClip / EgoMCQ formats, small enough to train the tiny model on CPU.

The world (words in `egovlp_deploy.vocabulary`): a scene (kitchen, table, desk, ...) is a flat, low-saturation textured
background with 2-3 objects (cup, bowl, box, bottle, plate, pan, book, jar) in saturated, distinct colours. A
skin-coloured hand, its arm entering from the bottom edge as in head-mounted footage, acts on one object per clip:

    pick up / put down   the object and the hand travel up / down (20 px of a 64 px frame)
    push / pull          the object and the hand recede / approach: the object shrinks to 60 % / grows back
    rotate               the object spins a full turn (either way; the flip augmentation mirrors the direction anyway)
    open / close         a lid rises off / onto a box or jar; a book's covers spread / fold

Every motion is vertical, a scale change or a spin, so the train transform's horizontal flip (official train transform)
never turns a verb into another. Each motion runs monotonically over the whole clip, so any 4 frames sampled one per
quarter (`sample_frames_start_end`) show its direction. The pairs pick up/put down, push/pull and open/close are
rendered as exact time reversals of each other and come back to back on the same object, so an intra-video EgoMCQ
question whose choices hold both can only be answered from temporal order, as in the real benchmark.

Output layout (read unchanged by `EgoClipDataset` / `EgoMCQDataset`, `EpicMIRDataset`, `CharadesEgoDataset`):

    OUT/videos/{video_uid}/0.mp4   one scene-video per uid (< 600 s: chunk 0 of the EgoClip chunked layout)
    OUT/egoclip.csv                training clips, TAB-separated, the official columns
    OUT/egoclip_eval.csv           the held-out videos' clips, same format (for retrieval on the held-out split)
    OUT/egomcq.json                EgoMCQ questions built from held-out videos only, official format
    OUT/meta.json                  class lists (tag ids index them), sizes, seed, generator version
    OUT/epic/, OUT/charades/       EK-100 MIR and Charades-Ego files of the same clips, official formats, test split
                                   = the held-out videos (`synth_downstream`)

Determinism: every video draws from its own PCG64 stream seeded by (seed, split, index), so the same seed gives
byte-identical CSV/JSON and identical frames, and changing --train-videos leaves the held-out videos unchanged.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import vocabulary as vocab
from ..path_text import some_names
from .egoclip import EGOCLIP_COLUMNS
from .synth_downstream import CHARADES_DIR, EPIC_DIR, write_downstream

GENERATOR = "egovlp-deploy synth"
GENERATOR_VERSION = "1.1"
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)
SPLITS = {"train": 0, "eval": 1}  # split id in each video's seed

# 240 training videos: with far fewer, the tiny model memorises the training clips and stalls on held-out videos
# (TRAINING_LOG.md).
DEFAULTS = dict(train_videos=240, eval_videos=12, clips_per_video=10, fps=30, size=64, clip_seconds=2.0)

# --- appearance (all geometry is in "world units": pixels of a 64x64 frame, scaled to --size) -----------------------
WORLD = 64.0
SUPERSAMPLE = 2  # render at 2x and average: smooth edges and sub-pixel motion, so frames change every step
COLOUR_RGB = {  # saturated and far apart; none near the skin tone or the dull backgrounds
    "red": (220, 35, 35),
    "green": (40, 180, 50),
    "blue": (35, 75, 235),
    "yellow": (245, 220, 40),
    "white": (245, 245, 245),
    "orange": (250, 135, 20),
    "purple": (150, 45, 205),
    "cyan": (40, 215, 225),
}
SKIN, ARM = (236, 188, 160), (214, 160, 128)
INTERIOR = (30, 26, 26)  # inside of an opened box or jar
DARK = 0.6  # handles, caps, spines: the object's colour darkened, so colour lookup still finds the whole object
BACKGROUNDS = {  # scene -> base RGB (dull, mid-dark: saturated objects stand out at 32 px)
    "kitchen": (104, 106, 112),
    "table": (110, 78, 50),
    "desk": (62, 70, 86),
    "counter": (82, 88, 72),
    "shelf": (60, 50, 42),
    "workbench": (92, 98, 106),
}
OBJECT_SCALE = 1.15  # shapes below are drawn 1.15x: objects span 14-25 px of the 64 px frame (7-12 px at 32)
ARM_HALF_WIDTH, HAND_RADII = 3.2, (5.0, 3.6)

# --- motion -----------------------------------------------------------------------------------------------------
LIFT = 20.0  # world units of travel for pick up / put down
FAR_SCALE = 0.6  # push ends (pull starts) at this scale: the area changes 2.8x
LID_RISE = 12.0  # world units the lid of a box or jar rises when fully open (3/4 of it = 5 px at 32 px)
HOME_Y = (38.0, 42.0)  # object centres rest here: lifted by LIFT the tallest object stays inside the frame
SLOT_SPACING = {2: 24.0, 3: 19.0}  # object centres this far apart, centred: neighbours barely touch
EPISODES = (("pick up", "put down"), ("push", "pull"), ("open", "close"), ("rotate",))
SOURCE = "narration_pass_1"


# --- the plan of a video: pure data, drawn from the seed -------------------------------------------------------
@dataclass(frozen=True)
class SceneObject:
    colour: str
    noun: str
    x: float  # home centre, world units
    y: float


@dataclass(frozen=True)
class Action:
    obj: int  # index into VideoPlan.objects
    verb: str
    start: int  # first frame of the segment
    frames: int  # segment length; the motion spans all of it
    spin: int  # +1/-1, direction of a rotation


@dataclass(frozen=True)
class VideoPlan:
    uid: str
    scene: str
    texture_seed: int
    objects: tuple[SceneObject, ...]
    actions: tuple[Action, ...]
    fps: int
    size: int

    @property
    def num_frames(self) -> int:
        last = self.actions[-1]
        return last.start + last.frames


def plan_video(uid: str, rng: np.random.Generator, clips: int, fps: int, size: int, clip_seconds: float) -> VideoPlan:
    """Draw a scene (background, 2-3 objects of distinct colours and nouns) and `clips` actions on its objects.

    Actions come as episodes: a verb pair on one object back to back (pick up then put down, ...) or one rotation,
    drawn without replacement while possible, so a video rarely repeats a narration.
    """
    scene = str(rng.choice(vocab.SCENES))
    n = int(rng.integers(2, 4))
    colours = [str(c) for c in rng.choice(vocab.COLOURS, n, replace=False)]
    nouns = [str(c) for c in rng.choice(vocab.NOUNS, n, replace=False)]
    spacing = SLOT_SPACING[n]
    objects = tuple(
        SceneObject(
            colours[k],
            nouns[k],
            WORLD / 2 + (k - (n - 1) / 2) * spacing + float(rng.uniform(-2, 2)),
            float(rng.uniform(*HOME_Y)),
        )
        for k in range(n)
    )

    def fresh_pool() -> list[tuple[int, tuple[str, ...]]]:
        pool = [(k, ep) for k, o in enumerate(objects) for ep in EPISODES if ep[0] in vocab.verbs_for(o.noun)]
        return [pool[i] for i in rng.permutation(len(pool))]

    actions: list[Action] = []
    pool, frame = fresh_pool(), 0
    while len(actions) < clips:
        remaining = clips - len(actions)
        fit = next((i for i, (_, ep) in enumerate(pool) if len(ep) <= remaining), None)
        if fit is None:  # exhausted (or only pairs left for the last slot): allow repeats
            pool = fresh_pool()
            continue
        k, episode = pool.pop(fit)
        # one duration per episode, so a pair's two clips are exact time reversals of each other
        length = max(8, round(clip_seconds * fps * float(rng.uniform(0.85, 1.15))))
        spin = 1 if rng.random() < 0.5 else -1
        for verb in episode:
            actions.append(Action(k, verb, frame, length, spin))
            frame += length
    return VideoPlan(uid, scene, int(rng.integers(2**31)), objects, tuple(actions), fps, size)


# --- rendering ----------------------------------------------------------------------------------------------------
def _pose(verb: str, p: float, spin: int) -> tuple[float, float, float, float]:
    """(dy, scale, angle, openness) of the acted object at progress p in [0, 1] of its clip."""
    dy, scale, angle, opened = 0.0, 1.0, 0.0, 0.0
    if verb == "pick up":
        dy = -LIFT * p
    elif verb == "put down":
        dy = -LIFT * (1 - p)
    elif verb == "push":
        scale = 1 - (1 - FAR_SCALE) * p
    elif verb == "pull":
        scale = FAR_SCALE + (1 - FAR_SCALE) * p
    elif verb == "rotate":
        angle = spin * 2 * math.pi * p
    elif verb == "open":
        opened = p
    elif verb == "close":
        opened = 1 - p
    return dy, scale, angle, opened


def _rect(u, v, u0, u1, v0, v1):
    return (u >= u0) & (u <= u1) & (v >= v0) & (v <= v1)


def _ellipse(u, v, cu, cv, ru, rv):
    return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 <= 1.0


# bottom edge of each shape (v axis points down; the hand grasps there)
BOTTOM = {"cup": 7.0, "bowl": 6.0, "box": 8.0, "bottle": 10.0, "plate": 4.0, "pan": 7.5, "book": 8.0, "jar": 9.5}


def _parts(noun: str, u, v, opened: float) -> list[tuple[np.ndarray, str]]:
    """Masks of a shape in local coordinates (u right, v down, world units at scale 1), in paint order.

    Each part is painted 'body' (the colour), 'dark' (the colour x DARK) or 'interior' (near black).
    """
    if noun == "cup":  # a mug: body, ring handle, dark opening on top
        ring = _ellipse(u, v, 7.5, 0, 4.5, 4.5) & ~_ellipse(u, v, 7.5, 0, 2.3, 2.6) & (u > 5)
        return [(_rect(u, v, -6, 6, -7, 7) | ring, "body"), (_ellipse(u, v, 0, -7, 6, 1.6), "dark")]
    if noun == "bowl":  # lower half of a wide ellipse, dark rim
        return [(_ellipse(u, v, 0, -3, 10, 9) & (v >= -3), "body"), (_ellipse(u, v, 0, -3, 10, 2), "dark")]
    if noun == "box":  # body, a lid that rises by LID_RISE, the dark inside appears as it opens
        lid = -LID_RISE * opened
        parts = [(_rect(u, v, -8, 8, -5, 8), "body")]
        if opened > 0:
            parts.append((_rect(u, v, -7, 7, -5, -5 + 3.5 * opened), "interior"))
        return parts + [
            (_rect(u, v, -9, 9, -9 + lid, -5 + lid), "body"),
            (_rect(u, v, -9, 9, -6 + lid, -5 + lid), "dark"),
        ]
    if noun == "bottle":  # tall: body, rounded shoulder, neck, dark cap
        body = _rect(u, v, -4.5, 4.5, -3, 10) | _ellipse(u, v, 0, -3, 4.5, 2.5) | _rect(u, v, -2.2, 2.2, -9, -3)
        return [(body, "body"), (_rect(u, v, -2.6, 2.6, -11, -8.5), "dark")]
    if noun == "plate":  # flat and wide, a dark well
        return [(_ellipse(u, v, 0, 0, 11, 4), "body"), (_ellipse(u, v, 0, -0.5, 6.5, 1.8), "dark")]
    if noun == "pan":  # disc with a dark inside and a long dark handle
        return [
            (_ellipse(u, v, -3, 0, 7.5, 7.5), "body"),
            (_ellipse(u, v, -3, 0, 4.5, 4.5), "dark"),
            (_rect(u, v, 4.5, 13, -1.5, 1.5), "dark"),
        ]
    if noun == "book":  # covers spread from half width 6 to 12; the spine slides from the edge to the middle
        half = 6 + 6 * opened
        spine = -half + half * opened
        return [(_rect(u, v, -half, half, -8, 8), "body"), (_rect(u, v, spine - 0.8, spine + 0.8, -8, 8), "dark")]
    if noun == "jar":  # round body, a cap that rises by LID_RISE, the dark mouth appears as it opens
        cap = -LID_RISE * opened
        parts = [(_ellipse(u, v, 0, 1.5, 7, 8), "body")]
        if opened > 0:
            parts.append((_ellipse(u, v, 0, -5.5, 5, 0.5 + 1.5 * opened), "interior"))
        return parts + [
            (_rect(u, v, -5.5, 5.5, -9.5 + cap, -5.5 + cap), "body"),
            (_rect(u, v, -5.5, 5.5, -6.5 + cap, -5.5 + cap), "dark"),
        ]
    raise ValueError(f"no shape for noun {noun!r}")


def _grasp(noun: str, verb: str, opened: float) -> tuple[float, float]:
    """Where the hand holds the object, local coordinates (before rotation)."""
    if verb in ("open", "close"):
        if noun == "book":
            return 6 + 6 * opened + 1.5, 0.0  # the moving cover's edge
        return (11.0 if noun == "box" else 8.5), -7.5 - LID_RISE * opened  # beside the rising lid
    return 0.0, BOTTOM[noun] + 1.0


class _Canvas:
    """A supersampled RGB canvas in world units; `paint_*` fill shapes, `frame()` averages down to uint8."""

    def __init__(self, size: int):
        self.size = size
        n = size * SUPERSAMPLE
        coords = (np.arange(n, dtype=np.float32) + 0.5) * (WORLD / n)
        self.ys, self.xs = coords[:, None], coords[None, :]
        self.px = n / WORLD  # supersampled pixels per world unit
        self.rgb = np.zeros((n, n, 3), np.float32)

    def window(self, cx: float, cy: float, radius: float):
        """Slices of the canvas covering a square around (cx, cy): painting touches only that window."""
        n = self.rgb.shape[0]
        r0, r1 = max(0, int((cy - radius) * self.px)), min(n, int(math.ceil((cy + radius) * self.px)))
        c0, c1 = max(0, int((cx - radius) * self.px)), min(n, int(math.ceil((cx + radius) * self.px)))
        return slice(r0, r1), slice(c0, c1)

    def paint_object(self, obj: SceneObject, dy: float, scale: float, angle: float, opened: float) -> None:
        cx, cy, scale = obj.x, obj.y + dy, scale * OBJECT_SCALE
        rows, cols = self.window(cx, cy, 22 * scale + 1)
        if rows.start >= rows.stop or cols.start >= cols.stop:
            return
        dx, dyy = self.xs[:, cols] - cx, self.ys[rows, :] - cy
        cos, sin = math.cos(angle), math.sin(angle)
        u = (cos * dx + sin * dyy) / scale  # inverse rotation then inverse scale: world -> local
        v = (-sin * dx + cos * dyy) / scale
        base = np.asarray(COLOUR_RGB[obj.colour], np.float32)
        fill = {"body": base, "dark": base * DARK, "interior": np.asarray(INTERIOR, np.float32)}
        view = self.rgb[rows, cols]
        for mask, kind in _parts(obj.noun, u, v, opened):
            view[mask] = fill[kind]

    def paint_arm(self, hx: float, hy: float, scale: float) -> None:
        half = ARM_HALF_WIDTH * max(scale, 0.7)
        rows, cols = self.window(hx, WORLD, half + WORLD)  # from the hand down to the bottom edge
        mask = (np.abs(self.xs[:, cols] - hx) <= half) & (self.ys[rows, :] >= hy)
        self.rgb[rows, cols][mask] = ARM

    def paint_hand(self, hx: float, hy: float, scale: float) -> None:
        scale *= OBJECT_SCALE
        ru, rv = HAND_RADII[0] * scale, HAND_RADII[1] * scale
        rows, cols = self.window(hx, hy, ru + 1)
        mask = _ellipse(self.xs[:, cols], self.ys[rows, :], hx, hy, ru, rv)
        self.rgb[rows, cols][mask] = SKIN

    def frame(self) -> np.ndarray:
        s, rgb = SUPERSAMPLE, self.rgb
        total = sum(rgb[i::s, j::s] for i in range(s) for j in range(s))  # box filter; cheaper than .mean(axes)
        return np.rint(total * (1.0 / (s * s))).clip(0, 255).astype(np.uint8)


def _background(plan: VideoPlan) -> np.ndarray:
    """The scene's backdrop (supersampled): a dull base colour with a faint, scene-specific texture."""
    canvas = _Canvas(plan.size)
    ys, xs = np.broadcast_arrays(canvas.ys, canvas.xs)
    rng = np.random.default_rng(plan.texture_seed)
    base = np.asarray(BACKGROUNDS[plan.scene], np.float32)
    if plan.scene == "kitchen":  # tiles with grout
        shade = np.where(((xs // 8) + (ys // 8)) % 2 == 0, 6.0, -6.0)
        shade = np.where((xs % 8 < 0.6) | (ys % 8 < 0.6), 25.0, shade)
    elif plan.scene == "table":  # wood grain
        shade = 8 * np.sin(ys * 0.9 + 2 * np.sin(xs * 0.15 + rng.uniform(0, 6)))
    elif plan.scene == "desk":  # a soft light falloff
        shade = 14 * (1 - ys / WORLD) - 7
    elif plan.scene == "counter":  # speckled stone
        shade = rng.normal(0, 7, xs.shape)
    elif plan.scene == "shelf":  # shelf boards
        shade = np.where(ys % 21 < 1.5, 30.0, 0.0)
    else:  # workbench: diagonal stripes
        shade = np.where(((xs + ys) // 6) % 2 == 0, 5.0, -5.0)
    return np.clip(base + shade[..., None], 0, 255).astype(np.float32)


def render_frames(plan: VideoPlan):
    """Yield the video's frames, uint8 (size, size, 3) RGB, in order."""
    canvas = _Canvas(plan.size)
    backdrop = _background(plan)
    for action in plan.actions:
        # the other objects rest at home; paint them once per clip
        canvas.rgb[:] = backdrop
        for k, obj in enumerate(plan.objects):
            if k != action.obj:
                canvas.paint_object(obj, 0.0, 1.0, 0.0, 0.0)
        still = canvas.rgb.copy()
        obj = plan.objects[action.obj]
        for i in range(action.frames):
            dy, scale, angle, opened = _pose(action.verb, i / (action.frames - 1), action.spin)
            gu, gv = _grasp(obj.noun, action.verb, opened)
            hx, hy = obj.x + gu * scale * OBJECT_SCALE, obj.y + dy + gv * scale * OBJECT_SCALE
            canvas.rgb[:] = still
            canvas.paint_arm(hx, hy, scale)
            canvas.paint_object(obj, dy, scale, angle, opened)
            canvas.paint_hand(hx, hy, scale)
            yield canvas.frame()


def _codec() -> str:
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def encode_video(frames, path: Path, fps: int, size: int, codec: str) -> int:
    """Write frames to an mp4; returns the frame count. All keyframes, so random seeks decode one frame each."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        if codec == "libx264":
            # crf 16: flat colours survive 4:2:0 at 64 px; 1 thread and no B-frames keep the output deterministic;
            # every frame a keyframe, so a random 4-frame read decodes 4 frames instead of up to 4 GOPs (those
            # decodes would dominate the trainer's data loading)
            stream.options = {
                "crf": "16",
                "preset": "veryfast",
                "x264-params": "keyint=1:min-keyint=1:scenecut=0:bframes=0:threads=1",
            }
        else:
            stream.gop_size = 1
            stream.options = {"qscale": "2"}
            stream.codec_context.thread_count = 1
        count = 0
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
            count += 1
        for packet in stream.encode():
            container.mux(packet)
    return count


def _render_one(job: tuple[VideoPlan, str, str]) -> int:
    plan, path, codec = job
    written = encode_video(render_frames(plan), Path(path), plan.fps, plan.size, codec)
    if written != plan.num_frames:
        raise RuntimeError(f"{path}: wrote {written} frames, planned {plan.num_frames}")
    return written


# --- annotations ------------------------------------------------------------------------------------------------
def _sec(frame: float, fps: int) -> float:
    return round(frame / fps, 4)


def clip_rows(plan: VideoPlan) -> list[dict]:
    """One EgoClip row per action. The clip sits inside its segment with a small margin, so the frames any reader
    takes (int(sec * fps)) never come from a neighbouring action."""
    margin = max(1, round(0.05 * plan.fps))
    dur = _sec(plan.num_frames, plan.fps)
    rows = []
    for i, a in enumerate(plan.actions):
        obj = plan.objects[a.obj]
        start, end = _sec(a.start + margin, plan.fps), _sec(a.start + a.frames - 1 - margin, plan.fps)
        rows.append(
            {
                "video_uid": plan.uid,
                "video_dur": dur,
                "narration_source": SOURCE,
                "narration_ind": i,
                "narration_time": round((start + end) / 2, 4),
                "clip_start": start,
                "clip_end": end,
                "clip_text": vocab.narration(a.verb, obj.colour, obj.noun),
                "tag_verb": str([list(vocab.VERBS).index(a.verb)]),
                "tag_noun": str([vocab.noun_class(obj.colour, obj.noun)]),
            }
        )
    return rows


def _row_object(row: dict) -> str:
    return row["clip_text"].rsplit(" the ", 1)[1]  # "colour noun"


def _row_verb(row: dict) -> str:
    return list(vocab.VERBS)[int(row["tag_verb"][1:-1])]


def build_mcq(
    videos: list[list[dict]], rng: np.random.Generator, shown: list[set[str]] | None = None
) -> dict[str, dict]:
    """EgoMCQ questions over held-out videos (a list of each video's rows; `shown`: each video's visible objects as
    'colour noun', default the acted ones).

    Inter (types 1), one per clip: the answer and 4 clips from 4 other videos that show neither the answer's
    object nor its narration. Intra (types 2), one per clip with a verb pair: the answer, the same object with the
    opposite verb from the same video (the time-reversed clip), and 3 more clips of that video, acting on other
    objects where possible. No two choices share a narration, so exactly one is right.
    """
    if len(videos) < 2:
        raise ValueError("EgoMCQ needs at least 2 held-out videos (inter-video distractors come from other videos)")
    questions: dict[str, dict] = {}

    def add(kind: int, answer: dict, distractors: list[dict]) -> None:
        at = int(rng.integers(5))
        choices = [distractors[i] for i in rng.permutation(4)]
        choices.insert(at, answer)
        questions[str(len(questions))] = {
            "types": kind,
            "query": dict(answer),
            "choices": {str(i): dict(c) for i, c in enumerate(choices)},
            "answer": at,
        }

    objects = shown if shown is not None else [{_row_object(r) for r in rows} for rows in videos]
    for v, rows in enumerate(videos):
        for answer in rows:
            obj, verb = _row_object(answer), _row_verb(answer)
            # inter: prefer videos that do not show the object at all, then any other video
            others = [int(o) for o in rng.permutation(len(videos)) if o != v]
            others.sort(key=lambda o: obj in objects[o])  # stable: keeps the random order within each group
            picked: list[dict] = []
            for o in others * 4:  # wraps round when there are fewer than 4 other videos
                pool = [r for r in videos[o] if _row_object(r) != obj and r not in picked]
                if pool and len(picked) < 4:
                    picked.append(pool[int(rng.integers(len(pool)))])
            if len(picked) == 4:
                add(1, answer, picked)
            # intra: the time-reversed clip plus three more of the same video
            if verb not in vocab.OPPOSITE:
                continue
            twins = [r for r in rows if _row_object(r) == obj and _row_verb(r) == vocab.OPPOSITE[verb]]
            if not twins:
                continue
            texts = {answer["clip_text"], twins[0]["clip_text"]}
            rest = []
            for r in [rows[int(i)] for i in rng.permutation(len(rows))]:
                if r["clip_text"] not in texts:
                    rest.append(r)
                    texts.add(r["clip_text"])
            rest.sort(key=lambda r: _row_object(r) == obj)  # other objects first
            if len(rest) >= 3:
                add(2, answer, [twins[0]] + rest[:3])
    return questions


# --- writing ---------------------------------------------------------------------------------------------------
def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=EGOCLIP_COLUMNS, delimiter="\t", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _check_sizes(sizes: dict) -> None:
    for key in ("train_videos", "clips_per_video", "fps"):
        if sizes[key] < 1:
            raise ValueError(f"{key} must be at least 1, got {sizes[key]}")
    if sizes["eval_videos"] < 2:
        raise ValueError(f"eval_videos must be at least 2 (EgoMCQ inter distractors), got {sizes['eval_videos']}")
    if sizes["size"] < 16 or sizes["size"] % 2:
        raise ValueError(f"size must be even and at least 16 (yuv420p), got {sizes['size']}")
    if not 0.2 <= sizes["clip_seconds"] <= 60:
        raise ValueError(f"clip_seconds must be in [0.2, 60], got {sizes['clip_seconds']}")
    longest = sizes["clips_per_video"] * sizes["clip_seconds"] * 1.15 + 1
    if longest >= 600:  # every video must fit chunk 0 of the EgoClip chunked layout
        raise ValueError(f"a video of {sizes['clips_per_video']} clips x {sizes['clip_seconds']} s reaches 600 s")


def generate(out_dir, seed: int = 0, *, force: bool = False, workers: int = 1, **sizes) -> dict:
    """Render the dataset into `out_dir` atomically (a sibling temp dir, renamed at the end); returns a summary.

    sizes: train_videos, eval_videos, clips_per_video, fps, size, clip_seconds (defaults in DEFAULTS).
    Refuses a non-empty `out_dir` unless `force`.
    """
    unknown = set(sizes) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown size argument(s): {', '.join(sorted(unknown))}")
    sizes = {**DEFAULTS, **sizes}
    _check_sizes(sizes)
    out = Path(out_dir)
    if out.is_symlink() and not out.exists():
        raise ValueError(f"{out}: a symlink to {os.readlink(out)}, which does not exist (or is a symlink loop)")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ValueError(f"{out}: not empty (pass --force to replace it)")
        check_replaceable(out)
    t0 = time.perf_counter()
    plans = {
        split: [
            plan_video(
                f"synth_{split}_{i:04d}",
                np.random.default_rng([seed, sid, i]),
                sizes["clips_per_video"],
                sizes["fps"],
                sizes["size"],
                sizes["clip_seconds"],
            )
            for i in range(sizes[f"{split}_videos"])
        ]
        for split, sid in SPLITS.items()
    }
    rows = {split: [clip_rows(p) for p in ps] for split, ps in plans.items()}
    mcq = build_mcq(
        rows["eval"],
        np.random.default_rng([seed, 2]),
        [{f"{o.colour} {o.noun}" for o in p.objects} for p in plans["eval"]],
    )
    codec = _codec()
    counts = {
        "train_videos": len(plans["train"]),
        "eval_videos": len(plans["eval"]),
        "train_clips": sum(map(len, rows["train"])),
        "eval_clips": sum(map(len, rows["eval"])),
        "mcq_questions": len(mcq),
        "mcq_inter": sum(q["types"] == 1 for q in mcq.values()),
        "mcq_intra": sum(q["types"] == 2 for q in mcq.values()),
    }
    meta = {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "seed": seed,
        "verbs": list(vocab.VERBS),
        "nouns": vocab.noun_classes(),
        "colours": list(vocab.COLOURS),
        "scenes": list(vocab.SCENES),
        "num_verbs": len(vocab.VERBS),
        "num_nouns": len(vocab.noun_classes()),
        "opposite_verbs": vocab.OPPOSITE,
        "fps": sizes["fps"],
        "size": sizes["size"],
        "clip_seconds": sizes["clip_seconds"],
        "codec": codec,
        "counts": counts,
        "splits": {split: [p.uid for p in ps] for split, ps in plans.items()},
    }

    # OUT a symlink to a folder: the dataset goes into that folder (the rename below would replace the link itself)
    target = out.resolve() if out.is_symlink() else out
    target.parent.mkdir(parents=True, exist_ok=True)
    from ..checkpoint import make_temp_dir

    try:
        tmp = make_temp_dir(target.parent, f".{target.name}.tmp-")
    except OSError as exc:  # the dataset is built beside OUT: say so, not the temp folder's name
        raise ValueError(
            f"{out}: cannot build the dataset in its parent folder {target.parent} ({exc.strerror or exc})"
        ) from None
    try:
        jobs = []
        for p in plans["train"] + plans["eval"]:
            (tmp / "videos" / p.uid).mkdir(parents=True)
            jobs.append((p, str(tmp / "videos" / p.uid / "0.mp4"), codec))
        if workers > 1:
            # fork: the children need only numpy and av, and re-importing the package (torch) costs seconds each
            context = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
            with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                frames = sum(pool.map(_render_one, jobs, chunksize=4))
        else:
            frames = sum(map(_render_one, jobs))
        (tmp / "egoclip.csv").write_text(_csv_text([r for rs in rows["train"] for r in rs]))
        (tmp / "egoclip_eval.csv").write_text(_csv_text([r for rs in rows["eval"] for r in rs]))
        (tmp / "egomcq.json").write_text(json.dumps(mcq, indent=1) + "\n")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        downstream = write_downstream(
            tmp,
            rows,
            {p.uid: (p.scene, [o.noun for o in p.objects]) for ps in plans.values() for p in ps},
            sizes["fps"],
        )
        if target.is_dir() and any(target.iterdir()):
            # again: something may have been put there while the videos were rendered (another synth, a training
            # run); without --force nothing is replaced, with it only a dataset of ours that holds nothing else
            if not force:
                raise ValueError(
                    f"{out}: not empty any more (another process wrote into it while this dataset was rendered); "
                    "nothing was replaced. Pass --force to replace it, or give another folder"
                )
            check_replaceable(target)
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "out": str(out),
        "seed": seed,
        **counts,
        **downstream,
        "frames": frames,
        "codec": codec,
        "seconds": round(time.perf_counter() - t0, 2),
    }


# What `generate` writes at the top of its folder: --force replaces a folder only if it holds nothing else.
WRITTEN = frozenset({"videos", "egoclip.csv", "egoclip_eval.csv", "egomcq.json", "meta.json", EPIC_DIR, CHARADES_DIR})


def check_replaceable(out: Path) -> None:
    """Raise unless `out` is a dataset this generator wrote and holds nothing else (what --force may delete)."""
    meta = out / "meta.json"
    from ..jsonfile import read_json

    try:
        ours = read_json(meta, expect=dict).get("generator") == GENERATOR  # a FIFO or huge file is refused unread
    except ValueError:
        ours = False
    if not ours:
        raise ValueError(
            f"{out}: not a dataset written by egovlp-deploy synth (no meta.json of ours); --force replaces only "
            "such a folder, and nothing was deleted. Give a new or empty folder"
        )
    others = sorted(p.name for p in out.iterdir() if p.name not in WRITTEN)
    if others:
        raise ValueError(
            f"{out}: holds files synth did not write ({some_names(others)}); --force would delete them, so nothing "
            "was deleted. Move them out or give another folder"
        )


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished temp dir onto `out`; an old `out` is moved aside first and deleted only afterwards."""
    if out.is_dir() and any(out.iterdir()):
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / "d")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)  # an empty directory is replaced atomically on POSIX


# --- command line ------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `synth` options, for a stand-alone parser or an `egovlp-deploy synth` subparser."""
    parser.add_argument("out", metavar="OUT", help="output directory (created; must be empty unless --force)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--force", action="store_true", help="replace a dataset synth wrote earlier (no other folder)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    sizes = parser.add_argument_group("sizes (defaults fit a 10-minute CPU training run of the tiny model)")
    sizes.add_argument(
        "--train-videos",
        type=int,
        default=DEFAULTS["train_videos"],
        metavar="N",
        help=f"training scene-videos (default: {DEFAULTS['train_videos']})",
    )
    sizes.add_argument(
        "--eval-videos",
        type=int,
        default=DEFAULTS["eval_videos"],
        metavar="N",
        help=f"held-out scene-videos for EgoMCQ, at least 2 (default: {DEFAULTS['eval_videos']})",
    )
    sizes.add_argument(
        "--clips-per-video",
        type=int,
        default=DEFAULTS["clips_per_video"],
        metavar="N",
        help=f"narrated clips per video; intra questions need at least 5 (default: {DEFAULTS['clips_per_video']})",
    )
    sizes.add_argument(
        "--clip-seconds",
        type=float,
        default=DEFAULTS["clip_seconds"],
        metavar="S",
        help=f"mean clip length, each drawn within +-15%% (default: {DEFAULTS['clip_seconds']})",
    )
    render = parser.add_argument_group("rendering")
    render.add_argument(
        "--fps",
        type=int,
        default=DEFAULTS["fps"],
        help=f"frames per second (default: {DEFAULTS['fps']}, the rate EgoClip assumes)",
    )
    render.add_argument(
        "--size",
        type=int,
        default=DEFAULTS["size"],
        metavar="PX",
        help=f"frame width and height, even (default: {DEFAULTS['size']}; the tiny recipe resizes to 48)",
    )
    render.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        metavar="N",
        help=f"processes rendering videos in parallel; the output is byte-identical for any N "
        f"(default: {DEFAULT_WORKERS}, this machine's cores up to 4)",
    )
    return parser


DESCRIPTION = (
    "Render the built-in synthetic egocentric dataset: scene-videos of a hand picking up, putting down, "
    "pushing, pulling, rotating, opening and closing coloured objects, with EgoClip-format narrations "
    "(egoclip.csv, TAB-separated) and EgoMCQ questions (egomcq.json) built only from held-out videos, "
    "plus EK-100 MIR (epic/) and Charades-Ego (charades/) files of the same clips in the official formats, "
    "their test split from the held-out videos. Same seed, same bytes."
)
EPILOG = (
    "Layout: OUT/videos/<video_uid>/0.mp4, OUT/egoclip.csv (train), OUT/egoclip_eval.csv (held-out clips), "
    "OUT/egomcq.json (held-out), OUT/meta.json (class lists, sizes, seed, version), "
    "OUT/epic/EPIC_100_retrieval_{train,test}[_sentence].csv + relevancy/*.npy + videos/<participant>/<id>.MP4, "
    "OUT/charades/CharadesEgo_v1_{train,test}_only1st.csv + metadata_train.csv + Charades_v1_classes.txt + "
    "videos/<id>.mp4 (videos are symlinks into OUT/videos)."
)


def build_parser(prog: str = "egovlp-deploy synth") -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG))


def run(args: argparse.Namespace) -> int:
    """Generate from parsed `add_arguments` options; prints a summary; 0 on success, 2 on a named error."""
    try:
        summary = generate(
            args.out,
            args.seed,
            force=args.force,
            workers=max(1, args.workers),
            train_videos=args.train_videos,
            eval_videos=args.eval_videos,
            clips_per_video=args.clips_per_video,
            clip_seconds=args.clip_seconds,
            fps=args.fps,
            size=args.size,
        )
    except (ValueError, OSError) as exc:
        print(f"egovlp-deploy synth: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"wrote {summary['out']}: {summary['train_videos']} train videos ({summary['train_clips']} clips), "
            f"{summary['eval_videos']} held-out videos ({summary['eval_clips']} clips), EgoMCQ "
            f"{summary['mcq_inter']} inter + {summary['mcq_intra']} intra, {summary['frames']} frames "
            f"({summary['codec']}) in {summary['seconds']} s; EK-100 MIR test {summary['epic_test_rows']} clips / "
            f"{summary['epic_test_sentences']} sentences, Charades-Ego {summary['charades_classes']} classes"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
