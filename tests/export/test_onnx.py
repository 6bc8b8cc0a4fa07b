import onnx
import pytest

from egovlp_deploy.export.onnx_export import ExportError, export_onnx, read_metadata, trace_sizes
from egovlp_deploy.export.specs import ROLES


def test_export_succeeds_and_validates(tiny_export):
    out, _, code = tiny_export
    assert code == 0, (out / "validation.md").read_text()


@pytest.mark.parametrize("role", list(ROLES))
def test_graph_io_dynamic_axes_and_metadata(tiny_export, role):
    out, _, _ = tiny_export
    path = out / "onnx" / "fp32" / f"{role}.onnx"
    proto = onnx.load(str(path), load_external_data=False)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 18
    assert [i.name for i in proto.graph.input] == ROLES[role].input_names
    assert [o.name for o in proto.graph.output] == ROLES[role].output_names
    for value, spec in zip(proto.graph.input, ROLES[role].inputs):
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param, f"{value.name}: batch axis is not dynamic"
        if "text_len" in spec.dims:
            assert dims[spec.dims.index("text_len")].dim_param, f"{value.name}: text axis is not dynamic"
    assert read_metadata(path)["egovlp.role"] == role


def test_dual_encoders_hold_no_cross_attention(tiny_export):
    """Dual mode never runs cross-attention: its weights are not in the dual graphs at all."""
    out, _, _ = tiny_export
    for role, fragment in (("video_encoder", "i2t"), ("text_encoder", "t2i"), ("video_fusion_prefix", "i2t")):
        proto = onnx.load(str(out / "onnx" / "fp32" / f"{role}.onnx"))
        names = [i.name for i in proto.graph.initializer]
        assert names and not [n for n in names if fragment in n], role
    fusion = onnx.load(str(out / "onnx" / "fp32" / "fusion.onnx"))
    assert any("i2t" in i.name for i in fusion.graph.initializer)  # the check above can see them


def test_trace_sizes_refuse_degenerate_ranges():
    assert trace_sizes(8, 32) == (3, 11)
    with pytest.raises(ValueError, match="traced above 1"):
        trace_sizes(1, 32)


def test_opset_below_18_is_refused(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="opset 17"):
        export_onnx(tiny_model, "text_encoder", tmp_path / "t.onnx", max_batch=4, max_text_len=8, opset=17)
    with pytest.raises(ValueError, match="attention"):
        export_onnx(tiny_model, "text_encoder", tmp_path / "t.onnx", max_batch=4, max_text_len=8, attention="x")
    assert issubclass(ExportError, RuntimeError)


def test_external_data_locations_cover_every_tensor():
    """Initializers, Constant attributes, subgraph initializers (If branches) and local functions all count."""
    from egovlp_deploy.export.onnx_export import external_data_locations
    from onnx_graphs import graph_with_every_tensor_kind

    model = graph_with_every_tensor_kind()
    assert external_data_locations(model) == ["branch.data", "const.data", "fn.data", "weights.data"]
