"""torch.export programs: exported through the CLI from the tiny model (all four roles, CPU fp32), validated, run by
the runtime's `program` backend in this process and in a fresh one, and refused when hostile."""

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from egovlp_deploy.checkpoint import load_safetensors, save_safetensors
from egovlp_deploy.export.program import INFO_KEY, PROGRAM_KEY, PROGRAM_ROLES, ProgramError, load_program
from egovlp_deploy.export.specs import ROLES
from egovlp_deploy.runtime.engines import EngineError, Runtime


@pytest.fixture(scope="module")
def program_export(tmp_path_factory, tiny_trained_like):
    from egovlp_deploy.cli import main

    ckpt, model = tiny_trained_like
    out = tmp_path_factory.mktemp("program") / "engines"
    code = main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--format", "program", "--quiet"])
    return out, model, code


def _file(out, role):
    return out / "program" / "cpu_fp32" / f"{role}.safetensors"


def test_export_validates_every_role_and_leaves_out_unused_weights(program_export):
    out, model, code = program_export
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    entries = {a["role"]: a for a in manifest["artifacts"] if a["format"] == "program"}
    assert sorted(entries) == sorted(PROGRAM_ROLES)
    assert all(e["validation"]["passed"] and e["device"] == "cpu" for e in entries.values())
    for role in PROGRAM_ROLES:
        names = [k.split("/", 1)[1] for k in load_safetensors(_file(out, role))]
        assert not [n for n in names if any(f in n for f in ROLES[role].forbidden_weights)]
        assert len(names) < len(model.state_dict())
    video = [k for k in load_safetensors(_file(out, "video_encoder"))]
    assert video and not [k for k in video if "text_model" in k]  # the dual video encoder reads no text weight
    # the EgoMCQ answers of the four programs (fusion re-ranked from the prefixes) against torch fp32
    tasks = manifest["validation"]["task/program-cpu-fp32"]
    assert tasks["passed"] and tasks["questions"] == 6, tasks
    assert all(tasks["egomcq_via_head"][m]["answer_agreement"] == 1.0 for m in ("dual", "fusion", "ensemble"))
    assert tasks["retrieval"]["t2v_top1_agreement"] == 1.0


def test_program_backend_computes_what_the_torch_backend_computes(program_export):
    out, _, _ = program_export
    torch_rt = Runtime(out, backend="torch")
    program_rt = Runtime(out, backend="program", graphs=True)
    for role in PROGRAM_ROLES:
        inputs = torch_rt.example(role, batch=3, text_len=9)
        want, got = torch_rt.runner(role)(**inputs), program_rt.runner(role)(**inputs)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6, err_msg=f"{role}/{name}")
    described = {r["role"]: r for r in program_rt.describe()}
    assert described["video_encoder"]["provider"] == "cpu program"
    assert described["video_encoder"]["graphs"] == "no CUDA graphs on cpu: runs eagerly"


def test_loads_and_matches_in_a_fresh_process(program_export, tmp_path):
    """What a deployment does: a new interpreter with only the export folder (weights, graph) loads and runs it."""
    out, model, _ = program_export
    rt = Runtime(out, backend="torch")
    inputs = {role: rt.example(role, batch=2, text_len=7) for role in ("video_encoder", "text_encoder")}
    np.savez(tmp_path / "inputs.npz", **{f"{r}.{k}": v for r, d in inputs.items() for k, v in d.items()})
    script = textwrap.dedent(
        f"""
        import numpy as np
        from egovlp_deploy.runtime.engines import Runtime
        rt = Runtime({str(out)!r}, backend="program")
        data = np.load({str(tmp_path / "inputs.npz")!r})
        result = {{}}
        for role in ("video_encoder", "text_encoder"):
            feed = {{k.split(".", 1)[1]: data[k] for k in data.files if k.startswith(role + ".")}}
            result.update({{f"{{role}}.{{k}}": v for k, v in rt.runner(role)(**feed).items()}})
        np.savez({str(tmp_path / "outputs.npz")!r}, **result)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = np.load(tmp_path / "outputs.npz")
    for role, feed in inputs.items():
        for name, want in rt.runner(role)(**feed).items():
            np.testing.assert_allclose(got[f"{role}.{name}"], want, rtol=0, atol=1e-6)


def test_no_task_checks_leave_out_the_task_check_and_no_program_role_is_refused(tiny_trained_like, tmp_path, capsys):
    from egovlp_deploy.cli import main

    ckpt, _ = tiny_trained_like
    out = tmp_path / "no-task-checks"
    argv = ["export", "--checkpoint", str(ckpt), "--out", str(out), "--format", "program", "--quiet"]
    assert main([*argv, "--roles", "text_encoder", "--no-task-checks"]) == 0
    validation = json.loads((out / "manifest.json").read_text())["validation"]
    assert not [k for k in validation if k.startswith("task/")], sorted(validation)
    nothing = tmp_path / "fusion"  # programs build every role but fusion: this export would build nothing
    argv = ["export", "--checkpoint", str(ckpt), "--out", str(nothing), "--format", "program", "--roles", "fusion"]
    assert main(argv) == 2
    assert "would export nothing" in capsys.readouterr().err and not nothing.exists()


def test_compiled_program_matches_eager(program_export):
    out, _, _ = program_export
    eager = Runtime(out, backend="program", warmup=False)
    compiled = Runtime(out, backend="program", compile=True, warmup=False)
    inputs = eager.example("text_encoder", batch=2, text_len=9)
    want, got = eager.runner("text_encoder")(**inputs), compiled.runner("text_encoder")(**inputs)
    assert compiled.describe()[0]["provider"] == "cpu program + compile"
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5)


def test_options_that_do_not_apply_are_errors(program_export):
    out, _, _ = program_export
    with pytest.raises(EngineError, match="compile is for the torch and program backends"):
        Runtime(out, backend="onnxruntime", compile=True)
    with pytest.raises(EngineError, match="a torch.export program exported for cpu, asked to run on cuda"):
        Runtime(out, backend="program", device="cuda").runner("text_encoder")


# -- hostile files -----------------------------------------------------------------------------------------------
def _rewrite(src, dst, edit_program=None, edit_info=None):
    """A copy of the program file `src` at `dst` with its program JSON and/or info changed (tensors unchanged)."""
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    data, info = json.loads(meta[PROGRAM_KEY]), json.loads(meta[INFO_KEY])
    if edit_program:
        edit_program(data)
    if edit_info:
        edit_info(info)
    tensors = load_safetensors(src)
    save_safetensors(tensors, dst, metadata={PROGRAM_KEY: json.dumps(data), INFO_KEY: json.dumps(info)})
    return dst


def _nodes(data):
    return data["graph_module"]["graph"]["nodes"]


def _first_expr(data):
    values = data["graph_module"]["graph"]["sym_int_values"]
    return next(v["as_expr"] for v in values.values() if "as_expr" in v)


PWNED = "__import__('pathlib').Path('{marker}').touch()"

HOSTILE = {
    "operator": (lambda d, m: _nodes(d)[0].update(target="torch.os.system"), "operator 'torch.os.system'"),
    "extension operator": (lambda d, m: _nodes(d)[1].update(target="#evil.op"), "operator '#evil.op'"),
    "attribute getter": (
        lambda d, m: _nodes(d)[1].update(target="_operator.attrgetter"),
        "operator '_operator.attrgetter'",
    ),
    "shape expression": (lambda d, m: _first_expr(d).update(expr_str=PWNED.format(marker=m)), "names '__import__'"),
    "shape expression attribute": (
        lambda d, m: _first_expr(d).update(expr_str="Symbol.__class__"),
        "has a character the loader does not allow",
    ),
    "guard": (lambda d, m: d.setdefault("guards_code", []).append(PWNED.format(marker=m)), "is not a size check"),
    "node metadata": (
        lambda d, m: _nodes(d)[0].update(metadata={"nn_module_stack": "a,b,os.system"}),
        "node metadata",
    ),
    "subgraph argument": (
        lambda d, m: _nodes(d)[0]["inputs"].append({"name": "g", "arg": {"as_graph": {"name": "x"}}}),
        "as_graph argument",
    ),
    "custom object": (
        lambda d, m: d["graph_module"]["graph"].update(custom_obj_values={"x": {"name": "x"}}),
        "custom objects",
    ),
    "range constraint": (lambda d, m: d["range_constraints"].update({"__import__('os')": {}}), "range constraint"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_program_is_refused_before_torch_reads_it(program_export, tmp_path, monkeypatch, case):
    out, _, _ = program_export
    edit, message = HOSTILE[case]
    marker = tmp_path / "PWNED"
    role = "text_encoder" if case == "guard" else "video_encoder"
    bad = _rewrite(_file(out, role), tmp_path / f"{role}.safetensors", lambda d: edit(d, marker))

    def must_not_run(*args, **kwargs):
        raise AssertionError("torch deserialized a program the loader should have refused")

    from torch._export.serde import serialize as serde

    monkeypatch.setattr(serde, "deserialize", must_not_run)
    with pytest.raises(ProgramError, match=message):
        load_program(bad)
    assert not marker.exists()


def test_a_hostile_program_in_an_engine_folder_is_an_engine_error(program_export, tmp_path):
    """An export folder from elsewhere comes with its own manifest, so its hashes match: the program check still
    refuses the file."""
    import shutil

    from egovlp_deploy.hashing import sha256_file

    out, _, _ = program_export
    folder = tmp_path / "engines"
    shutil.copytree(out, folder)
    path = _rewrite(_file(out, "video_encoder"), _file(folder, "video_encoder"),
                    lambda d: _nodes(d)[0].update(target="torch.os.system"))  # fmt: skip
    manifest = json.loads((folder / "manifest.json").read_text())
    for a in manifest["artifacts"]:
        if a["file"] == "program/cpu_fp32/video_encoder.safetensors":
            a["sha256"], a["bytes"] = sha256_file(path), path.stat().st_size
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="operator 'torch.os.system' is not one the loader allows"):
        Runtime(folder, backend="program").runner("video_encoder")


def test_files_that_are_not_programs_of_this_torch_are_named_errors(program_export, tmp_path):
    out, _, _ = program_export
    src = _file(out, "text_encoder")
    other = _rewrite(src, tmp_path / "other.safetensors", edit_info=lambda i: i.update(torch="1.0.0"))
    with pytest.raises(ProgramError, match="exported with torch 1.0.0, running torch"):
        load_program(other)
    plain = tmp_path / "plain.safetensors"
    save_safetensors({"w": torch.ones(2)}, plain)
    with pytest.raises(ProgramError, match="not an egovlp-deploy program"):
        load_program(plain)
    archive = tmp_path / "archive.safetensors"  # torch.export.save's zip archive (it holds pickles) is refused unread
    archive.write_bytes(b"PK\x03\x04" + bytes(64))
    with pytest.raises(ProgramError, match="not a readable safetensors file"):
        load_program(archive)


def test_programs_with_the_triton_kernels_as_egovlp_operators(tiny_trained_like, tmp_path):
    """What `--attention custom-ops` writes on CUDA, with the kernels in Triton's CPU interpreter: every role's
    program holds the egovlp:: operators (not the kernels inlined), passes the loader's check, rebuilds in a fresh
    interpreter that never imported the kernels, and computes what the eager model with the kernels computes."""
    import os

    from safetensors import safe_open

    from egovlp_deploy.export.program import export_program
    from egovlp_deploy.export.specs import example_inputs, role_module

    assert os.environ.get("TRITON_INTERPRET") == "1"  # tests/conftest.py: the kernels run on the CPU
    _, model = tiny_trained_like
    model = model.eval()
    inputs, want = {}, {}
    for role in PROGRAM_ROLES:
        path = tmp_path / f"{role}.safetensors"
        export_program(model, role, path, max_batch=4, max_text_len=16, attention="triton")
        with safe_open(str(path), framework="pt") as f:
            nodes = json.loads(f.metadata()[PROGRAM_KEY])["graph_module"]["graph"]["nodes"]
        targets = {n["target"] for n in nodes}
        assert {t for t in targets if "egovlp" in t} == {
            "video_encoder": {"torch.ops.egovlp.divided_attention.default"},
            "text_encoder": {"torch.ops.egovlp.cross_attention.default"},  # the text self-attention kernel
            "video_fusion_prefix": {"torch.ops.egovlp.divided_attention.default"},
            "fusion_head": {"torch.ops.egovlp.divided_attention.default", "torch.ops.egovlp.cross_attention.default"},
        }[role], role
        assert not [t for t in targets if "triton" in t.lower()], targets
        inputs[role] = example_inputs(model, role, 2, 9, seed=3, dtype=torch.float32, device="cpu")
        model.set_attention_backend("triton")
        try:
            with torch.no_grad():
                out = role_module(model, role)(**inputs[role])
        finally:
            model.set_attention_backend("reference")
        want[role] = [x.numpy() for x in (out if isinstance(out, (tuple, list)) else (out,))]
    np.savez(tmp_path / "inputs.npz", **{f"{r}.{k}": v.numpy() for r, d in inputs.items() for k, v in d.items()})
    script = textwrap.dedent(
        f"""
        import sys, numpy as np, torch
        from egovlp_deploy.export.program import program_module
        assert "egovlp_deploy.kernels.divided_attention" not in sys.modules  # the loader registers the operators
        data = np.load({str(tmp_path / "inputs.npz")!r})
        result = {{}}
        for role in {list(PROGRAM_ROLES)!r}:
            feed = {{k.split(".", 1)[1]: torch.from_numpy(data[k]) for k in data.files if k.startswith(role + ".")}}
            with torch.no_grad():
                out = program_module({str(tmp_path)!r} + f"/{{role}}.safetensors")(**feed)
            for i, x in enumerate(out if isinstance(out, (tuple, list)) else (out,)):
                result[f"{{role}}.{{i}}"] = x.numpy()
        np.savez({str(tmp_path / "outputs.npz")!r}, **result)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    got = np.load(tmp_path / "outputs.npz")
    for role, outputs in want.items():
        for i, expected in enumerate(outputs):
            np.testing.assert_allclose(got[f"{role}.{i}"], expected, rtol=0, atol=1e-5, err_msg=f"{role}/{i}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (fp16 program with the Triton kernels)")
def test_cuda_fp16_program_with_kernels_compiled_and_captured(tiny_trained_like, tmp_path):
    from egovlp_deploy.cli import main

    ckpt, _ = tiny_trained_like
    out = tmp_path / "engines"
    argv = ["export", "--checkpoint", str(ckpt), "--out", str(out), "--format", "program", "--precision", "fp16"]
    # the task checks of fp16 programs are the gpu_check precision step's (a trained model, its questions)
    assert main(argv + ["--torch-device", "cuda", "--attention", "custom-ops", "--no-task-checks", "--quiet"]) == 0
    path = out / "program" / "cuda_fp16" / "video_encoder.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert "torch.ops.egovlp.divided_attention" in f.metadata()[PROGRAM_KEY]
    eager = Runtime(out, backend="torch", precision="fp16", device="cuda", attention="reference")
    fast = Runtime(out, backend="program", precision="fp16", device="cuda", compile=True, graphs=True)
    for role in PROGRAM_ROLES:
        inputs = eager.example(role, batch=1, text_len=13)
        want, got = eager.runner(role)(**inputs), fast.runner(role)(**inputs)
        got = fast.runner(role)(**inputs)  # the second call replays the captured graph
        for name in want:
            cos = float(
                np.dot(want[name].ravel(), got[name].ravel())
                / (np.linalg.norm(want[name]) * np.linalg.norm(got[name]) + 1e-12)
            )
            assert cos > 0.999, (role, name, cos)
    for r in fast.describe():
        assert re.search(r"[1-9][0-9]* captured", r["graphs"]) and "eager" not in r["graphs"], r
