"""Lower-precision ONNX artifacts derived from the fp32 graph, and ONNX Runtime's offline graph optimization.

fp16 (`to_fp16`): a graph pass, not a second export. Every float tensor becomes float16 except around the ops
that lose accuracy in half precision (LayerNorm statistics, softmax, reductions: `KEEP_FP32`): their float inputs
are cast to float32 and their outputs back to float16, and their own parameters (LayerNorm scale and bias) stay
float32. This is the "norms in fp32" rule whose absence silently breaks RoBERTa/ViT LayerNorms in peers' fp16
engines (TensorRT #3101, #2709). A TensorRT strongly-typed build honours these Casts as written.
Constants beyond float16's range are clipped to it: the additive attention mask is `(1 - m) * finfo(f32).min`,
which would become -inf, and `0 * -inf = NaN` on every unmasked token.

int8 (`to_int8`): ONNX Runtime dynamic quantization (int8 weights of MatMul/Gemm, activations quantized per call):
a CPU format; its accuracy is measured by the validator, not assumed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

KEEP_FP32 = {
    "LayerNormalization",
    "Softmax",
    "LogSoftmax",
    "ReduceMean",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceL2",
    "ReduceLogSumExp",
    "ReduceProd",
    "SimplifiedLayerNormalization",
    "Pow",
    "Sqrt",
}
FP16_MAX = float(np.finfo(np.float16).max)


def to_fp16(src: str | os.PathLike, dst: str | os.PathLike) -> dict:
    """Write the fp16 version of the fp32 model `src` to `dst`; return {'kept_fp32_nodes': n, 'casts': n}."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from .onnx_export import save_model, set_metadata

    model = onnx.load(str(src))
    model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    graph = model.graph
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ValueError(
                f"{src}: node {node.name} ({node.op_type}) has a subgraph; the fp16 pass handles flat graphs only"
            )
    F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
    elem = {
        v.name: v.type.tensor_type.elem_type for v in list(graph.value_info) + list(graph.input) + list(graph.output)
    }
    inits = {i.name: i for i in graph.initializer}
    for name, init in inits.items():
        elem[name] = init.data_type
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    # initializers only read by kept nodes stay fp32 (LayerNorm scale/bias); the others become fp16
    keep_init = {
        n
        for n, i in inits.items()
        if i.data_type == F32 and consumers.get(n) and all(c.op_type in KEEP_FP32 for c in consumers[n])
    }
    for name, init in inits.items():
        if init.data_type == F32 and name not in keep_init:
            arr = np.clip(numpy_helper.to_array(init), -FP16_MAX, FP16_MAX).astype(np.float16)
            init.CopyFrom(numpy_helper.from_array(arr, name))

    new_nodes, casts, kept = [], 0, 0
    for node in graph.node:
        if node.op_type in KEEP_FP32:
            kept += 1
            for i, name in enumerate(node.input):
                if name and elem.get(name) == F32 and name not in keep_init:
                    cast_out = f"{name}__to_fp32_{casts}"
                    new_nodes.append(
                        helper.make_node("Cast", [name], [cast_out], to=F32, name=f"{node.name}_in{i}_fp32")
                    )
                    node.input[i] = cast_out
                    casts += 1
            outs = list(node.output)
            new_nodes.append(node)
            for i, name in enumerate(outs):
                if name and elem.get(name) == F32:
                    inner = f"{name}__fp32"
                    node.output[i] = inner
                    new_nodes.append(helper.make_node("Cast", [inner], [name], to=F16, name=f"{node.name}_out{i}_fp16"))
                    casts += 1
            continue
        _retarget_float_attributes(node, F32, F16)
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    for value in list(graph.input) + list(graph.output):
        if value.type.tensor_type.elem_type == F32:
            value.type.tensor_type.elem_type = F16
    del graph.value_info[:]  # stale float32 types; re-inferred below and by the runtime
    set_metadata(model, {"egovlp.precision": "fp16"})
    onnx.checker.check_model(model)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)  # type errors surface here, not at run time
    save_model(model, Path(dst))
    return {"kept_fp32_nodes": kept, "casts": casts}


def _retarget_float_attributes(node, f32: int, f16: int) -> None:
    """float32 produced by an attribute (Cast to, Constant, ConstantOfShape value) becomes float16."""
    from onnx import numpy_helper

    for attr in node.attribute:
        if node.op_type == "Cast" and attr.name == "to" and attr.i == f32:
            attr.i = f16
        elif attr.name == "value" and attr.HasField("t") and attr.t.data_type == f32:
            arr = np.clip(numpy_helper.to_array(attr.t), -FP16_MAX, FP16_MAX).astype(np.float16)
            attr.t.CopyFrom(numpy_helper.from_array(arr, attr.t.name))
        elif node.op_type == "Constant" and attr.name in ("value_float", "value_floats"):
            raise ValueError(f"Constant {node.name}: float attribute {attr.name} is not handled by the fp16 pass")


def to_int8(src: str | os.PathLike, dst: str | os.PathLike) -> dict:
    """ONNX Runtime dynamic quantization of `src` into `dst`: int8 weights with one scale per output channel,
    activations quantized per tensor at run time. Returns the quantized op counts. Per-channel scales keep a trained
    encoder's outputs much closer to fp32 than one scale per weight tensor."""
    import tempfile

    import onnx
    from google.protobuf.message import DecodeError
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from .onnx_export import save_model, set_metadata, write_error

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.q{os.getpid()}")
    try:
        quantize_dynamic(
            str(src),
            str(tmp),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm"],
            per_channel=True,
            extra_options={"MatMulConstBOnly": True},
        )
        model = onnx.load(str(tmp))
    except (OSError, DecodeError) as exc:
        # ORT's quantizer writes a shape-inferred copy of the graph into the temp folder and reads it back: a full
        # disk there or here truncates a file it then fails to parse (DecodeError), or fails the write (OSError)
        raise write_error(dst, exc, scratch=tempfile.gettempdir()) from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    set_metadata(model, {"egovlp.precision": "int8"})
    save_model(model, dst)
    ops: dict[str, int] = {}
    for node in model.graph.node:
        if "Integer" in node.op_type or "Quantize" in node.op_type:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"quantized_ops": ops}


def ort_optimize(src: str | os.PathLike, dst: str | os.PathLike, level: str = "extended") -> Path:
    """Save ONNX Runtime's offline-optimized graph (CPU provider). 'extended' fusions (LayerNorm, Gelu,
    attention, MatMul+Add) stay portable across CPUs; 'all' adds layout changes tied to this machine's ISA."""
    from egovlp_deploy.ort_session import ort_session

    from .onnx_export import ExportError, write_error

    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.o{os.getpid()}")
    try:
        # src loads (it was validated): a failure here is ONNX Runtime's write of the optimized graph
        try:
            ort_session(src, optimize=level, optimized_path=tmp, error=ExportError)
            os.replace(tmp, dst)
        except (ExportError, OSError) as exc:
            cause = exc.__cause__ if isinstance(exc, ExportError) and exc.__cause__ else exc
            raise write_error(dst, cause, Path(src).stat().st_size) from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    return dst
