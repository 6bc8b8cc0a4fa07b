"""The runtime at shapes its engines were not exported for: every backend refuses them with an EngineError before
anything runs, as the onnxruntime backend does. An AOTInductor package reads its inputs with the sizes it was
compiled for, so a text prefix of 2 rows given with 3 clips (or a prefix of another frame count) would be read past
its end and return numbers, not an error."""

import numpy as np
import pytest
import torch

from egovlp_deploy.config import EgoVLPv2Config
from egovlp_deploy.export.manifest import io_entry
from egovlp_deploy.runtime.engines import EngineError, Runtime, _TensorRunner


class RecordingRunner(_TensorRunner):
    """A tensor runner whose compiled callable only records that it was called (stands for an AOTI package)."""

    backend = "aoti"

    def __init__(self, role: str, max_batch: int = 8, max_text_len: int = 32) -> None:
        self.calls = 0
        config = EgoVLPv2Config.tiny(num_frames=4)
        io = io_entry(role, config, "fp32", max_batch, max_text_len)

        def call(**args):
            self.calls += 1
            raise AssertionError("the artifact ran on inputs outside its exported shapes")

        self._setup(call, role, io, "fp32", "cpu", torch.float32, False, 1, 1, max_text_len)


def head_inputs(clips=3, tokens=65, texts=3, text_len=13, mask_len=None, width=64):
    return {
        "video_prefix": np.zeros((clips, tokens, width), np.float32),
        "text_prefix": np.zeros((texts, text_len, 64), np.float32),
        "attention_mask": np.ones((texts, mask_len or text_len), np.int64),
    }


@pytest.mark.parametrize(
    "inputs, message",
    [
        (head_inputs(tokens=33), r"video_prefix has shape \(3, 33, 64\): axis 1 must be 65"),  # a 2-frame prefix
        (head_inputs(texts=2), r"text_prefix axis 0 \(batch\) is 2 but another input has batch = 3"),
        (head_inputs(text_len=40), r"text_len\) is 40, outside the exported range \[1, 32\]"),
        (head_inputs(clips=9, texts=9), r"batch\) is 9, outside the exported range \[1, 8\]"),
        (head_inputs(mask_len=5), r"attention_mask axis 1 \(text_len\) is 5 but another input has text_len = 13"),
        (head_inputs(width=32), r"video_prefix has shape \(3, 65, 32\): axis 2 must be 64"),
    ],
)
def test_tensor_backends_refuse_shapes_outside_the_export(inputs, message):
    runner = RecordingRunner("fusion_head")
    with pytest.raises(EngineError, match=message):
        runner(**inputs)
    assert runner.calls == 0


def test_tensor_backends_refuse_an_input_the_artifact_does_not_take():
    runner = RecordingRunner("video_encoder")
    with pytest.raises(EngineError, match="frames"):
        runner(video=np.zeros((1, 4, 3, 32, 32), np.float32), frames=np.zeros(1, np.float32))
    assert runner.calls == 0


def test_tensor_backends_refuse_a_clip_of_another_frame_count():
    runner = RecordingRunner("video_encoder")
    with pytest.raises(EngineError, match=r"video has shape \(1, 2, 3, 32, 32\): axis 1 must be 4"):
        runner(video=np.zeros((1, 2, 3, 32, 32), np.float32))
    assert runner.calls == 0


def test_torch_backend_reports_mismatched_batches_as_engine_errors(engines):
    """score_prefixes / score_clips with 2 sentences for 3 clips: the error names the runtime's inputs on every
    backend (the torch backend gave the model's own InputError)."""
    rng = np.random.default_rng(0)
    clips = rng.standard_normal((3, 4, 3, 32, 32)).astype(np.float32)
    for backend in ("onnxruntime", "torch"):
        with Runtime(engines, backend=backend, warmup=False) as rt:
            prefix = rt.video_encoder.fusion_prefix(clips)
            text = rt.text_encoder.encode_tokens(np.array([[0, 9, 2], [0, 8, 2]]), np.ones((2, 3), np.int64))
            with pytest.raises(EngineError, match="batch"):
                rt.fusion.score_prefixes(prefix, text.prefix, text.mask)
            with pytest.raises(EngineError, match="batch"):
                rt.fusion.score_clips(clips, text.input_ids, text.mask)
            assert rt.fusion.score_prefixes(prefix, text.prefix[:1], text.mask[:1]).shape == (3,)


def test_torch_backend_refuses_fp16_on_a_cpu(engines):
    """The eager model runs fp16 on CUDA only: on a CPU it ran fp32 while the runtime (and the index it wrote, and
    the benchmark rows) said fp16."""
    with pytest.raises(EngineError, match="the torch backend runs fp16 on CUDA only"):
        Runtime(engines, backend="torch", precision="fp16", warmup=False)
    Runtime(engines, backend="torch", precision="fp32", warmup=False).close()
