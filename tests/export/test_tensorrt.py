import importlib.util

import pytest

from egovlp_deploy.export.tensorrt import BuildOptions, TensorRTUnavailable, import_tensorrt, profile_shapes

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


def test_profile_shapes_follow_the_requested_ranges(tiny_config):
    opts = BuildOptions(max_batch=8, opt_batch=2, max_text_len=32, opt_text_len=16)
    shapes = profile_shapes("fusion_head", tiny_config, opts)
    assert shapes["video_prefix"] == ((1, 65, 64), (2, 65, 64), (8, 65, 64))
    assert shapes["text_prefix"] == ((1, 1, 64), (2, 16, 64), (8, 32, 64))
    assert shapes["attention_mask"] == ((1, 1), (2, 16), (8, 32))
    assert profile_shapes("video_encoder", tiny_config, opts)["video"][2] == (8, 4, 3, 32, 32)


def test_build_options_are_checked():
    with pytest.raises(ValueError, match="precision"):
        BuildOptions(precision="int4").check()
    with pytest.raises(ValueError, match="opt_batch"):
        BuildOptions(opt_batch=9, max_batch=8).check()


@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is installed here")
def test_missing_tensorrt_gives_a_clear_error():
    with pytest.raises(TensorRTUnavailable, match="not installable on this project's"):
        import_tensorrt()


@pytest.mark.skipif(
    not HAVE_TRT,
    reason="TensorRT is not installable on this project's machines : "
    "engine builds are tested on a machine with TensorRT and a GPU",
)
def test_build_and_validate_engine(tiny_export, tmp_path):
    from egovlp_deploy.export.tensorrt import build_engine, run_engine

    out, model, _ = tiny_export
    opts = BuildOptions(precision="fp16", max_batch=8, max_text_len=32, timing_cache=str(tmp_path / "t.cache"))
    build_engine(out / "onnx" / "fp32" / "text_encoder.onnx", tmp_path / "t.engine", "text_encoder", model.config, opts)
    from egovlp_deploy.export.validate import validate_artifact

    check = validate_artifact(
        model, "text_encoder", run_engine(tmp_path / "t.engine", "text_encoder"), "fp16", [(2, 7)]
    )
    assert check.passed, check.failures


@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is installed here")
def test_export_without_tensorrt_is_refused_before_any_onnx_work(tmp_path):
    from egovlp_deploy.export.runner import ExportOptions, run_export

    out = tmp_path / "engines"
    with pytest.raises(ValueError, match="--format tensorrt: Building or running TensorRT engines needs"):
        run_export("random:tiny", out, ExportOptions(formats=["onnx", "tensorrt"]), quiet=True)
    assert not out.exists()
