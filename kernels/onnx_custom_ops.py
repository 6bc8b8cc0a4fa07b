"""ONNX translations of the `egovlp::` custom ops into standard ONNX operators (the reference math).

Use: `torch.onnx.export(model, args, dynamo=True, custom_translation_table=translation_table())`. Each translation
is a plain Python function of onnxscript ops (an `@onnxscript.script` one failed with onnx-ir 1.1);
it receives the op's tensors as graph values and its int/float/str arguments as Python values. The graph is the
official math (reshape/transpose, CLS repeat, MatMul, Softmax), so any runtime with the standard opset runs it;
a runtime-specific fused kernel (ORT custom op, TensorRT plugin) can replace it later.
"""

from __future__ import annotations

import torch

# Large enough to mean "to the end" for Slice.
_END = 2**62


def _ops():
    from onnxscript import opset18 as op

    return op


def _consts(op, values):
    return op.Constant(value_ints=list(values))


def divided_attention_onnx(qkv, heads: int, num_frames: int, mode: str, scale: float):
    """egovlp::divided_attention: qkv (B, S, 3*H*D) -> (B, S, H*D)."""
    op = _ops()
    i64 = _consts
    x = op.Reshape(qkv, i64(op, [0, 0, 3, heads, -1]))  # (B, S, 3, H, D)
    x = op.Transpose(x, perm=[2, 0, 3, 1, 4])  # (3, B, H, S, D)
    q = op.Gather(x, op.Constant(value_int=0), axis=0)  # (B, H, S, D)
    k = op.Gather(x, op.Constant(value_int=1), axis=0)
    v = op.Gather(x, op.Constant(value_int=2), axis=0)
    q = op.Mul(q, op.CastLike(op.Constant(value_float=scale), q))  # scale q first (official math)

    q0 = op.Slice(q, i64(op, [0]), i64(op, [1]), i64(op, [2]))  # (B, H, 1, D): the CLS query sees all S
    k0 = op.Slice(k, i64(op, [0]), i64(op, [1]), i64(op, [2]))
    v0 = op.Slice(v, i64(op, [0]), i64(op, [1]), i64(op, [2]))
    cls_out = op.MatMul(op.Softmax(op.MatMul(q0, op.Transpose(k, perm=[0, 1, 3, 2])), axis=-1), v)

    shape = op.Shape(q)  # [B, H, S, D]
    bh = op.Slice(shape, i64(op, [0]), i64(op, [2]))
    d = op.Slice(shape, i64(op, [3]), i64(op, [4]))
    five = op.Concat(bh, i64(op, [num_frames, -1]), d, axis=0)  # (B, H, F, N, D)

    def grouped(t):
        t = op.Reshape(op.Slice(t, i64(op, [1]), i64(op, [_END]), i64(op, [2])), five)
        return op.Transpose(t, perm=[0, 1, 3, 2, 4]) if mode == "time" else t  # (B, H, G, size, D)

    qg, kg, vg = grouped(q), grouped(k), grouped(v)
    g_shape = op.Shape(kg)
    cls_shape = op.Concat(op.Slice(g_shape, i64(op, [0]), i64(op, [3])), i64(op, [1]), d, axis=0)  # (B,H,G,1,D)
    kc = op.Concat(op.Expand(op.Unsqueeze(k0, i64(op, [2])), cls_shape), kg, axis=3)  # (B, H, G, 1+size, D)
    vc = op.Concat(op.Expand(op.Unsqueeze(v0, i64(op, [2])), cls_shape), vg, axis=3)
    out = op.MatMul(op.Softmax(op.MatMul(qg, op.Transpose(kc, perm=[0, 1, 2, 4, 3])), axis=-1), vc)
    if mode == "time":
        out = op.Transpose(out, perm=[0, 1, 3, 2, 4])  # back to (B, H, F, N, D)
    out = op.Reshape(out, op.Concat(bh, i64(op, [-1]), d, axis=0))  # (B, H, F*N, D)
    out = op.Concat(cls_out, out, axis=2)  # (B, H, S, D)
    return op.Reshape(op.Transpose(out, perm=[0, 2, 1, 3]), i64(op, [0, 0, -1]))  # (B, S, H*D)


def cross_attention_onnx(q, k, v, bias, heads: int, scale: float):
    """egovlp::cross_attention: q (B, Lq, H*D), k/v (B, Lk, H*D), bias (B, Lk) or None -> (B, Lq, H*D)."""
    op = _ops()
    i64 = _consts

    def split(t):
        return op.Transpose(op.Reshape(t, i64(op, [0, 0, heads, -1])), perm=[0, 2, 1, 3])  # (B, H, L, D)

    qh = op.Mul(split(q), op.CastLike(op.Constant(value_float=scale), q))
    scores = op.MatMul(qh, op.Transpose(split(k), perm=[0, 1, 3, 2]))  # (B, H, Lq, Lk)
    if bias is not None:
        scores = op.Add(scores, op.CastLike(op.Unsqueeze(bias, i64(op, [1, 2])), scores))
    out = op.MatMul(op.Softmax(scores, axis=-1), split(v))  # (B, H, Lq, D)
    return op.Reshape(op.Transpose(out, perm=[0, 2, 1, 3]), i64(op, [0, 0, -1]))


def translation_table() -> dict:
    """{custom op overload: ONNX translation} for `torch.onnx.export(..., custom_translation_table=...)`."""
    from . import divided_attention, gated_cross_attention  # noqa: F401  (registers the ops)

    return {
        torch.ops.egovlp.divided_attention.default: divided_attention_onnx,
        torch.ops.egovlp.cross_attention.default: cross_attention_onnx,
    }
