"""What a paper-size (`random:base`, ~381 M parameters) export and its runtime do differently from the tiny model,
shown at tiny size: graphs of hundreds of megabytes verified at every load, the 2 GiB protobuf limit, a disk that
fills up and an interrupted export. No test here exports a base-size model."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from egovlp_deploy.export.onnx_export import external_data_locations, read_header
from onnx_graphs import external_tensor, graph_with_every_tensor_kind


def _graph_with_every_tensor_kind():
    """`graph_with_every_tensor_kind` with the metadata an export records."""
    model = graph_with_every_tensor_kind()
    for key, value in (("egovlp.role", "fusion"), ("egovlp.precision", "fp32"), ("egovlp.config_sha256", "ab12")):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model


# -- the header of a graph is read without its tensor bytes -------------------------------------------------------
def test_read_header_matches_a_full_parse(tmp_path):
    """The wire-format header reader finds the metadata and every external data location a full parse finds."""
    model = _graph_with_every_tensor_kind()
    path = tmp_path / "g.onnx"
    path.write_bytes(model.SerializeToString())
    meta, locations = read_header(path)
    assert meta == {"egovlp.role": "fusion", "egovlp.precision": "fp32", "egovlp.config_sha256": "ab12"}
    assert locations == external_data_locations(model) == ["branch.data", "const.data", "fn.data", "weights.data"]


def test_read_header_keeps_a_location_a_merged_tensor_would_read(tmp_path):
    """protobuf merges a singular message field written twice (here a Constant's tensor `t`, inside a second
    occurrence of ModelProto.graph): one half marks the tensor external, the other names its file. The reader
    records that location, which ONNX Runtime would read, rather than miss it."""
    import onnx

    named_half = external_tensor("m", "hidden.data", data_location=None).SerializeToString()
    attr = helper.make_attribute("value", external_tensor("m", None)).SerializeToString()
    attr += _field(5, named_half)  # AttributeProto.t again: merged into one tensor
    node = helper.make_node("Constant", [], ["m"]).SerializeToString() + _field(5, attr)  # NodeProto.attribute
    model = _graph_with_every_tensor_kind().SerializeToString() + _field(7, _field(1, node))  # graph.node
    path = tmp_path / "merged.onnx"
    path.write_bytes(model)
    assert "hidden.data" in external_data_locations(onnx.load(str(path), load_external_data=False))
    assert "hidden.data" in read_header(path)[1]


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def test_a_function_attributes_default_with_external_data_is_a_location(tmp_path):
    """A local function's Constant takes its tensor from the function's attribute default (`ref_attr_name`): ONNX
    Runtime inlines the function and reads that default's external file, which the location list left out."""
    import onnx

    default = helper.make_attribute("k", external_tensor("k", "default.data"))
    constant = helper.make_node("Constant", [], ["k"])
    constant.attribute.append(helper.make_attribute_ref("value", onnx.AttributeProto.TENSOR))
    constant.attribute[0].ref_attr_name = "k"
    function = helper.make_function(
        "local", "F", ["x"], ["z"], [constant, helper.make_node("Add", ["x", "k"], ["z"])],
        [helper.make_opsetid("", 18)], attributes=[], attribute_protos=[default],
    )  # fmt: skip
    graph = helper.make_graph(
        [helper.make_node("F", ["x"], ["z"], domain="local")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4])],
    )
    model = helper.make_model(graph, functions=[function])
    path = tmp_path / "f.onnx"
    path.write_bytes(model.SerializeToString())
    assert external_data_locations(model) == read_header(path)[1] == ["default.data"]


def test_a_graph_behind_an_over_long_field_tag_is_never_passed_as_clean(tmp_path):
    """ONNX Runtime's protobuf reads a 5-byte field tag and drops its top bits: ModelProto.graph written under the
    tag of field 7 + 2^29 is still the graph to it, with all its external files. The header must name them or
    refuse the file, never report a graph without external data."""
    model = _graph_with_every_tensor_kind()
    graph = model.graph.SerializeToString()
    model.ClearField("graph")
    hidden_tag = bytes([0xBA, 0x80, 0x80, 0x80, 0x10])  # (7 << 3 | 2) + 2^32, five bytes
    path = tmp_path / "hidden.onnx"
    path.write_bytes(model.SerializeToString() + hidden_tag + _varint(len(graph)) + graph)
    try:
        locations = read_header(path)[1]
    except Exception:  # refused: the manifest check fails closed
        return
    assert "weights.data" in locations


# -- a disk that fills up during an export --------------------------------------------------------------------------
# The child process writes under a file size limit (RLIMIT_FSIZE: Python ignores SIGXFSZ, so a write past it fails
# with EFBIG as a full disk fails with ENOSPC), the way a paper-size export of 0.2-1.1 GB per graph meets a full disk.
_FULL_DISK_CHILD = r"""
import json, resource, sys
from pathlib import Path
src, out = Path(sys.argv[1]), Path(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
import onnx
from egovlp_deploy.export.onnx_export import ExportError, save_model
from egovlp_deploy.export.precision import ort_optimize, to_int8
results = {}
for name, write in (
    ("save_model", lambda: save_model(onnx.load(str(src)), out / "saved.onnx")),
    ("ort_optimize", lambda: ort_optimize(src, out / "g.ort.onnx")),
    ("to_int8", lambda: to_int8(src, out / "g.int8.onnx")),
):
    try:
        write()
        results[name] = "written"
    except ExportError as exc:
        results[name] = "ExportError: " + str(exc)
    except BaseException as exc:
        results[name] = type(exc).__name__ + ": " + str(exc)
print(json.dumps(results))
"""


def _matmul_graph(rows: int = 1024, cols: int = 1024):
    weights = numpy_helper.from_array(np.random.default_rng(0).standard_normal((rows, cols), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])],
        [weights],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


def test_a_full_disk_is_an_export_error_naming_the_file(tmp_path):
    """Each ONNX writer of the export (the fp32 graph, ORT's optimized copy, the int8 graph) meets a full disk with
    an ExportError that names the file it could not write and the room left (one line, exit 1), never a bare
    `[Errno 28]` or ONNX Runtime's "Protobuf serialization failed" as a crash, and leaves no temp file."""
    import json
    import subprocess
    import sys

    src = tmp_path / "g.onnx"
    src.write_bytes(_matmul_graph().SerializeToString())  # 4 MiB of weights: over the child's 1 MiB limit
    out = tmp_path / "out"
    out.mkdir()
    child = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_CHILD, str(src), str(out)], capture_output=True, text=True, timeout=120
    )
    assert child.returncode == 0, child.stderr
    results = json.loads(child.stdout.strip().splitlines()[-1])
    for name, file in (("save_model", "saved.onnx"), ("ort_optimize", "g.ort.onnx"), ("to_int8", "g.int8.onnx")):
        assert results[name].startswith("ExportError: "), (name, results[name])
        assert f"{out / file}" in results[name] and "could not be written" in results[name], results[name]
        assert "MiB free on its disk" in results[name], results[name]
    assert sorted(p.name for p in out.iterdir()) == [], "temp or partial files left behind"


# -- an interrupted export, rerun --------------------------------------------------------------------------------
def test_a_rerun_without_ort_optimize_removes_the_optimized_copy_an_interrupted_run_left(tmp_path):
    """Ctrl-C while the export times ORT's optimized graph leaves `<role>.ort.onnx` (a graph's size: 0.6 GB for
    the paper video encoder) beside the interrupted export's record. A rerun with --ort-optimize never lists no
    optimized graph, and removes that file instead of leaving gigabytes nothing refers to."""
    from egovlp_deploy.export.manifest import INCOMPLETE, load_manifest
    from egovlp_deploy.export.runner import ExportOptions, run_export

    out = tmp_path / "engines"
    out.mkdir()
    (out / INCOMPLETE).write_text('{"tokenizer_files": []}')  # what the interrupted run wrote first
    stale = out / "onnx" / "fp32" / "text_encoder.ort.onnx"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an optimized graph of the interrupted run")
    opts = ExportOptions(roles=("text_encoder",), max_text_len=8, ort_optimize="never", task_checks=False)
    result = run_export("random:tiny", out, opts, quiet=True)
    assert result.passed and not (out / INCOMPLETE).exists()
    assert [a.file for a in load_manifest(out).artifacts] == ["onnx/fp32/text_encoder.onnx"]
    assert not stale.exists()


# -- the ORT-optimized copy: timed briefly, one session at a time ---------------------------------------------------
def test_timing_the_ort_optimized_copy_is_bounded_and_holds_one_session(tmp_path, monkeypatch):
    """`--ort-optimize auto` times each graph plain and optimized. A paper-size video encoder takes seconds per run
    on a small CPU: 8 runs per variant made this step minutes per role, and both sessions (each holding the
    weights) were alive at once. Now a slow graph runs 1 + 3 times per variant, one session at a time."""
    import shutil

    from egovlp_deploy.export import precision, runner
    from egovlp_deploy.export.manifest import Manifest
    from egovlp_deploy.model.factory import load_model

    model, _ = load_model("random:tiny")
    src = tmp_path / "text_encoder.onnx"
    src.write_bytes(_matmul_graph(8, 8).SerializeToString())
    monkeypatch.setattr(precision, "ort_optimize", lambda a, b: shutil.copyfile(a, b))
    calls, live, most = [], [0], [0]

    class Session:
        def __init__(self, path):
            self.path = path
            live[0] += 1
            most[0] = max(most[0], live[0])

        def __call__(self, inputs):
            calls.append(self.path.name)
            import time

            time.sleep(0.02)  # "slow": longer than the whole timing budget below
            return {}

        def __del__(self):
            live[0] -= 1

    monkeypatch.setattr(runner, "_ort_run", lambda path, threads=None: Session(path))
    monkeypatch.setattr(runner, "ORT_TIMING_SECONDS", 0.01, raising=False)
    opts = runner.ExportOptions(roles=("text_encoder",), max_text_len=8)
    manifest = Manifest(source_checkpoint={}, model_config=model.config.to_dict(), export={})
    progress = runner.Progress(1, quiet=True)
    steps = runner._Steps(model, opts, tmp_path, manifest, progress, result=None, journal=None, task_set=None)
    runner._maybe_optimized(steps, "text_encoder", src, "fp32", 18)
    assert calls.count("text_encoder.onnx") == 4 and calls.count("text_encoder.ort.onnx") == 4, calls
    assert most[0] == 1, "the plain graph's session was alive while the optimized one loaded"


# -- sessions held by an export ---------------------------------------------------------------------------------------
def test_an_export_holds_the_sessions_of_one_precision_at_a_time(tmp_path, monkeypatch):
    """Each ONNX Runtime session holds its graph's weights: a paper-size fp32 export held all five (3 GB of graphs,
    11 GB peak RSS with the torch model), and `--precision fp32,fp16,int8` would hold fifteen until the task checks
    at the end. Now a session is open while its graph is validated, and the task checks of a precision open its
    roles' sessions again and close them before the next precision's."""
    from egovlp_deploy.export import runner
    from egovlp_deploy.export.runner import ExportOptions, run_export

    real, live, most = runner._ort_run, [0], [0]

    class Counted:
        def __init__(self, path, threads=None):
            self.run = real(path, threads)
            live[0] += 1
            most[0] = max(most[0], live[0])

        def __call__(self, inputs):
            return self.run(inputs)

        def __del__(self):
            live[0] -= 1

    monkeypatch.setattr(runner, "_ort_run", Counted)
    few = runner.random_task_set
    monkeypatch.setattr(runner, "random_task_set", lambda model: few(model, questions=2, choices=2))  # (time)
    opts = ExportOptions(
        roles=("video_encoder", "text_encoder"), precisions=("fp32", "int8"), max_text_len=8, ort_optimize="never"
    )
    result = run_export("random:tiny", tmp_path / "engines", opts, quiet=True)
    assert result.passed, [f for c in result.checks for f in c.failures]
    assert {"task/fp32", "task/int8"} <= {c.name for c in result.checks}
    assert most[0] == 2, f"{most[0]} sessions open at once (the task checks of one precision need 2)"


# -- the task checks' torch reference, in batches ---------------------------------------------------------------------
def test_task_checks_run_torch_at_most_max_batch_clips_at_a_time(monkeypatch):
    """The EgoMCQ task check scored every candidate clip (6 questions x 5 clips) through torch's `fuse` in one
    batch: with paper-size 16-frame clips that batch took the export to 16 GB peak RSS. Now torch sees at most
    --max-batch clips (or one question's) per call, and the answers are those of the whole batch."""
    import torch

    from egovlp_deploy.export.specs import ROLES
    from egovlp_deploy.export.validate import random_task_set, task_agreement, torch_outputs
    from egovlp_deploy.model.factory import load_model

    model, _ = load_model("random:tiny")
    tasks = random_task_set(model)

    def as_run(role):
        return lambda inputs: torch_outputs(model, role, {k: torch.from_numpy(v) for k, v in inputs.items()})

    runs = {role: as_run(role) for role in ROLES}
    batches = []
    fuse = model.fuse

    def counted_fuse(video, *args, **kwargs):
        batches.append(video.shape[0])
        return fuse(video, *args, **kwargs)

    monkeypatch.setattr(model, "fuse", counted_fuse)
    check = task_agreement(model, runs, "fp32", tasks, max_batch=8)
    assert check.passed, check.failures
    assert max(batches) <= 8, batches
    for mode in ("dual", "fusion", "ensemble"):
        assert check.metrics["egomcq"][mode]["answer_agreement"] == 1.0
