"""CUDA graphs in the torch backend (runtime/graphs.py).

On the CPU everything up to the CUDA calls runs: the capture is a stand-in with a graph's contract (capture runs the
function once on the static inputs and returns its outputs as static buffers; replay recomputes from whatever the
static inputs hold now, into the same output buffers), so a cache that forgot to copy new inputs in, handed out the
wrong buffers, or mixed signatures up gives wrong outputs. The real capture is tested on a GPU.
"""

import warnings

import numpy as np
import pytest
import torch

from egovlp_deploy.runtime.engines import EngineError, Runtime
from egovlp_deploy.runtime.graphs import TEXT_BUCKET, GraphCache, GraphCaptureWarning, bucket_length

CUDA = torch.cuda.is_available()


def graph_like_capture(log=None):
    def capture(fn, inputs, pool):
        outputs = fn(**inputs)
        if log is not None:
            log.append({name: tuple(x.shape) for name, x in inputs.items()})

        def replay():
            fresh = fn(**inputs)
            for static, new in zip(
                outputs if isinstance(outputs, tuple) else (outputs,), fresh if isinstance(fresh, tuple) else (fresh,)
            ):
                static.copy_(new)

        return replay, outputs

    return capture


def affine(x, y):
    return (2 * x + y, x.sum(dim=-1))


def test_bucket_length():
    assert TEXT_BUCKET == 8
    assert [bucket_length(n, 32) for n in (1, 7, 8, 9, 16, 17, 31, 32)] == [8, 8, 8, 16, 16, 24, 32, 32]
    assert bucket_length(13, 14) == 14  # the limit caps the bucket
    assert bucket_length(20, 14) == 20  # never shorter than the input


def test_replays_new_inputs_per_signature():
    log = []
    cache = GraphCache(affine, "cpu", capture=graph_like_capture(log))
    for _ in range(3):
        for n in (3, 5):
            x, y = torch.randn(2, n), torch.randn(2, n)
            out = cache(x=x, y=y)
            expected = affine(x, y)
            for got, want in zip(out, expected):
                assert torch.equal(got, want)
    assert len(log) == 2 and cache.counts == {"captures": 2, "replays": 6, "eager": 0, "evictions": 0}
    assert "2 captured" in cache.status()


def test_outputs_are_the_static_buffers_until_the_next_call():
    cache = GraphCache(affine, "cpu", capture=graph_like_capture())
    first = cache(x=torch.ones(1, 2), y=torch.zeros(1, 2))[0]
    kept = first.clone()
    second = cache(x=torch.full((1, 2), 3.0), y=torch.zeros(1, 2))[0]
    assert second.data_ptr() == first.data_ptr() and torch.equal(kept, torch.full((1, 2), 2.0))


def test_least_recently_used_graphs_are_evicted():
    log = []
    cache = GraphCache(affine, "cpu", max_graphs=2, capture=graph_like_capture(log))
    for n in (1, 2, 1, 3, 1, 2):  # 2 is evicted by 3 (1 was used more recently), then recaptured
        x = torch.randn(1, n)
        assert torch.equal(cache(x=x, y=x)[1], affine(x, x)[1])
    assert [s["x"][1] for s in log] == [1, 2, 3, 2]
    assert cache.counts["evictions"] == 2 and len(cache.graphs) == 2


def test_a_failed_capture_runs_eagerly_and_says_why():
    def refuse(fn, inputs, pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    cache = GraphCache(affine, "cpu", capture=refuse)
    x = torch.randn(2, 3)
    with pytest.warns(GraphCaptureWarning, match="not permitted"):
        out = cache(x=x, y=x)
    assert torch.equal(out[0], 3 * x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per signature, not per call
        cache(x=x, y=x)
    assert cache.counts["eager"] == 2 and "not permitted" in cache.status()


def test_cpu_device_runs_eagerly_and_says_so():
    cache = GraphCache(affine, "cpu")
    x = torch.randn(2, 3)
    assert torch.equal(cache(x=x, y=x)[0], 3 * x)
    assert cache.status().startswith("no CUDA graphs on cpu") and cache.counts["eager"] == 1


def test_graphs_are_an_option_of_the_torch_program_and_aoti_backends(engines):
    for backend in ("onnxruntime", "tensorrt"):
        with pytest.raises(EngineError, match="CUDA graphs are for the torch, program and aoti backends"):
            Runtime(engines, backend=backend, graphs=True)
    with pytest.raises(EngineError, match="max_graphs"):
        Runtime(engines, backend="torch", graphs=True, max_graphs=0)


def _text_inputs(rt, length, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, rt.folder.config.text.vocab_size, (batch, length)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[-1, max(1, length // 2) :] = 0
    return ids, mask


def test_torch_runner_pads_text_to_buckets_and_cuts_back(engines):
    """Through the runner with the graph-like capture: outputs equal the uncaptured runner's, text-length outputs
    come back at the query's length, and all query lengths of one bucket share one graph."""
    plain = Runtime(engines, backend="torch", warmup=False)
    graphed = Runtime(engines, backend="torch", warmup=False, graphs=True)
    log = []
    for role in ("text_encoder", "fusion_head"):
        runner = graphed.runner(role)
        runner.graphs = GraphCache(runner.call, "cpu", capture=graph_like_capture(log))
    text_plain, text_graphed = plain.runner("text_encoder"), graphed.runner("text_encoder")
    for length in (5, 7, 3, 12):
        ids, mask = _text_inputs(plain, length, seed=length)
        want = text_plain(input_ids=ids, attention_mask=mask)
        got = text_graphed(input_ids=ids, attention_mask=mask)
        assert got["text_prefix"].shape == want["text_prefix"].shape == (2, length, want["text_prefix"].shape[2])
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)
    assert [s["input_ids"][1] for s in log] == [8, 16]  # 5, 7, 3 share the 8-token graph

    prefix = graphed.video_encoder.fusion_prefix(
        np.random.default_rng(1).standard_normal((2, *graphed.video_encoder.clip_shape)).astype(np.float32)
    )
    ids, mask = _text_inputs(plain, 6)
    text = text_plain(input_ids=ids, attention_mask=mask)
    want = plain.runner("fusion_head")(video_prefix=prefix, text_prefix=text["text_prefix"], attention_mask=mask)
    got = graphed.runner("fusion_head")(video_prefix=prefix, text_prefix=text["text_prefix"], attention_mask=mask)
    np.testing.assert_allclose(got["vtm_logits"], want["vtm_logits"], rtol=1e-5, atol=1e-5)
    assert "CUDA graphs: 1 captured" in graphed.runner("fusion_head").describe()["graphs"]


def test_torch_runner_on_cpu_reports_eager(engines):
    rt = Runtime(engines, backend="torch", graphs=True)
    rt.text_encoder.encode(["#C C opens the fridge"])
    assert [r["graphs"] for r in rt.describe()] == ["no CUDA graphs on cpu: runs eagerly"]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (graph capture)")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_graphs_equal_eager_on_the_gpu(engines, precision):
    plain = Runtime(engines, backend="torch", device="cuda", precision=precision)
    graphed = Runtime(engines, backend="torch", device="cuda", precision=precision, graphs=True)
    clips = np.random.default_rng(2).standard_normal((3, *plain.video_encoder.clip_shape)).astype(np.float32)
    for _ in range(3):  # capture, then replays
        np.testing.assert_allclose(
            graphed.video_encoder.encode(clips),
            plain.video_encoder.encode(clips),
            rtol=1e-5,
            atol=1e-5 if precision == "fp32" else 1e-3,
        )
    for length in (5, 9):
        ids, mask = _text_inputs(plain, length)
        want = plain.runner("text_encoder")(input_ids=ids, attention_mask=mask)
        got = graphed.runner("text_encoder")(input_ids=ids, attention_mask=mask)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=1e-3, err_msg=name)
    status = graphed.runner("video_encoder").describe()["graphs"]
    assert "captured" in status and "eager" not in status, status


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (graph capture)")
def test_cuda_graph_eviction_with_outputs_still_held():
    """max_graphs=1: every new signature evicts the only graph while the caller still holds its outputs; the next
    capture must not reuse the emptied pool (a PyTorch assert, which would silently turn the cache eager)."""
    cache = GraphCache(lambda x: (x * 2 + 1,), "cuda", max_graphs=1)
    held = []
    for n in (3, 5, 3, 7):
        x = torch.randn(n, 64, device="cuda")
        out = cache(x=x)[0]
        assert torch.equal(out, x * 2 + 1)
        held.append(out)
    assert cache.counts["captures"] == 4 and not cache.failed, cache.status()
