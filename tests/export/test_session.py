import numpy as np
import pytest

from egovlp_deploy.export.session import ArtifactInputError, OrtArtifact
from egovlp_deploy.export.specs import example_inputs


@pytest.fixture(scope="module")
def text_session(tiny_export):
    out, model, _ = tiny_export
    return OrtArtifact(out, "text_encoder"), model


def _inputs(model, batch=2, length=6):
    return {k: v.numpy() for k, v in example_inputs(model, "text_encoder", batch, length).items()}


def test_runs_with_good_inputs(text_session):
    session, model = text_session
    out = session.run(**_inputs(model))
    assert out["text_embedding"].shape == (2, 128) and out["text_prefix"].shape == (2, 6, 64)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda x: {**x, "input_ids": x["input_ids"].astype(np.int32)}, "dtype int32, the artifact takes int64"),
        (lambda x: {**x, "input_ids": x["input_ids"][0]}, "has shape"),
        (lambda x: {"input_ids": x["input_ids"]}, "missing \\['attention_mask'\\]"),
        (lambda x: {**x, "extra": x["input_ids"]}, "unexpected \\['extra'\\]"),
        (lambda x: {**x, "attention_mask": x["attention_mask"][:1]}, "batch = 2"),
        (lambda x: {k: np.repeat(v, 6, axis=1) for k, v in x.items()}, "outside the exported range \\[1, 32\\]"),
        (lambda x: {**x, "input_ids": x["input_ids"].tolist()}, "numpy array"),
    ],
)
def test_bad_inputs_raise_clear_errors(text_session, mutate, message):
    session, model = text_session
    with pytest.raises(ArtifactInputError, match=message):
        session.run(**mutate(_inputs(model)))


def test_wrong_video_shape_and_fp16_dtype(tiny_export):
    out, model, _ = tiny_export
    video = OrtArtifact(out, "video_encoder", "fp16")
    x = example_inputs(model, "video_encoder", 1, 5)["video"].numpy()
    with pytest.raises(ArtifactInputError, match="float32, the artifact takes float16"):
        video.run(video=x)
    with pytest.raises(ArtifactInputError, match="axis 1 must be 4"):
        video.run(video=np.concatenate([x, x], axis=1).astype(np.float16))
    assert video.run(video=x.astype(np.float16))["video_embedding"].dtype == np.float16
