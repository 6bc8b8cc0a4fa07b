"""Runtime encoders and scorer: parity with the PyTorch model per available backend, cached re-ranking equal to
monolithic fusion, and clear errors for bad engine folders and queries."""

import json

import numpy as np
import pytest
import torch

from egovlp_deploy.runtime import EngineError, QueryError, Runtime

COS_MIN = 0.99999  # fp32 acceptance (issue 7)


def _cos_rows(a, b):
    a, b = np.asarray(a, np.float64).reshape(len(a), -1), np.asarray(b, np.float64).reshape(len(b), -1)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _inputs(model, batch=3, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    v, t = model.config.video, model.config.text
    video = torch.randn(batch, v.num_frames, 3, v.img_size, v.img_size, generator=g)
    ids = torch.randint(5, t.vocab_size, (batch, length), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    ids[-1, 5], ids[-1, 6:] = 2, 1  # one padded row: the mask matters
    return video, ids, ids.ne(1).long()


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_outputs_equal_pytorch(engines, rt_model_dir, backend):
    _, model = rt_model_dir
    rt = Runtime(engines, backend=backend)
    video, ids, mask = _inputs(model)
    with torch.no_grad():
        ref_v = model.encode_video(video).numpy()
        ref_t = model.encode_text(ids, mask).numpy()
        ref_vp = model.fusion_video_prefix(video).numpy()
        ref_tp = model.text_prefix(ids, mask).numpy()
        ref_logits = model.fuse(video, ids, mask).vtm_logits
    ref_prob = torch.softmax(ref_logits, -1)[:, 1].numpy()
    assert _cos_rows(rt.video_encoder.encode(video.numpy()), ref_v).min() >= COS_MIN
    assert _cos_rows(rt.video_encoder.fusion_prefix(video.numpy()), ref_vp).min() >= COS_MIN
    out = rt.runner("text_encoder")(input_ids=ids.numpy(), attention_mask=mask.numpy())
    assert _cos_rows(out["text_embedding"], ref_t).min() >= COS_MIN
    assert _cos_rows(out["text_prefix"], ref_tp).min() >= COS_MIN
    np.testing.assert_allclose(rt.fusion.score_prefixes(ref_vp, ref_tp, mask.numpy()), ref_prob, atol=1e-5)
    np.testing.assert_allclose(rt.fusion.score_clips(video.numpy(), ids.numpy(), mask.numpy()), ref_prob, atol=1e-5)
    for d in rt.describe():  # it reports what really runs
        assert d["backend"] == backend and d["provider"]


def test_cached_rerank_equals_monolithic(engines, rt_model_dir):
    _, model = rt_model_dir
    rt = Runtime(engines)
    video, _, _ = _inputs(model, batch=5, seed=3)
    text = rt.text_encoder.encode(["#C C picks up the red cup"])
    cached = rt.fusion.score_prefixes(rt.video_encoder.fusion_prefix(video.numpy()), text.prefix, text.mask)
    mono = rt.fusion.score_clips(video.numpy(), text.input_ids, text.mask)
    assert cached.shape == (5,)
    np.testing.assert_allclose(cached, mono, atol=1e-6)
    assert np.ptp(cached) > 1e-4  # the clips really score differently (non-zero gates)


def test_batches_beyond_the_exported_maximum(engines, rt_model_dir):
    _, model = rt_model_dir
    rt = Runtime(engines)
    video, _, _ = _inputs(model, batch=11, seed=5)  # max_batch 8: split into 8 + 3
    with torch.no_grad():
        ref = model.encode_video(video).numpy()
    assert _cos_rows(rt.video_encoder.encode(video.numpy()), ref).min() >= COS_MIN


def test_empty_query_is_a_clear_error(engines):
    rt = Runtime(engines)
    for bad in ("", "   ", []):
        with pytest.raises(QueryError, match="empty query|no text"):
            rt.text_encoder.encode(bad)


def test_missing_artifact_is_named(engines_copy):
    (engines_copy / "onnx" / "fp32" / "video_encoder.onnx").unlink()
    rt = Runtime(engines_copy)
    with pytest.raises(EngineError, match="video_encoder.onnx.*missing"):
        rt.runner("video_encoder")


def test_corrupt_artifact_is_named(engines_copy):
    path = engines_copy / "onnx" / "fp32" / "text_encoder.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(EngineError, match="text_encoder.onnx.*sha256"):
        Runtime(engines_copy).runner("text_encoder")


def test_not_an_engine_folder(tmp_path):
    with pytest.raises(EngineError, match="no such engine folder"):
        Runtime(tmp_path / "nope")
    with pytest.raises(EngineError, match="manifest"):
        Runtime(tmp_path)


def test_role_not_exported_and_backend_without_artifacts(engines):
    with pytest.raises(EngineError, match="no onnx int8 artifact"):
        Runtime(engines, precision="int8").runner("video_encoder")
    with pytest.raises(EngineError):  # no AOTInductor package listed / TensorRT not installed here
        Runtime(engines, backend="aoti").runner("video_encoder")
    with pytest.raises(EngineError):
        Runtime(engines, backend="tensorrt").runner("video_encoder")
    with pytest.raises(EngineError, match="backend must be"):
        Runtime(engines, backend="openvino")


def test_wrong_clip_shape(engines):
    rt = Runtime(engines)
    with pytest.raises(EngineError, match="exported for 4 frames"):
        rt.video_encoder.encode(np.zeros((1, 8, 3, 32, 32), np.float32))


def test_torch_backend_refuses_another_checkpoint(engines_copy, tmp_path):
    manifest = json.loads((engines_copy / "manifest.json").read_text())
    manifest["source_checkpoint"]["sha256"] = "0" * 64
    (engines_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="not the one these engines were exported from"):
        Runtime(engines_copy, backend="torch").runner("video_encoder")


def test_torch_backend_exits_cleanly(engines):
    """The torch backend's model stays patched for the runtime's lifetime; nothing of it may run during interpreter
    shutdown (a context held open was closed then, printing an ImportError from inside `set_attention_backend`)."""
    import subprocess
    import sys

    script = (
        "from egovlp_deploy.runtime import Runtime\n"
        f"rt = Runtime({str(engines)!r}, backend='torch')\n"
        "rt.runner('text_encoder')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Exception ignored" not in done.stderr, done.stderr[-2000:]


def test_provider_fallback_is_reported(engines, recwarn):
    import onnxruntime

    from egovlp_deploy.runtime import ProviderFallbackWarning

    rt = Runtime(engines, device="cuda")
    r = rt.runner("video_encoder")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers() or r.provider != "CUDAExecutionProvider":
        assert r.provider == "CPUExecutionProvider"
        assert any(issubclass(w.category, ProviderFallbackWarning) for w in recwarn.list)
