"""Exports at shapes other than the checkpoint's: another frame count, batches and text lengths the trace never saw."""

import os
import subprocess
import sys

import numpy as np
import pytest

from egovlp_deploy.export.onnx_export import trace_sizes
from egovlp_deploy.export.specs import example_inputs
from egovlp_deploy.export.validate import torch_outputs, validation_sizes
from egovlp_deploy.model.factory import model_at_frames

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def test_custom_op_route_exports_without_a_gpu_at_one_frame(tiny_model, tmp_path):
    """`--attention custom-ops` traces the egovlp:: Triton ops and translates them into standard ONNX operators: no
    kernel runs, so a machine without a GPU (and without the Triton interpreter) writes the graph, and it computes
    what the eager model does at sizes the trace never saw (here at 1 frame: every time group holds one patch).
    The export runs in a process of its own: whether the kernels are interpreted is fixed when they are first
    imported, which this test process did with TRITON_INTERPRET=1 (tests/conftest.py)."""
    model = model_at_frames(tiny_model, 1)
    model.save_pretrained(tmp_path / "model")
    path = tmp_path / "fusion_head.onnx"
    script = (
        "import sys, torch\n"
        "from egovlp_deploy.export.onnx_export import export_onnx\n"
        "from egovlp_deploy.model.factory import load_model\n"
        "model, _ = load_model(sys.argv[1])\n"
        "backend = model.eval().attention_backend\n"
        "made = export_onnx(model, 'fusion_head', sys.argv[2], max_batch=4, max_text_len=8, attention='custom-ops')\n"
        "assert not any(op.startswith('egovlp') for op in made.op_counts), made.op_counts\n"
        "assert model.attention_backend == backend and torch.is_grad_enabled()  # the export restores the model\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "model"), str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    for batch, text_len in ((1, 2), (4, 8)):  # the trace: (3, 8)
        inputs = example_inputs(model, "fusion_head", batch, text_len, seed=batch)
        want = torch_outputs(model, "fusion_head", inputs)
        got = dict(zip(names, session.run(names, {k: v.numpy() for k, v in inputs.items()})))
        for name, ref in want.items():
            np.testing.assert_allclose(got[name], ref, rtol=1e-4, atol=1e-5, err_msg=f"{name} at B={batch}")


@pytest.mark.parametrize("max_batch, max_text_len", [(8, 32), (2, 3), (2, 11), (8, 5), (3, 12)])
def test_validation_sizes_are_never_the_trace_sizes(max_batch, max_text_len):
    """Each dynamic axis is validated at a size the trace never saw, in every exportable range (--max-batch 2
    --max-text-len 3 traces (2, 3): validating there too would not catch a graph specialised to its trace)."""
    batch, text_len = trace_sizes(max_batch, max_text_len)
    sizes = validation_sizes(max_batch, max_text_len)
    assert all(1 <= b <= max_batch and 1 <= L <= max_text_len for b, L in sizes)
    assert all(L != text_len for _, L in sizes) and any(b != batch for b, _ in sizes)
