"""The ONNX translations of the egovlp:: ops export and run in onnxruntime (CPU) like the reference."""

import pytest
import torch

from egovlp_deploy.kernels import divided_attention as da
from egovlp_deploy.kernels import gated_cross_attention as gca
from egovlp_deploy.kernels.onnx_custom_ops import translation_table

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


class Block(torch.nn.Module):
    """A divided time pass, a space pass and a masked cross-attention, each through the custom ops."""

    def forward(self, qkv, text_kv, bias):
        t = da.divided_attention(qkv, 2, 3, "time")
        s = da.divided_attention(qkv, 2, 3, "space")
        k, v = text_kv.chunk(2, dim=-1)
        return t + s + gca.cross_attention(t, k, v, 2, bias=bias)


def reference(qkv, text_kv, bias):
    t = da.divided_attention_ref(qkv, 2, 3, "time", 0.25)
    s = da.divided_attention_ref(qkv, 2, 3, "space", 0.25)
    k, v = text_kv.chunk(2, dim=-1)
    return t + s + gca.cross_attention_ref(t, k, v, 2, 0.25, bias)


def test_export_and_run_in_onnxruntime(tmp_path):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 1 + 3 * 5, 3 * 2 * 16, generator=g)
    text_kv = torch.randn(2, 6, 2 * 2 * 16, generator=g)
    bias = torch.zeros(2, 6)
    bias[1, 3:] = torch.finfo(torch.float32).min
    path = tmp_path / "block.onnx"
    torch.onnx.export(
        Block().eval(), (qkv, text_kv, bias), str(path), dynamo=True, custom_translation_table=translation_table()
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    out = sess.run(None, dict(zip(names, (qkv.numpy(), text_kv.numpy(), bias.numpy()))))[0]
    torch.testing.assert_close(torch.from_numpy(out), reference(qkv, text_kv, bias), rtol=1e-5, atol=1e-5)
