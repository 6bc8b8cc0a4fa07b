"""Large frames: the runtime's clip pipeline preprocesses each frame as it is decoded, so it holds about one full-size
frame at a time (an 8192 x 8192 frame is 200 MB; a window of them, held before the resize, several GB), and gives
the same numbers as decoding whole clips and preprocessing them together. Both decoders, the streamed (sliding
windows) and the random-access (annotated segments) paths."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from egovlp_deploy import decoding as V
from egovlp_deploy import preprocess
from egovlp_deploy.runtime.clip_pipeline import ClipPipeline, plan_windows, segment_windows
from egovlp_deploy.transforms import eval_transform

av = pytest.importorskip("av")
if "libx264" not in av.codecs_available:
    pytest.skip("this PyAV build has no libx264 encoder to write the test videos", allow_module_level=True)
BACKENDS = ["pyav"] + (["decord"] if V._decord_available() else [])
H, W, FPS = 360, 480, 10  # large next to the model input below, small enough to write quickly
FRAME_BYTES = H * W * 3
F, SIZE = 4, 32


@pytest.fixture(scope="module")
def large_video(tmp_path_factory):
    path = tmp_path_factory.mktemp("large") / "large.mp4"
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (H, W, 3), np.uint8)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"preset": "ultrafast", "g": "8", "bf": "2"}
        for k in range(40):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.roll(base, 5 * k, axis=1), format="rgb24")))
        out.mux(stream.encode())
    return path


def _sliding(path, backend):
    return plan_windows(path, F, window_frames=12, stride_frames=6, backend=backend)[0]


def _segments(path, backend):
    return segment_windows(path, [(2.0, 3.5, None), (0.0, 1.6, None), (1.0, 3.9, None)], F, backend)[0]


def _whole_clips(pipe, path, windows):
    """The reference: every window's full-size frames decoded, then preprocessed together."""
    return pipe.preprocess(pipe.decode(path, windows))


@pytest.mark.parametrize("native", [True, False] if preprocess.available() else [False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_frame_by_frame_gives_the_same_numbers(large_video, backend, native):
    pipe = ClipPipeline(F, SIZE, backend)
    pipe.native = native
    sliding, segments = _sliding(large_video, backend), _segments(large_video, backend)
    streamed = np.concatenate([c for _, c in pipe.batches(large_video, sliding, 3)])
    assert streamed.dtype == np.float32
    np.testing.assert_array_equal(streamed, _whole_clips(pipe, large_video, sliding))
    np.testing.assert_array_equal(pipe.clips(large_video, segments), _whole_clips(pipe, large_video, segments))
    shapes = [c.shape for _, c in pipe.batches(large_video, segments, 2)]
    assert shapes == [(2, F, 3, SIZE, SIZE), (1, F, 3, SIZE, SIZE)]


@pytest.mark.parametrize("variant", ["egoclip", "epic"])
@pytest.mark.parametrize("shape", [(37, 61), (480, 270), (224, 224), (5, 900)])
def test_the_transform_treats_every_frame_alone(shape, variant):
    frames = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, *shape, 3), np.uint8))
    together = eval_transform(frames, SIZE, variant)
    alone = torch.cat([eval_transform(frames[i : i + 1], SIZE, variant) for i in range(len(frames))])
    assert torch.equal(together, alone)
    if preprocess.available():
        together = preprocess.preprocess_clip(frames, SIZE, variant)
        alone = torch.cat([preprocess.preprocess_clip(frames[i : i + 1], SIZE, variant) for i in range(len(frames))])
        assert torch.equal(together, alone)


def _traced_peak(call) -> int:
    """Peak bytes of Python and numpy allocations (decoded frames are numpy arrays) while call() runs."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        call()
        return tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_about_one_full_size_frame_is_held(large_video, backend, monkeypatch):
    # Groups of one frame, decord calls of one frame: the bounds for frames larger than their byte limits (64 MB).
    monkeypatch.setattr(ClipPipeline, "GROUP_BYTES", FRAME_BYTES)
    monkeypatch.setattr(V._DecordVideo, "CALL_BYTES", FRAME_BYTES)
    pipe = ClipPipeline(F, SIZE, backend)
    sliding, segments = _sliding(large_video, backend), _segments(large_video, backend)
    # Decoding whole windows holds all F x batch frames at once.
    assert _traced_peak(lambda: pipe.decode(large_video, segments)) > 10 * FRAME_BYTES
    for run in (
        lambda: list(pipe.batches(large_video, sliding, 4)),
        lambda: pipe.clips(large_video, segments),
        lambda: list(pipe.batches(large_video, segments, 3)),
    ):
        assert _traced_peak(run) < 3 * FRAME_BYTES


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_frames_are_preprocessed_in_groups(large_video, backend, monkeypatch):
    monkeypatch.setattr(ClipPipeline, "GROUP_BYTES", 5 * FRAME_BYTES)
    pipe = ClipPipeline(F, SIZE, backend)
    sizes = []
    group = pipe._preprocess_group
    monkeypatch.setattr(pipe, "_preprocess_group", lambda frames: sizes.append(len(frames)) or group(frames))
    segments = _segments(large_video, backend)
    distinct = len({i for w in segments for i in w.indices})
    np.testing.assert_array_equal(pipe.clips(large_video, segments), _whole_clips(pipe, large_video, segments))
    assert sizes == [5] * (distinct // 5) + ([distinct % 5] if distinct % 5 else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_iter_frames_gives_read_frames_frames_one_at_a_time(large_video, backend, monkeypatch):
    monkeypatch.setattr(V._DecordVideo, "CALL_BYTES", FRAME_BYTES)
    indices = [7, 3, 3, 20, 0, 39]
    full = V.read_frames(large_video, sorted(set(indices)), backend).numpy()
    pairs = list(V.iter_frames(large_video, indices, backend))
    assert [i for i, _ in pairs] == [0, 3, 7, 20, 39]
    np.testing.assert_array_equal(np.stack([f for _, f in pairs]), full)

    def means():
        return [f.mean() for _, f in V.iter_frames(large_video, indices, backend)]

    assert _traced_peak(means) < 3 * FRAME_BYTES
    with pytest.raises(V.VideoReadError, match="outside the video"):
        list(V.iter_frames(large_video, [3, 40], backend))


@pytest.mark.skipif("decord" not in BACKENDS, reason="decord is not installed")
def test_decord_reads_frames_in_calls_of_bounded_size(large_video, monkeypatch):
    calls = []
    get = V._DecordVideo.get
    monkeypatch.setattr(V._DecordVideo, "get", lambda self, indices: calls.append(list(indices)) or get(self, indices))
    monkeypatch.setattr(V._DecordVideo, "CALL_BYTES", 2 * FRAME_BYTES)
    frames = [i for i, _ in V.stream_frames(large_video, range(0, 40, 3), "decord")]
    assert frames == list(range(0, 40, 3))
    assert calls[0] == [0] and max(map(len, calls)) == 2  # the first call's frame sizes the others
    monkeypatch.setattr(V._DecordVideo, "CALL_BYTES", 64 * FRAME_BYTES)
    calls.clear()
    assert len(list(V.stream_frames(large_video, range(40), "decord"))) == 40
    assert [len(c) for c in calls] == [1, 32, 7]  # small frames: CALL_FRAMES per call


def test_a_run_backs_off_twice_as_far_each_time_then_starts_from_the_start():
    tried = []

    def seek_to(start):  # every seek lands 10 frames after where it was asked to
        tried.append(start)
        return "run", (start + 10, "frame")

    assert V._run_reaching(100, 4, seek_to, lambda: "from start") == ("run", (94, "frame"))
    assert tried == [100, 96, 92, 84]  # back 4, then 8, 16 frames
    tried.clear()
    assert V._run_reaching(3, 4, seek_to, lambda: "from start") == "from start"
    assert tried == [3, 0]
    tried.clear()
    assert V._run_reaching(50, 4, lambda start: tried.append(start), lambda: "from start") == "from start"
    assert tried == [50]  # seeking cannot help: straight to the start
    assert V._run_reaching(50, 0, lambda start: ("run", None) if start == 50 else ("run", (start, "f")), None) == (
        "run",
        (49, "f"),
    )  # a seek that finds nothing backs off at least one frame
