"""Test helper: tiny mp4 files whose frames reveal their index (frame i is a flat colour with red = STEP * i + 4; the
ramp wraps modulo 256, so only the first 32 frames are told apart by colour)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

FPS, SIDE, STEP = 10, 64, 8


def write_video(path: Path, num_frames: int, fps: int = FPS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width = stream.height = SIDE
        stream.pix_fmt = "yuv420p"
        for i in range(num_frames):
            img = np.zeros((SIDE, SIDE, 3), np.uint8)
            img[..., 0], img[..., 1] = (STEP * i + 4) % 256, 128
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode())
    return path
