import json

import numpy as np
import onnx
import onnxruntime as ort

from egovlp_deploy.export.manifest import load_manifest
from egovlp_deploy.export.specs import example_inputs


def _entries(out, precision):
    return [a for a in load_manifest(out).artifacts if a.precision == precision and a.variant == ""]


def test_fp16_keeps_norms_and_softmax_in_fp32(tiny_export):
    out, _, _ = tiny_export
    proto = onnx.load(str(out / "onnx" / "fp16" / "fusion.onnx"))
    producers = {o: n for n in proto.graph.node for o in n.output}
    inits = {i.name: i.data_type for i in proto.graph.initializer}
    kept = [n for n in proto.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert kept
    for node in kept:
        for name in node.input:
            if not name:
                continue
            src = producers.get(name)
            assert (src is not None and src.op_type == "Cast") or inits.get(name) == onnx.TensorProto.FLOAT, (
                node.name,
                name,
            )
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_fp16_cosine_and_int8_accuracy(tiny_export):
    out, _, _ = tiny_export
    for entry in _entries(out, "fp16"):
        assert entry.validation["passed"] and entry.validation["min_cosine"] >= 0.999, entry.file
    for entry in _entries(out, "int8"):
        assert entry.validation["passed"] and entry.validation["min_cosine"] >= 0.99, entry.file
    report = json.loads((out / "validation.json").read_text())
    task = {c["name"]: c for c in report["checks"]}
    for p in ("fp16", "int8"):  # decisive EgoMCQ answers of the random question set agree with fp32 torch
        assert task[f"task/{p}"]["passed"], task[f"task/{p}"]["failures"]


def test_int8_graph_is_quantized_and_fp16_has_no_nan_on_padded_text(tiny_export):
    out, model, _ = tiny_export
    ops = {n.op_type for n in onnx.load(str(out / "onnx" / "int8" / "text_encoder.onnx")).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    # the additive mask is finfo(f32).min: the pass clips it, or (1 - 1) * -inf would give NaN
    s = ort.InferenceSession(str(out / "onnx" / "fp16" / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    inputs = {k: v.numpy() for k, v in example_inputs(model, "text_encoder", 3, 12, seed=4).items()}
    assert inputs["attention_mask"].min() == 0
    for o in s.run(None, inputs):
        assert np.isfinite(o).all()
