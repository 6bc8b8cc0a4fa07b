"""The runtime's Python API under a service's use: one Runtime and one MomentIndex shared by several threads, an
index extended by another run while a long-lived MomentIndex searches it, and token arrays given by the caller.

Threads must get what one thread gets, bit for bit: the tokenizer's settings, the lazily created role sessions and
the static buffers of captured CUDA graphs (stood in for on the CPU, as in test_graphs.py) are shared state."""

import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import egovlp_deploy.runtime.engines as engines_module
from egovlp_deploy.model.attention_plan import AttentionPlan, active_plan, using
from egovlp_deploy.runtime import EngineError, IndexFileError, IndexSettings, MomentIndex, Runtime, build_index
from egovlp_deploy.runtime.engines import TorchThreadsWarning
from egovlp_deploy.runtime.graphs import GraphCache
from video_files import write_video

LONG = "C picks up the red cup and " * 12 + "puts it down"  # beyond the engines' 32 tokens: truncated


@pytest.fixture
def fast_switching():
    """Threads switch every 10 µs, so that races show within a short test."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(before)


def _in_threads(fn, n: int, threads: int = 6) -> list:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, range(n)))


def test_threads_tokenizing_get_the_ids_one_thread_gets(engines, fast_switching):
    """A fast tokenizer keeps its truncation and padding settings in itself: a thread checking a query's length
    (no truncation) under another thread's truncated encoding made that one come back untruncated (55 tokens: an
    EngineError on onnxruntime, a silently different embedding on the torch backend)."""
    rt = Runtime(engines, warmup=False)
    queries = [[LONG], ["C opens the drawer"], ["C cuts", "C washes the plate in the sink"], ["a"]]
    with pytest.warns(UserWarning, match="truncated"):
        expected = [rt.text_encoder.tokenize(q) for q in queries]

    def tokenize(i: int) -> bool:
        ids, mask = rt.text_encoder.tokenize(queries[i % len(queries)])
        want_ids, want_mask = expected[i % len(queries)]
        return ids.shape == want_ids.shape and (ids == want_ids).all() and (mask == want_mask).all()

    assert all(_in_threads(tokenize, 600))


def test_threads_asking_for_a_role_first_create_one_session(engines, monkeypatch):
    """Each role's session is created once, however many threads ask for it first (it was created, verified and
    warmed up once per thread, and all but one thrown away)."""
    created = []

    class SlowRunner(engines_module.OrtRunner):
        def __init__(self, *args, **kwargs):
            created.append(args[1])
            time.sleep(0.05)  # a real session takes longer: the threads all ask while it is created
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(engines_module, "OrtRunner", SlowRunner)
    rt = Runtime(engines)
    start = threading.Barrier(4)

    def first_use(_):
        start.wait()
        return rt.runner("text_encoder")

    runners = _in_threads(first_use, 4, threads=4)
    assert created == ["text_encoder"]
    assert all(r is runners[0] for r in runners)


def _slow_graph_capture(fn, inputs, pool):
    """A CUDA graph's contract on the CPU (test_graphs.py): replay recomputes from the static inputs into the static
    outputs; here it first waits, as a real replay's host sync does, so a second caller's inputs can land meanwhile."""
    outputs = fn(**inputs)

    def replay():
        time.sleep(0.02)
        for static, new in zip(outputs, fn(**inputs)):
            static.copy_(new)

    return replay, outputs


def test_threads_replaying_one_graph_get_their_own_outputs(engines):
    """A captured graph reads one set of static inputs and writes one set of static outputs: two threads replaying
    it at once got each other's embeddings."""
    eager = Runtime(engines, backend="torch", warmup=False)
    rt = Runtime(engines, backend="torch", warmup=False, graphs=True)
    runner = rt.runner("video_encoder")
    runner.graphs = GraphCache(runner.call, "cpu", capture=_slow_graph_capture)
    clips = np.random.default_rng(0).standard_normal((4, *rt.video_encoder.clip_shape)).astype(np.float32)
    expected = [eager.video_encoder.encode(clip) for clip in clips]  # one at a time, as the threads encode
    rt.video_encoder.encode(clips[:1])  # captured here: the threads only replay

    def encode(i: int) -> bool:
        return bool((rt.video_encoder.encode(clips[i % 4]) == expected[i % 4]).all())

    assert all(_in_threads(encode, 8, threads=4))
    assert runner.graphs.counts["replays"] == 9


def test_attention_plans_of_two_threads_stay_apart():
    """`using(plan)` made its plan the process's: a thread running under one plan consulted the plan another thread
    had entered since, and the last one to leave left its previous plan active for everyone."""
    a, b = AttentionPlan(), AttentionPlan()
    entered, checked = threading.Event(), threading.Event()
    seen = {}

    def under_a():
        with using(a):
            entered.wait()
            seen["a"] = active_plan()
            checked.set()

    def under_b():
        with using(b):
            entered.set()
            checked.wait()
            seen["b"] = active_plan()

    threads = [threading.Thread(target=under_a), threading.Thread(target=under_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert seen == {"a": a, "b": b}
    assert active_plan() not in (a, b)


def test_torch_threads_are_the_process_s_and_another_count_warns(engines, monkeypatch):
    """torch.set_num_threads holds for the whole process: a second Runtime's `threads` silently became the first
    one's too. It still does (torch has no other), and says so."""
    import torch

    monkeypatch.setattr(engines_module, "_torch_threads", None)
    before = torch.get_num_threads()
    try:
        Runtime(engines, backend="torch", threads=1, warmup=False).load("text_encoder", "fusion_head")  # no warning
        with pytest.warns(TorchThreadsWarning, match="whole process: 2 now"):
            Runtime(engines, backend="torch", threads=2, warmup=False).runner("text_encoder")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_token_arrays_are_checked_before_they_run(engines, backend):
    """`encode_tokens` takes the caller's arrays: ids outside the vocabulary (a negative id wrapped around in the
    onnxruntime gather), fractional ids (truncated), a mask of other values or shape, or more tokens than the
    engines take are an EngineError on every backend, not an IndexError, a C++ message or another result."""
    rt = Runtime(engines, backend=backend, warmup=False)
    ids, mask = rt.text_encoder.tokenize(["C opens the drawer"])
    vocab = rt.folder.config.text.vocab_size
    too_long = np.full((1, rt.folder.max_text_len + 1), 5)
    bad = {
        "negative": (-ids, mask, "token ids in"),
        "beyond the vocabulary": (ids + vocab, mask, "token ids in"),
        "fractional": (ids + 0.5, mask, "integer token ids"),
        "mask of 2": (ids, mask * 2, "only 0 and 1"),
        "mask of another shape": (ids, mask[:, :3], "mask"),
        "too long": (too_long, np.ones_like(too_long), "at most"),
        "3-D": (ids[None], mask[None], "input_ids"),
        "no query": (ids[:0], mask[:0], "non-empty"),
    }
    for i, m, message in bad.values():
        with pytest.raises(EngineError, match=message):
            rt.text_encoder.encode_tokens(i, m)
    one = rt.text_encoder.encode_tokens(ids[0], mask[0])  # one query's 1-D arrays, as score_clips takes them
    assert (one.embedding == rt.text_encoder.encode_tokens(ids, mask).embedding).all()


def test_a_long_lived_index_refuses_prefixes_rewritten_since_it_was_read(engines, video_root, tmp_path):
    """A service keeps a MomentIndex while `index --prune` drops a video and a later run adds another: the new
    video's shards take the dropped one's names, and re-ranking read the new video's prefixes for the old view's
    rows (other VTM scores, silently). The view now refuses them and says to open the index again; an index deleted
    since is said to be gone (not "being written")."""
    videos = tmp_path / "videos"
    videos.mkdir()
    a, b = shutil.copy(video_root / "vid_a" / "0.mp4", videos / "a.mp4"), videos / "b.mp4"
    shutil.copy(video_root / "vid_c" / "0.mp4", b)
    c = write_video(videos / "c.mp4", 60, fps=20)  # other frames than b's, and more: b's rows are all in c's shard
    rt = Runtime(engines)
    settings = IndexSettings(frames=4, window_sec=1.0, stride_sec=1.0, prefixes=True)
    build_index(tmp_path / "idx", [a, b], rt, settings, progress=False)
    view = MomentIndex(tmp_path / "idx")
    query = "C picks up the red cup"
    dual = view.search(rt, query, top=20)
    view.search(rt, query, top=20, rerank=20)
    b.unlink()
    build_index(tmp_path / "idx", [a], rt, settings, progress=False, prune=True)
    build_index(tmp_path / "idx", [a, c], rt, settings, progress=False)  # c's shards: the names b's had
    with pytest.raises(IndexFileError, match="open the index again"):
        view.search(rt, query, top=20, rerank=20)
    assert view.search(rt, query, top=20) == dual  # without re-ranking, it answers from what it read
    fresh = MomentIndex(tmp_path / "idx").search(rt, query, top=20, rerank=20)
    assert {h.video for h in fresh} == {str(a.resolve()), str(c.resolve())}
    shutil.rmtree(tmp_path / "idx")
    with pytest.raises(IndexFileError, match="the index is gone"):
        view.search(rt, query, top=20, rerank=20)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_close_frees_the_sessions_at_once_and_later_use_is_refused(engines, backend):
    """The encoders refer back to their Runtime (a cycle), so its sessions waited for the garbage collector: a
    service swapping engines kept both in memory. `close()` (or the end of a `with` block) frees them at once."""
    import gc
    import weakref

    gc.disable()  # what is freed must be freed by `close`, not by a collection
    try:
        with Runtime(engines, backend=backend) as rt:
            rt.text_encoder.encode(["C opens the drawer"])
            session = weakref.ref(rt.runner("text_encoder"))
            model = weakref.ref(rt.torch_model) if backend == "torch" else None
        assert session() is None and (model is None or model() is None)
        with pytest.raises(EngineError, match="is closed"):
            rt.text_encoder.encode(["C opens the drawer"])
        rt.close()  # again: nothing happens
    finally:
        gc.enable()
