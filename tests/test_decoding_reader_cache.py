"""The decoder's cache of open readers (`decoding._open_video`) is bounded by what its readers hold as well as by
their count: an open decord reader of a 4K file holds ~250 MB, so a worker reading many distinct 4K files held
gigabytes in readers. Least recently used readers are closed first, never one in use, and the frames read are the
same bits whatever the cache keeps open."""

from __future__ import annotations

import collections
import random
from collections import OrderedDict

import numpy as np
import pytest
import torch

from egovlp_deploy import decoding as V
from video_files import write_numbered

av = pytest.importorskip("av")
if "libx264" not in av.codecs_available:
    pytest.skip("this PyAV build has no libx264 encoder to write the test videos", allow_module_level=True)
BACKENDS = ["pyav"] + (["decord"] if V._decord_available() else [])
FRAME_BYTES = 32 * 64 * 3  # write_numbered's frames
PICKS = [3, 0, 7, 3]  # out of order, a repeat


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader_cache")
    paths = [write_numbered(root / f"v{i}.mp4", 12 + i) for i in range(6)]
    for chunk in (0, 1):  # a 2-s chunked EgoClip video at 10 fps
        write_numbered(root / "chunks" / "uid" / f"{chunk}.mp4", 20)
    return paths


@pytest.fixture
def cache(monkeypatch):
    """An empty reader cache of this process for the test, its readers closed afterwards."""
    monkeypatch.setattr(V._open_video, "_cache", OrderedDict())
    monkeypatch.setattr(V._open_video, "_in_use", collections.Counter())
    yield V._open_video
    V._open_video._evict_all()


def _reader_class(backend):
    return V._DecordVideo if backend == "decord" else V._PyAVVideo


def _closed(reader) -> bool:
    return getattr(reader, "_reader", None) is None and getattr(reader, "_container", None) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_readers_are_estimated_from_their_frame_size(files, cache, backend):
    with V._open_video(files[0], backend) as reader:
        assert reader.held_bytes == 0  # nothing decoded yet: nothing held
        reader.get([1])
        assert reader.held_bytes == _reader_class(backend).HELD_FRAMES * FRAME_BYTES


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_cache_keeps_the_most_recent_readers_within_its_byte_budget(files, cache, backend, monkeypatch):
    expected = [V.read_frames(path, PICKS, backend) for path in files]  # 6 readers: within 32 and 1 GiB
    assert len(cache._cache) == 6
    cache._evict_all()
    monkeypatch.setattr(cache, "HELD_BYTES", 3 * _reader_class(backend).HELD_FRAMES * FRAME_BYTES)
    opened = []
    for path, frames in zip(files, expected):
        assert torch.equal(V.read_frames(path, PICKS, backend), frames)
        opened += [r for r in cache._cache.values() if r not in opened]
    assert [r.path for r in cache._cache.values()] == files[3:]  # the three used last
    assert all(_closed(r) for r in opened[:3]) and not any(_closed(r) for r in opened[3:])
    assert torch.equal(V.read_frames(files[0], PICKS, backend), expected[0])  # reopened: the same bits
    assert [r.path for r in cache._cache.values()] == [*files[4:], files[0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_reader_in_use_is_never_closed_for_the_bound(files, cache, backend, monkeypatch):
    """A frame iterator keeps its file's reader while other files are read (before, a reader evicted meanwhile was
    closed under the iterator); with no room at all, the readers in use stay open and the others go."""
    expected = V.read_frames(files[0], list(range(10)), backend)
    cache._evict_all()
    monkeypatch.setattr(cache, "CAPACITY", 1)
    monkeypatch.setattr(cache, "HELD_BYTES", 0)
    frames = V.iter_frames(files[0], range(10), backend)
    got = [next(frames)[1]]
    for path in files[1:4]:
        V.read_frames(path, [2], backend)
        got.append(next(frames)[1])
    got += [frame for _, frame in frames]
    assert torch.equal(torch.from_numpy(np.stack(got)), expected)
    assert not cache._cache and not cache._in_use  # the iterator done, its reader goes too


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_clip_across_two_chunks_reads_the_same_bits_with_no_room_for_readers(files, cache, backend, monkeypatch):
    """read_egoclip_clip holds the first chunk's reader while it opens the second."""
    root = files[0].parent / "chunks"

    def clip(seed):
        rng = random.Random(seed)
        return V.read_egoclip_clip(root, "uid", 1.2, 2.9, 6, "rand", rng=rng, backend=backend, chunk_sec=2)

    expected = [clip(seed) for seed in range(3)]
    cache._evict_all()
    monkeypatch.setattr(cache, "HELD_BYTES", 0)
    for seed in range(3):
        assert torch.equal(clip(seed), expected[seed]), seed
    assert not cache._cache  # nothing in use is left open


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_reader_in_use_is_never_handed_to_a_second_use(files, cache, backend):
    """decord's reader crashes the process (or deadlocks) when two threads call it: a second `with` block on a file
    whose cached reader is in use gets a reader of its own, and reads the same frames."""
    with V._open_video(files[0], backend) as first:
        expected = first.get([1, 5])
        with V._open_video(files[0], backend) as second:
            assert second is not first
            assert np.array_equal(second.get([1, 5]), expected)
    assert _closed(first)  # its cache slot was taken: closed when its use ended, not left to the garbage collector
    with V._open_video(files[0], backend) as again:  # no use now: the cached reader serves
        assert again is second


SAME_FILE_FROM_THREADS = """
import sys
from concurrent.futures import ThreadPoolExecutor
import numpy as np
from egovlp_deploy import decoding as V
path, backend = sys.argv[1], sys.argv[2]
expected = V.read_frames(path, [0, 4, 9], backend).numpy()
def read(_):
    return np.array_equal(V.read_frames(path, [0, 4, 9], backend).numpy(), expected)
with ThreadPoolExecutor(4) as pool:
    print(all(pool.map(read, range(120))))
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_threads_reading_one_file_get_its_frames(files, backend):
    """Four threads reading one file (a service answering EgoMCQ questions on one video) in a process of its own:
    a shared decord reader ended it with a segfault or `terminate called without an active exception`."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", SAME_FILE_FROM_THREADS, str(files[0]), backend],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0 and done.stdout.strip() == "True", (done.returncode, done.stderr[-2000:])
