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


# -- files as users have them (tests/test_decoding_wild_files.py) ------------------------------------------------
# Frame k carries its number k in the top 8 pixel rows as 8 black/white 8-pixel blocks (bit b = block b), so a
# decoded frame says which frame it is; `numbered_image` draws it, the tests read it back.
def numbered_image(k: int, height: int = 32, width: int = 64, channels: int = 3) -> np.ndarray:
    img = np.zeros((height, width, channels), np.uint8)
    img[8:, :, 0] = (40 * k) % 256
    img[8:, :, 1] = 128
    for bit in range(8):
        img[:8, bit * 8 : (bit + 1) * 8, :3] = 255 if (k >> bit) & 1 else 0
    if channels == 4:
        img[..., 3] = 255
    return img


def write_numbered(
    path: Path,
    num_frames: int,
    fps: int = FPS,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    fmt: str | None = None,
    options: dict | None = None,
    container_options: dict | None = None,
    sample_aspect_ratio=None,
) -> Path:
    """`num_frames` numbered 64x32 frames at `fps` in any codec / pixel format / container PyAV writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    alpha = pix_fmt in ("rgba", "argb", "yuva420p")
    with av.open(str(path), "w", format=fmt, options=container_options or {}) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 32, pix_fmt
        stream.options = {"qp": "0"} if options is None and codec == "libx264" else (options or {})
        if sample_aspect_ratio is not None:
            stream.codec_context.sample_aspect_ratio = sample_aspect_ratio
        for k in range(num_frames):
            frame = av.VideoFrame.from_ndarray(
                numbered_image(k, channels=4 if alpha else 3), "rgba" if alpha else "rgb24"
            )
            frame.pts = k
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def write_duplicate_pts(path: Path, num_frames: int = 20, repeated: int = 10) -> Path:
    """Matroska, 10 fps, no B-frames, where frame `repeated` + 1 carries the same timestamp as frame `repeated`
    (the frames after it one interval earlier than their number): timestamps a broken muxer or a browser's
    MediaRecorder writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.options = {"qp": "0", "bf": "0"}
        packets = []
        for k in range(num_frames):
            frame = av.VideoFrame.from_ndarray(numbered_image(k), format="rgb24")
            frame.pts = k
            packets += stream.encode(frame)
        packets += stream.encode()
        step = packets[1].pts - packets[0].pts
        for packet in packets:
            if packet.pts > repeated * step:
                packet.pts -= step
                packet.dts -= step
            out.mux(packet)
    return path


def write_with_thumbnail_track(path: Path, num_frames: int = 20) -> Path:
    """Matroska with two video streams: first a small 5 fps grey track (a thumbnail / preview track), then the
    main 10 fps track of `num_frames` numbered 64x32 frames."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        thumb = out.add_stream("libx264", rate=5)
        thumb.width, thumb.height, thumb.pix_fmt = 32, 16, "yuv420p"
        main = out.add_stream("libx264", rate=FPS)
        main.width, main.height, main.pix_fmt = 64, 32, "yuv420p"
        main.options = {"qp": "0"}
        for k in range(num_frames):
            frame = av.VideoFrame.from_ndarray(numbered_image(k), format="rgb24")
            frame.pts = k
            out.mux(main.encode(frame))
            if k % 2 == 0:
                grey = av.VideoFrame.from_ndarray(np.full((16, 32, 3), 50, np.uint8), format="rgb24")
                grey.pts = k // 2
                out.mux(thumb.encode(grey))
        out.mux(main.encode())
        out.mux(thumb.encode())
    return path


def _silence(out, stream, frames: int = 10) -> None:
    for i in range(frames):
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, i * 1024
        out.mux(stream.encode(frame))
    out.mux(stream.encode())


def write_audio_with_cover(path: Path) -> Path:
    """An mp4 of AAC audio with cover art (an attached-picture JPEG stream): a podcast or a song, no video."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        audio = out.add_stream("aac", rate=16000)
        cover = out.add_stream("mjpeg", rate=1)
        cover.width, cover.height, cover.pix_fmt = 16, 16, "yuvj420p"
        cover.disposition = av.stream.Disposition.attached_pic
        picture = av.VideoFrame.from_ndarray(np.full((16, 16, 3), 200, np.uint8), format="rgb24")
        picture.pts = 0
        out.mux(cover.encode(picture))
        out.mux(cover.encode())
        _silence(out, audio)
    return path


def write_video_stream_without_frames(path: Path) -> Path:
    """Matroska with a declared H.264 video stream that has no packets, beside an audio stream."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = 64, 32, "yuv420p"
        _silence(out, out.add_stream("aac", rate=16000))
    return path


def write_blocks(path: Path, width: int, height: int, frames: int = 20, fps: int = 10) -> Path:
    """An mp4 of width x height noise-like blocks that move frame to frame (crops and resampling show in every
    pixel)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    base = np.random.default_rng(0).integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8)
    base = base.repeat(4, 0).repeat(4, 1)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.roll(base, 4 * i, axis=1), format="rgb24")))
        out.mux(stream.encode())
    return path
