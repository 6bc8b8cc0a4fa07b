"""ONNX export of one role with the dynamo exporter (torch.export -> ONNX, opset >= 18).

Dynamic axes are `torch.export.Dim`s named after the spec's symbols (`batch`, `text_len`), so the graph's
dynamic dimensions carry those names. Tracing uses batch 3 and a text length of 11 (or the maximum when smaller):
a dimension traced at size 0 or 1 is specialised by torch.export, and a trace size equal to a fixed size of the
model (2 VTM classes, 4 frames, 4 heads...) invites shape unification. Validation then runs at other sizes.

The graph gets `metadata_props` (role, precision, config hash) so the manifest loader can tell a swapped file
from a corrupted one.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .specs import ROLES, example_inputs, export_patches, role_module

DEFAULT_OPSET = 20
MIN_OPSET = 18
TRACE_BATCH = 3
TRACE_TEXT_LEN = 11
ATTENTION_ROUTES = ("reference", "custom-ops")


class ExportError(RuntimeError):
    """An artifact could not be produced (exporter failure, a graph that breaks a declared property)."""


@dataclass
class OnnxExport:
    role: str
    path: Path
    opset: int
    seconds: float
    num_nodes: int
    op_counts: dict[str, int]


def max_opset() -> int:
    """The newest ONNX opset this installation exports and runs: at most the onnx package's, the onnxscript version
    converter's (the exporter builds at opset 18 and converts up) and the newest one ONNX Runtime loads."""
    from onnx.defs import onnx_opset_version

    bound = onnx_opset_version()
    try:
        from onnxscript.version_converter import _version_converter

        bound = min(bound, getattr(_version_converter, "SUPPORTED_MAX_ONNX_OPSET", bound))
    except ImportError:
        pass
    while bound > MIN_OPSET and not _ort_loads_opset(bound):
        bound -= 1
    return bound


def _ort_loads_opset(opset: int) -> bool:
    """Whether ONNX Runtime opens a one-node graph of this opset (it refuses opsets newer than it knows)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8  # the IR of opset 18: a runtime older than the onnx package refuses newer IR versions
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime raises its own Fail/InvalidGraph types
        return False
    return True


def trace_sizes(max_batch: int, max_text_len: int) -> tuple[int, int]:
    if max_batch < 2 or max_text_len < 3:
        raise ValueError(
            f"max batch must be >= 2 and max text length >= 3 (dynamic axes are traced above 1), "
            f"got {max_batch}, {max_text_len}"
        )
    return min(TRACE_BATCH, max_batch), min(TRACE_TEXT_LEN, max_text_len)


def dynamic_shapes(role: str, max_batch: int, max_text_len: int) -> dict[str, dict[int, torch.export.Dim]]:
    dims = {
        "batch": torch.export.Dim("batch", min=1, max=max_batch),
        "text_len": torch.export.Dim("text_len", min=1, max=max_text_len),
    }
    return {t.name: {i: dims[d] for i, d in enumerate(t.dims) if d in dims} for t in ROLES[role].inputs}


def config_digest(config) -> str:
    """The digest of `config` a graph records (egovlp.config_sha256); the loader compares it with the manifest's."""
    return config_json_digest(config.to_dict())


def config_json_digest(model_config: dict) -> str:
    """The digest of a model config as a manifest stores it (`model_config`): what `config_digest` records in each
    graph, so the loader can compare the two; fields added to the config since an export do not change it. It
    covers `attention_backend` (`EgoVLPv2Config.digest` leaves it out), which export_patches has restored by the
    time a graph is exported."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(model_config, indent=2, sort_keys=True).encode()).hexdigest()[:16]


def _translation_table(attention: str):
    """The custom-op route: the model runs the `egovlp::` Triton ops and the kernels package translates them into
    standard ONNX ops. Optional: only when that package provides the table (checked, never assumed)."""
    if attention == "reference":
        return None
    from egovlp_deploy import kernels

    try:
        from egovlp_deploy.kernels import onnx_custom_ops as kernel_onnx
    except ImportError as exc:
        raise ExportError(f"attention route 'custom-ops' needs egovlp_deploy.kernels.onnx_custom_ops ({exc})") from exc
    if not hasattr(kernel_onnx, "translation_table"):
        raise ExportError("egovlp_deploy.kernels.onnx_custom_ops has no translation_table(): use --attention reference")
    del kernels
    return kernel_onnx.translation_table()


def export_onnx(
    model,
    role: str,
    path: str | os.PathLike,
    *,
    max_batch: int,
    max_text_len: int,
    opset: int = DEFAULT_OPSET,
    attention: str = "reference",
    precision: str = "fp32",
) -> OnnxExport:
    """Export `role` of `model` (fp32, eval) to `path` (written atomically); return what was written."""

    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is below {MIN_OPSET} (LayerNormalization and the dynamo exporter need it)")
    if attention not in ATTENTION_ROUTES:
        raise ValueError(f"attention must be one of {ATTENTION_ROUTES}, got {attention!r}")
    spec = ROLES[role]
    batch, text_len = trace_sizes(max_batch, max_text_len)
    backend = "reference" if attention == "reference" else "triton"
    inputs = example_inputs(model, role, batch, text_len, seed=1234)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    table = _translation_table(attention)
    with torch.no_grad(), export_patches(model, backend), _quiet_exporter():
        try:
            program = torch.onnx.export(
                role_module(model, role),
                (),
                kwargs=inputs,
                dynamo=True,
                opset_version=opset,
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_shapes=dynamic_shapes(role, max_batch, max_text_len),
                custom_translation_table=table,
                optimize=True,
                verbose=False,
            )
        except Exception as exc:  # the exporter raises many types; name the role and keep the cause
            raise ExportError(f"ONNX export of {role} failed: {type(exc).__name__}: {exc}") from exc
    proto = program.model_proto
    _check_graph(proto, role)
    set_metadata(
        proto, {"egovlp.role": role, "egovlp.precision": precision, "egovlp.config_sha256": config_digest(model.config)}
    )
    save_model(proto, path)
    seconds = time.perf_counter() - t0
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return OnnxExport(role, path, opset_of(proto), seconds, len(proto.graph.node), ops)


# What the dynamo exporter prints on every export that says nothing about ours: torchvision's operators are not
# registered (the model uses none), a deprecation inside torch's own pytree code, and each dynamic axis named in
# several inputs (`batch`, `text_len`: one dimension by design) reported as a shared constraint.
_HARMLESS_WARNINGS = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    (UserWarning, r"# The axis name: \w+ will not be used, since it shares the same shape constraints"),
)
_REGISTRATION_LOGGER = "torch.onnx._internal.exporter._registration"
_HARMLESS_LOG = "torchvision is not installed. Skipping "


def _not_harmless(record) -> bool:
    """A logging filter: False for the exporter's torchvision line (above)."""
    return not record.getMessage().startswith(_HARMLESS_LOG)


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's known harmless messages (above) left out; every other warning and log line is shown."""
    import logging
    import warnings

    logger = logging.getLogger(_REGISTRATION_LOGGER)
    logger.addFilter(_not_harmless)
    try:
        with warnings.catch_warnings():
            for category, message in _HARMLESS_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        logger.removeFilter(_not_harmless)


def _check_graph(proto, role: str) -> None:
    """Declared properties of the graph: IO names as in the spec, no forbidden weights (no cross-attention in
    the dual encoders: dual mode never runs it)."""
    spec = ROLES[role]
    got_in = [i.name for i in proto.graph.input]
    got_out = [o.name for o in proto.graph.output]
    if got_in != spec.input_names or got_out != spec.output_names:
        raise ExportError(
            f"{role}: graph IO {got_in} -> {got_out} differs from the spec {spec.input_names} -> {spec.output_names}"
        )
    for init in proto.graph.initializer:
        for fragment in spec.forbidden_weights:
            if fragment in init.name:
                raise ExportError(
                    f"{role}: graph holds {init.name!r}, a cross-attention weight this role must not contain"
                )


def opset_of(proto) -> int:
    return max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)


def set_metadata(proto, values: dict[str, str]) -> None:
    keep = [p for p in proto.metadata_props if p.key not in values]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in values.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    return read_header(path)[0]


def read_header(path: str | os.PathLike) -> tuple[dict[str, str], list[str]]:
    """(metadata_props, external data locations) of an ONNX file in one parse by protobuf itself; external data is
    not read. The parse reads the whole file (a paper-size fusion graph: seconds, about twice its size in memory);
    a reader of our own that skipped the tensors would have to match how ONNX Runtime's protobuf reads every field
    of a hostile file, or let it name files the manifest does not hash."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}, external_data_locations(proto)


def external_data_locations(proto) -> list[str]:
    """The files the model's tensors keep their data in (`location`, relative to the model file's folder; "" for a
    tensor marked external without one), sorted. Every tensor counts: initializers, sparse initializers, tensor
    attributes (Constant), those of subgraphs (If/Loop/Scan bodies) and of local functions."""
    from onnx import TensorProto

    def graph_tensors(graph):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        for node in graph.node:
            yield from node_tensors(node)

    def node_tensors(node):
        yield from attribute_tensors(node.attribute)

    def attribute_tensors(attributes):
        for attr in attributes:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sparse in ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(attr.sparse_tensors):
                yield from (sparse.values, sparse.indices)
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from graph_tensors(sub)

    def all_tensors():
        yield from graph_tensors(proto.graph)
        for function in proto.functions:
            for node in function.node:
                yield from node_tensors(node)
            # the defaults of a function's attributes: a node's `ref_attr_name` takes them, and ONNX Runtime reads
            # their external data when it inlines the function
            yield from attribute_tensors(function.attribute_proto)

    return sorted(
        {
            next((kv.value for kv in t.external_data if kv.key == "location"), "")
            for t in all_tensors()
            if t.data_location == TensorProto.EXTERNAL
        }
    )


def save_model(proto, path: Path) -> None:
    """Write a single-file model atomically (temp file + rename): a crash never leaves half an artifact under the
    final name. ONNX protobufs are capped at 2 GiB; the paper model's largest graph (fusion, 1.08 GB fp32 at 16
    frames) fits."""
    import onnx

    if proto.ByteSize() >= 2**31:
        raise ExportError(f"{path.name}: {proto.ByteSize() / 2**30:.2f} GiB exceeds the 2 GiB protobuf limit")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        onnx.save_model(proto, str(tmp))
        os.replace(tmp, path)
    except OSError as exc:
        raise write_error(path, exc, proto.ByteSize()) from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def write_error(path: Path, cause: BaseException, needed: int | None = None, scratch: str | None = None) -> ExportError:
    """The ExportError of an artifact that could not be written to `path` (its temp file is gone by then), naming
    the file, the cause and the room left on its disk (and on the `scratch` folder's, where a tool writes a copy
    first): a paper-size fp32 graph is 0.2-1.1 GB, and a full disk shows up as a bare `[Errno 28]`, an ONNX Runtime
    "serialization failed" or a truncated file that names neither."""
    import shutil

    rooms = []
    for label, folder in (("on its disk", path.parent), (f"in {scratch}", scratch)):
        if folder is None:
            continue
        try:
            rooms.append(f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free {label}")
        except OSError:
            pass
    size = f" ({needed / 2**20:.0f} MiB)" if needed else ""
    free = f"; {', '.join(rooms)}" if rooms else ""
    return ExportError(f"{path}{size} could not be written: {type(cause).__name__}: {cause}{free}")
