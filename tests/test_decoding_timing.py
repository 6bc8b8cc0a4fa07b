"""Presentation time, rotation and partly decodable files, on files written like real cameras write them: variable
frame rate with B-frames, a portrait phone clip stored landscape with a rotation matrix, a truncated mp4 whose
index lists frames its data no longer holds.

Every frame reveals its own number (red and green levels), so a test can tell exactly which frame a decoder
returned and, from the list of times the file was written with, when that frame is shown."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest

from egovlp_deploy.decoding import (
    Timeline,
    VideoReadError,
    decodable_frames,
    read_clip,
    read_frames,
    stream_frames,
    video_timeline,
)
from egovlp_deploy.runtime.clip_pipeline import ClipPipeline, in_background, plan_windows, segment_windows

BACKENDS = ["decord", "pyav"]
SIDE = 64


def _frame(number: int, height: int = SIDE, width: int = SIDE) -> np.ndarray:
    img = np.zeros((height, width, 3), np.uint8)
    img[..., 0], img[..., 1] = 4 + 8 * (number % 32), 4 + 8 * (number // 32)
    return img


def numbers(frames) -> list[int]:
    """The frame numbers `_frame` drew, read back from decoded frames (codec error is a few levels)."""
    frames = np.asarray(frames, dtype=np.int64)
    red = np.round((frames[:, :8, :8, 0].mean(axis=(1, 2)) - 4) / 8).astype(int)
    green = np.round((frames[:, :8, :8, 1].mean(axis=(1, 2)) - 4) / 8).astype(int)
    return (green * 32 + red).tolist()


def write_timed_video(path, times: list[float], bframes: int = 3, faststart: bool = False, textured: bool = False):
    """An H.264 mp4 whose frame i is shown at times[i] s (millisecond timestamps), with B-frames. `textured`: noise
    below the number patch, so that frame data, not the container's index, makes up most of the file."""
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width = stream.height = SIDE
        stream.pix_fmt = "yuv420p"
        stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        stream.options = {"bf": str(bframes), "g": "12", "crf": "12"}  # numbers must survive the codec
        for i, t in enumerate(times):
            img = _frame(i)
            if textured:
                img[SIDE // 4 :] = np.random.default_rng(i).integers(0, 256, img[SIDE // 4 :].shape, np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = round(t * 1000), Fraction(1, 1000)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


# 25 fps for 2 s, then one frame every 120 ms (a phone that drops its rate in the dark), then 25 fps again.
VFR_TIMES = [i / 25 for i in range(50)] + [2.0 + 0.12 * i for i in range(1, 17)] + [3.92 + i / 25 for i in range(1, 26)]


@pytest.fixture(scope="module")
def vfr_video(tmp_path_factory):
    return write_timed_video(tmp_path_factory.mktemp("vfr") / "vfr.mp4", VFR_TIMES)


@pytest.mark.parametrize("backend", BACKENDS)
def test_variable_rate_timeline_is_the_presentation_times(vfr_video, backend):
    timeline = video_timeline(vfr_video, backend)
    assert not timeline.constant_rate
    assert timeline.num_frames == len(VFR_TIMES)
    np.testing.assert_allclose(timeline.times, VFR_TIMES, atol=1e-4)
    assert numbers(read_frames(vfr_video, list(range(len(VFR_TIMES))), backend)) == list(range(len(VFR_TIMES)))


def test_decoders_agree_frame_for_frame_on_variable_rate(vfr_video):
    picks = [0, 7, 49, 50, 51, 57, 65, 66, 80, len(VFR_TIMES) - 1]
    decoded = {b: read_frames(vfr_video, picks, b).numpy() for b in BACKENDS}
    assert numbers(decoded["decord"]) == numbers(decoded["pyav"]) == picks
    assert np.array_equal(decoded["decord"], decoded["pyav"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window_sec,stride_sec", [(1.0, 0.5), (2.0, 1.0), (0.5, 0.5)])
def test_every_sampled_frame_lies_inside_its_window(vfr_video, backend, window_sec, stride_sec):
    windows, _ = plan_windows(vfr_video, 4, window_sec, stride_sec, backend=backend)
    decoded = ClipPipeline(4, 32, backend).decode(vfr_video, windows)  # (B, F, H, W, 3)
    for window, frames in zip(windows, decoded):
        for number in numbers(frames):
            assert window.start_sec - 1e-4 <= VFR_TIMES[number] < window.end_sec + 1e-4, (window, number)
    # The windows tile the video up to its end (the last frame lasts as long as the interval before it).
    assert windows[-1].end_sec == pytest.approx(VFR_TIMES[-1] + 0.04, abs=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_segments_and_clips_read_the_frames_shown_then(vfr_video, backend):
    # [2.3, 3.5) s falls in the 120 ms stretch: frames 52..61 are shown there (2.36 ... 3.44 s).
    windows, _ = segment_windows(vfr_video, [(2.3, 3.5, "x")], 4, backend)
    assert all(52 <= i <= 61 for i in windows[0].indices)
    frames, indices = read_clip(vfr_video, 2.3, 3.5, 4, "uniform", backend=backend)
    assert all(2.3 <= VFR_TIMES[n] < 3.5 for n in numbers(frames))
    assert numbers(frames) == indices


def test_constant_rate_files_keep_the_official_frame_numbers(tmp_path):
    path = write_timed_video(tmp_path / "cfr.mp4", [i / 25 for i in range(60)])
    for backend in BACKENDS:
        timeline = video_timeline(path, backend)
        assert timeline.constant_rate and timeline.fps == 25
        assert timeline.official_range(1.03, 2.01) == (int(1.03 * 25), int(2.01 * 25))  # official int(t * fps)
    windows, _ = plan_windows(path, 4, 1.0, 0.5, backend="pyav")
    assert [(w.start_sec, w.end_sec) for w in windows] == [(0.0, 1.0), (0.5, 1.5), (1.0, 2.0), (1.5, 2.4)]


def test_timeline_hand_computed():
    timeline = Timeline([10.0, 10.04, 10.08, 10.5, 11.0], fps=5.0)  # relative: 0, .04, .08, .5, 1.0
    assert not timeline.constant_rate
    assert timeline.frames_in(0.0, 0.5) == (0, 3)
    assert timeline.frames_in(0.05, 1.0) == (2, 4)
    assert timeline.frames_in(0.5, 9.0) == (3, 5)
    assert timeline.duration == pytest.approx(1.5)
    assert timeline.truncated(3).num_frames == 3
    grid = Timeline([0.0, 0.1, 0.2001, 0.3], fps=10.0)  # jitter under a quarter frame: the official grid
    assert grid.constant_rate and grid.official_range(0.15, 0.35) == (1, 3)
    broken = Timeline([0.0, 0.0, 0.0], fps=10.0)  # timestamps that do not increase say nothing
    assert broken.constant_rate and broken.duration == pytest.approx(0.3)


# -- rotation ----------------------------------------------------------------------------------------------------
def write_rotated(path, upright: np.ndarray, angle: int, count: int = 3):
    """Store `upright` (H, W, 3) the way a phone does: turned, with a display matrix that turns it back by `angle`
    degrees counter-clockwise (-90: the usual portrait phone clip, 'rotate=90' in older tools)."""
    stored = np.ascontiguousarray(np.rot90(upright, -(angle // 90)))
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.height, stream.width = stored.shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.set_display_rotation(angle)
        for _ in range(count):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")))
        out.mux(stream.encode())
    return path


def _portrait(height=320, width=192) -> np.ndarray:
    img = np.full((height, width, 3), 40, np.uint8)
    img[: height // 4, : width // 3] = (250, 40, 40)  # red block top-left
    img[-height // 4 :, -width // 3 :] = (40, 40, 250)  # blue block bottom-right
    return img


@pytest.mark.parametrize("angle", [-90, 90, 180])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rotation_metadata_gives_upright_frames(tmp_path, backend, angle):
    upright = _portrait()
    path = write_rotated(tmp_path / f"phone{angle}.mp4", upright, angle)
    frames = read_frames(path, [0, 2], backend).numpy()
    assert frames.shape == (2, *upright.shape)
    assert np.abs(frames.astype(int) - upright).mean() < 3, "the frame is not upright"


@pytest.mark.parametrize("height,width", [(64, 48)])
def test_decord_malformed_rotated_frames_are_an_error_naming_pyav(tmp_path, height, width):
    # decord's rotation breaks on some small sizes (a size-check failure, or (64, 48, 4) buffers); PyAV is right.
    upright = _portrait(height, width)
    path = write_rotated(tmp_path / "small.mp4", upright, -90)
    with pytest.raises(VideoReadError, match="pyav") as err:
        read_frames(path, [0], "decord")
    assert str(path) in str(err.value)
    frames = read_frames(path, [0], "pyav").numpy()
    assert frames.shape == (1, height, width, 3) and np.abs(frames.astype(int) - upright).mean() < 3


# -- partly decodable files --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def truncated_video(tmp_path_factory):
    """A 'faststart' mp4 (index first) cut at 60% of its bytes: its index lists every frame, its data holds some."""
    root = tmp_path_factory.mktemp("cut")
    whole = write_timed_video(root / "whole.mp4", [i / 10 for i in range(60)], faststart=True, textured=True)
    data = whole.read_bytes()
    cut = root / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    return cut


def test_a_truncated_file_is_used_as_far_as_it_decodes(truncated_video):
    with pytest.raises(VideoReadError):  # decord refuses the whole file when opening it
        video_timeline(truncated_video, "decord")
    usable = decodable_frames(truncated_video, "pyav")
    assert 10 < usable < 60
    assert numbers(read_frames(truncated_video, list(range(usable)), "pyav")) == list(range(usable))
    notes = []
    for backend in ("pyav", "auto"):  # 'auto' falls back to PyAV for a file decord cannot open
        windows, _ = plan_windows(truncated_video, 4, 1.0, 1.0, backend=backend, notes=notes)
        assert max(max(w.indices) for w in windows) < usable
        assert windows[-1].end_sec == pytest.approx(usable / 10)
        ClipPipeline(4, 32, backend).decode(truncated_video, windows)  # every planned window decodes
    assert len(notes) == 2 and f"{usable} of" in notes[0] and "truncated" in notes[0]


def test_an_intact_file_gives_no_note(vfr_video):
    notes = []
    plan_windows(vfr_video, 4, 1.0, 1.0, backend="pyav", notes=notes)
    assert notes == []
    assert decodable_frames(vfr_video, "decord") == len(VFR_TIMES)


# -- one pass over a whole video ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("picks", [[0, 3, 3, 17, 49, 50, 90], [40, 41, 66], [len(VFR_TIMES) - 1]])
def test_streamed_frames_equal_random_access_reads(vfr_video, backend, picks):
    streamed = list(stream_frames(vfr_video, picks, backend, threads=2))
    assert [i for i, _ in streamed] == sorted(set(picks))
    expected = read_frames(vfr_video, sorted(set(picks)), backend).numpy()
    assert np.array_equal(np.stack([f for _, f in streamed]), expected)


def test_streamed_frames_are_upright_and_stop_where_the_file_does(tmp_path, truncated_video):
    upright = _portrait()
    path = write_rotated(tmp_path / "phone.mp4", upright, -90)
    ((_, frame),) = stream_frames(path, [1], "pyav")
    assert np.abs(frame.astype(int) - upright).mean() < 3
    with pytest.raises(VideoReadError, match="ends|decode"):
        list(stream_frames(truncated_video, [0, video_timeline(truncated_video, "pyav").num_frames - 1], "pyav"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_equal_clips_batch_by_batch(vfr_video, backend):
    windows, _ = plan_windows(vfr_video, 4, 1.0, 0.5, backend=backend)
    pipe = ClipPipeline(4, 32, backend)
    got = list(pipe.batches(vfr_video, windows, batch=3))
    assert [first for first, _ in got] == list(range(0, len(windows), 3))
    for first, clips in got:
        np.testing.assert_array_equal(clips, pipe.clips(vfr_video, windows[first : first + 3]))
    # annotated segments in any order are read batch by batch, with the same numbers
    segments, _ = segment_windows(vfr_video, [(3.0, 4.0, None), (0.5, 1.5, None), (2.0, 2.6, None)], 4, backend)
    ((first, clips),) = pipe.batches(vfr_video, segments, batch=4)
    np.testing.assert_array_equal(clips, pipe.clips(vfr_video, segments))


def test_background_producer_hands_over_errors_and_stops_with_its_consumer():
    produced = []

    def items():
        for i in range(1000):
            produced.append(i)
            if i == 5:
                raise VideoReadError("x.mp4", "corrupt", "broken at 5")
            yield i

    with pytest.raises(VideoReadError, match="broken at 5"):
        list(in_background(items()))
    produced.clear()

    def endless():
        for i in range(10**9):
            produced.append(i)
            yield i

    consumer = in_background(endless(), depth=2)
    assert [next(consumer) for _ in range(3)] == [0, 1, 2]
    consumer.close()  # the consumer stops: the producer stops within a few items
    import time

    time.sleep(0.5)
    count = len(produced)
    time.sleep(0.3)
    assert len(produced) == count <= 8


def test_the_stream_leaves_unreferenced_b_frames_undecoded(vfr_video, monkeypatch):
    from egovlp_deploy import decoding as video_module

    with av.open(str(vfr_video)) as container:
        stream = container.streams.video[0]
        nal_length = video_module._avc_nal_length_size(stream)
        flags = [video_module._unreferenced_h264(bytes(p), nal_length) for p in container.demux(stream) if p.size]
    assert nal_length == 4 and 0 < sum(flags) < len(flags)  # x264's non-reference B-frames
    decoded = []
    real_decode = av.video.stream.VideoStream.decode
    monkeypatch.setattr(
        av.video.stream.VideoStream,
        "decode",
        lambda self, packet=None: decoded.append(packet) or real_decode(self, packet),
    )
    picks = [0, 30, 60, len(VFR_TIMES) - 1]
    streamed = [f for _, f in stream_frames(vfr_video, picks, "pyav")]
    sent = len([p for p in decoded if p is not None])
    assert sent < len(flags) and sent <= len(flags) - sum(flags) + len(picks)  # wanted B-frames are decoded
    assert np.array_equal(np.stack(streamed), read_frames(vfr_video, picks, "pyav").numpy())


# -- the datasets' clip readers on variable-rate files ------------------------------------------------------------
def test_egoclip_chunks_by_presentation_time(tmp_path):
    """Two 3 s chunk files of one variable-rate video; a clip across the boundary gets only frames shown in it."""
    from egovlp_deploy.decoding import read_egoclip_clip

    first = [i / 25 for i in range(25)] + [1.0 + 0.1 * i for i in range(1, 20)]  # 0 .. 2.9 s
    second = [0.2 * i for i in range(15)]  # 3.0 .. 5.8 s
    (tmp_path / "uid").mkdir()
    write_timed_video(tmp_path / "uid" / "0.mp4", first)
    write_timed_video(tmp_path / "uid" / "1.mp4", second)
    shown = [(0, n, t) for n, t in enumerate(first)] + [(1, n, 3.0 + t) for n, t in enumerate(second)]
    for backend in BACKENDS:
        frames = read_egoclip_clip(tmp_path, "uid", 2.05, 4.1, 6, "uniform", backend=backend, chunk_sec=3)
        got = numbers(frames)
        # each frame is one of those shown in [2.05, 4.1): numbers 35..43 of the first file, 0..5 of the second
        candidates = {n for _, n, t in shown if 2.05 <= t < 4.1}
        assert len(got) == 6 and set(got) <= candidates, (backend, got)
        assert any(n < 10 for n in got) and any(n >= 10 for n in got)  # frames from both chunk files


def test_egoclip_clips_of_a_variable_rate_chunk_reuse_its_open_reader(tmp_path, monkeypatch):
    """Reading a clip of a variable-rate chunk by time opened the chunk a second time while its first use held the
    cached reader (a reader serves one use at a time), so every clip paid a fresh open and first seek."""
    from egovlp_deploy import decoding

    (tmp_path / "uid").mkdir()
    write_timed_video(tmp_path / "uid" / "0.mp4", [i / 25 for i in range(25)] + [1.0 + 0.1 * i for i in range(1, 20)])
    opened, new_reader = [], decoding._open_video._new_reader
    monkeypatch.setattr(
        decoding._open_video, "_new_reader", lambda self, key: opened.append(key) or new_reader(self, key)
    )
    for backend in BACKENDS:
        decoding._open_video._evict_all()
        opened.clear()
        for start in (0.1, 0.6, 1.2, 1.9):
            decoding.read_egoclip_clip(tmp_path, "uid", start, start + 0.8, 4, "uniform", backend=backend, chunk_sec=3)
        assert len(opened) == 1, (backend, opened)


def test_epic_clip_by_presentation_time(vfr_video):
    from egovlp_deploy.data.epic import read_epic_clip

    for backend in BACKENDS:
        frames = read_epic_clip(vfr_video, 2.3, 3.5, 4, jitter=False, backend=backend)
        assert all(2.3 <= VFR_TIMES[n] < 3.5 for n in numbers(frames)), backend


# -- the PyAV packet table, remembered per file identity ------------------------------------------------------------
def _count_demuxes(monkeypatch):
    from egovlp_deploy.decoding import _PyAVVideo

    calls = []
    real = _PyAVVideo._demux_packet_times
    monkeypatch.setattr(_PyAVVideo, "_demux_packet_times", lambda self: calls.append(self.path) or real(self))
    monkeypatch.setattr(_PyAVVideo, "_packet_tables", type(_PyAVVideo._packet_tables)())
    return calls


def test_a_reopened_file_reuses_its_packet_table(vfr_video, monkeypatch):
    """The second open of an unchanged file demuxes nothing and gives the same timeline (exactly the Fraction
    arithmetic of the container's time base) and the same frames."""
    from egovlp_deploy.decoding import _PyAVVideo

    calls = _count_demuxes(monkeypatch)
    first = _PyAVVideo(vfr_video)
    frames = first.get([0, 50, 57, 90])
    first.close()
    second = _PyAVVideo(vfr_video)
    assert calls == [vfr_video]
    np.testing.assert_array_equal(second.timeline.times, first.timeline.times)
    start, tb = second._pts[0], second._time_base
    assert second.timeline.times.tolist() == [float((p - start) * tb) for p in second._pts]
    assert np.array_equal(second.get([0, 50, 57, 90]), frames) and numbers(frames) == [0, 50, 57, 90]
    second.close()


def test_a_changed_file_is_demuxed_again(tmp_path, monkeypatch):
    from egovlp_deploy.decoding import _PyAVVideo

    calls = _count_demuxes(monkeypatch)
    path = write_timed_video(tmp_path / "clip.mp4", [i / 25 for i in range(20)])
    assert _PyAVVideo(path).num_frames == 20
    write_timed_video(path, [i / 25 for i in range(30)])  # re-recorded: other size and mtime
    assert _PyAVVideo(path).num_frames == 30
    assert len(calls) == 2


def test_packet_tables_stay_within_their_budget(tmp_path, monkeypatch):
    from egovlp_deploy.decoding import _PyAVVideo

    calls = _count_demuxes(monkeypatch)
    monkeypatch.setattr(_PyAVVideo, "PACKET_TABLE_BUDGET", 45)  # room for two 20-frame tables
    paths = [write_timed_video(tmp_path / f"{i}.mp4", [k / 25 for k in range(20)]) for i in range(3)]
    for p in paths:
        _PyAVVideo(p).close()
    assert [key[0] for key in _PyAVVideo._packet_tables] == [str(paths[1]), str(paths[2])]
    _PyAVVideo(paths[2]).close()  # still held
    _PyAVVideo(paths[0]).close()  # evicted: demuxed again
    assert calls == [*paths, paths[0]]
