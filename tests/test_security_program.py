"""Hostile torch.export program files: operators inside aten that reach files, shape expressions whose arithmetic
never ends, and malformed programs are each a ProgramError, before torch runs anything of them.

The program here is a small module exported in the test (a reshape over a dynamic batch, so the file holds shape
expressions), written the way export_program writes one."""

import json
import signal

import pytest
import torch

from egovlp_deploy.checkpoint import save_safetensors
from egovlp_deploy.export.program import FORMAT, INFO_KEY, PROGRAM_KEY, ProgramError, _program_json, load_program


class _Small(torch.nn.Module):
    def forward(self, x):
        return x.reshape(-1) * 2 + 1


@pytest.fixture(scope="module")
def program_json():
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(_Small(), (torch.ones(4, 3),), dynamic_shapes=({0: batch},))
    return _program_json(program)


def _info():
    return {"format": FORMAT, "role": "video_encoder", "device": "cpu", "precision": "fp32", "torch": torch.__version__}


def _write(path, program_text, info_text=None):
    metadata = {PROGRAM_KEY: program_text, INFO_KEY: info_text or json.dumps(_info())}
    save_safetensors({"state_dict/unused": torch.ones(1)}, path, metadata=metadata)
    return path


def _edited(program_json, edit):
    data = json.loads(json.dumps(program_json))
    edit(data)
    return json.dumps(data)


def _first_expr(data):
    def find(x):
        if isinstance(x, dict):
            if "expr_str" in x:
                return x
            x = list(x.values())
        if isinstance(x, list):
            for value in x:
                found = find(value)
                if found is not None:
                    return found
        return None

    return find(data["graph_module"]["graph"])


@pytest.fixture
def deadline():
    """Turns a loader that does not return within 10 s into a test failure instead of a hang."""

    def expired(*_):
        raise AssertionError("the loader did not return within 10 s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_the_unedited_program_loads(program_json, tmp_path):
    module = load_program(_write(tmp_path / "p.safetensors", json.dumps(program_json))).module()
    assert torch.equal(module(torch.ones(2, 3)), torch.full((6,), 3.0))


@pytest.mark.parametrize("shared", [True, False])
def test_from_file_is_refused_although_it_is_aten(program_json, tmp_path, shared):
    """aten::from_file maps any file into a tensor; with shared=True an in-place op writes back to the file."""
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET!!")

    def edit(data):
        node = data["graph_module"]["graph"]["nodes"][0]
        node["target"] = "torch.ops.aten.from_file.default"
        node["inputs"] = [
            {"name": "filename", "arg": {"as_string": str(secret)}, "kind": 1},
            {"name": "shared", "arg": {"as_bool": shared}, "kind": 1},
            {"name": "size", "arg": {"as_int": 8}, "kind": 1},
            {"name": "dtype", "arg": {"as_scalar_type": 1}, "kind": 2},
        ]

    path = _write(tmp_path / "p.safetensors", _edited(program_json, edit))
    with pytest.raises(ProgramError, match="operator 'torch.ops.aten.from_file.default' is not one the loader"):
        load_program(path).module()(torch.ones(2, 3)).add_(0)
    assert secret.read_text() == "SECRET!!"


@pytest.mark.parametrize(
    "expr",
    [
        "Pow(Integer(10), Integer(100000000000))",
        "Pow(Symbol('s77', positive=True, integer=True), Integer(100000000000))",
        "Pow(Pow(Pow(Pow(Pow(Integer(99), Integer(16)), Integer(16)), Integer(16)), Integer(16)), Integer(16))",
        "Pow(Symbol('s77', positive=True, integer=True), 's77')",
    ],
)
def test_shape_arithmetic_that_would_not_end_is_refused(program_json, tmp_path, deadline, expr):
    path = _write(tmp_path / "p.safetensors", _edited(program_json, lambda d: _first_expr(d).update(expr_str=expr)))
    with pytest.raises(ProgramError, match="shape expression"):
        load_program(path)


def test_shape_expressions_of_exported_models_pass(program_json, tmp_path):
    expr = "Mul(Integer(4), Pow(Symbol('s77', positive=True, integer=True), Integer(2)))"
    path = _write(tmp_path / "p.safetensors", _edited(program_json, lambda d: _first_expr(d).update(expr_str=expr)))
    try:
        load_program(path)
    except ProgramError as exc:  # torch may find the edited sizes inconsistent: never the shape check itself
        assert "shape expression" not in str(exc)


def test_division_by_zero_in_a_shape_is_a_program_error(program_json, tmp_path):
    expr = "FloorDiv(Integer(1), Integer(0))"
    path = _write(tmp_path / "p.safetensors", _edited(program_json, lambda d: _first_expr(d).update(expr_str=expr)))
    with pytest.raises(ProgramError, match="torch cannot rebuild the program"):
        load_program(path)


@pytest.mark.parametrize("where", ["program", "info"])
def test_deeply_nested_header_json_is_a_program_error(program_json, tmp_path, where):
    nested = "[" * 100_000 + "]" * 100_000
    path = tmp_path / "p.safetensors"
    if where == "program":
        _write(path, nested)
    else:
        _write(path, json.dumps(program_json), info_text=nested)
    with pytest.raises(ProgramError, match="nested too deeply"):
        load_program(path)
