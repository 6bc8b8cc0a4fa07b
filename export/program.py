"""torch.export programs as artifacts: one safetensors file per role holding the weights and the program's graph as
JSON, loaded without unpickling anything and compiled (or not) by the process that runs it.

Why a second compiled format beside AOTInductor: an AOTInductor package carries native code built ahead of time,
and its CUDA packages do not load on every torch (docs/export.md). A program carries no native code; the runtime
turns it into a module (`torch.export`'s own deserializer), optionally compiles it with Inductor on its own device
(`torch.compile`, whose on-disk cache makes later loads fast) and captures it in CUDA graphs (runtime/graphs.py).

The file: `<role>.safetensors` whose tensors are the program's parameters and buffers (`state_dict/<name>`) and
lifted constants (`constants/<name>`), and whose header metadata holds the serialized program (`egovlp.program`,
torch's schema JSON) and the facts it was built with. `torch.export.save` is not used: its archive stores sample
inputs with `torch.save`, and `torch.export.load` falls back to `torch.load(weights_only=False)`, i.e. unpickling.

A program is code (operators to call, symbolic shape expressions that sympy parses with `eval`, shape guards that
torch compiles into Python), so the loader reads nothing of it before `check_program` has accepted every piece:
operators only from aten, the project's `egovlp` kernels and a named set of Python's `operator` functions
(arithmetic, comparisons, getitem), torch's symbolic-size helpers and math's rounding; shape expressions built
only from sympy's integer arithmetic; guards only of the form `L['name'].size()[i] == ...`; no custom objects, no
subgraphs. Node metadata (stack traces, module paths) is dropped at export. A file that breaks any rule is a
`ProgramError` naming what, before torch deserializes anything.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .onnx_export import dynamic_shapes, trace_sizes
from .specs import AOTI_ROLES, ROLES, TORCH_DTYPES, converted, example_inputs, export_patches, role_module

FORMAT = "egovlp-deploy torch.export program 1"
PROGRAM_KEY = "egovlp.program"
INFO_KEY = "egovlp.program_info"
PROGRAM_ROLES = AOTI_ROLES  # the same roles as AOTInductor: `fusion` is the composition of two of them


class ProgramError(ValueError):
    """A program file that is not one of ours, or that asks for something the loader does not allow."""


@dataclass
class ProgramExport:
    role: str
    path: Path
    device: str
    precision: str
    seconds: float
    dropped_weights: int  # parameters/buffers of the model that this role's graph never reads


# -- export ------------------------------------------------------------------------------------------------------------
def _drop_unused_inputs(program) -> int:
    """Removes the parameters, buffers and constants the graph never reads (a role module wraps the whole model, and
    torch.export lifts every weight of it); returns how many. The dual video encoder, for example, keeps no text
    weights and no cross-attention."""
    from torch.export.graph_signature import InputKind

    weights = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
    graph = program.graph_module.graph
    unused = {n.name: n for n in graph.nodes if n.op == "placeholder" and not n.users}
    kept = []
    for spec in program.graph_signature.input_specs:
        name = getattr(spec.arg, "name", None)
        if spec.kind in weights and name in unused:
            graph.erase_node(unused[name])
        else:
            kept.append(spec)
    dropped = len(program.graph_signature.input_specs) - len(kept)
    program.graph_signature.input_specs[:] = kept
    still_read = {spec.target for spec in kept if spec.target is not None}  # a tied weight stays while one reads it
    for store in (program.state_dict, program.constants):
        for target in [t for t in store if t not in still_read]:
            del store[target]
    program.graph_module.recompile()
    return dropped


def _program_json(program) -> dict:
    """The serialized program as a JSON object, without node metadata (stack traces, module paths)."""
    from torch._export.serde import serialize as serde

    wanted = inspect.signature(serde.serialize).parameters
    skip = {
        k: False for k in ("serialize_state_dict", "serialize_constants", "serialize_example_inputs") if k in wanted
    }
    data = json.loads(serde.serialize(program, **skip).exported_program)

    def strip(x):
        if isinstance(x, dict):
            for key, value in x.items():
                if key == "metadata" and isinstance(value, dict):
                    value.clear()
                else:
                    strip(value)
        elif isinstance(x, list):
            for value in x:
                strip(value)

    strip(data["graph_module"]["graph"])
    return data


@contextlib.contextmanager
def exported(model, role: str, *, max_batch: int, max_text_len: int, device: str, precision: str, attention: str):
    """torch.export of `role` built on `device` in `precision`, with dynamic batch and text length. Valid inside the
    block only: the program shares the model's parameters, which go back to their own device and dtype on exit."""
    batch, text_len = trace_sizes(max_batch, max_text_len)
    with converted(model, device, precision) as work:
        dtype = TORCH_DTYPES[precision]
        inputs = example_inputs(work, role, batch, text_len, seed=1234, dtype=dtype, device=device)
        with torch.no_grad(), export_patches(work, attention):
            yield torch.export.export(
                role_module(work, role),
                (),
                kwargs=inputs,
                strict=False,
                dynamic_shapes=dynamic_shapes(role, max_batch, max_text_len),
            )


def export_program(
    model,
    role: str,
    path: str | os.PathLike,
    *,
    max_batch: int,
    max_text_len: int,
    device: str = "cpu",
    precision: str = "fp32",
    attention: str = "reference",
) -> ProgramExport:
    """torch.export `role` (dynamic batch and text length) and write it to `path` (atomic)."""
    from egovlp_deploy.checkpoint import save_safetensors

    if role not in PROGRAM_ROLES:
        raise ValueError(f"torch.export programs are written for {PROGRAM_ROLES}, not {role!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sizes = {"max_batch": max_batch, "max_text_len": max_text_len}
    with exported(model, role, device=device, precision=precision, attention=attention, **sizes) as program:
        dropped = _drop_unused_inputs(program)
        for name in list(program.state_dict) + list(program.constants):
            if any(fragment in name for fragment in ROLES[role].forbidden_weights):
                raise ProgramError(f"{role}: the program reads {name!r}, a cross-attention weight it must not use")
        data = _program_json(program)
        check_program(data, where=str(path))  # what the loader will demand, checked before anything is written
        tensors = {f"state_dict/{k}": v.detach().clone() for k, v in program.state_dict.items()}
        tensors.update({f"constants/{k}": v.detach().clone() for k, v in program.constants.items()})
    info = {
        "format": FORMAT,
        "role": role,
        "device": device.split(":")[0],
        "precision": precision,
        "attention": attention,
        "torch": torch.__version__,
        **sizes,
    }
    metadata = {PROGRAM_KEY: json.dumps(data, separators=(",", ":")), INFO_KEY: json.dumps(info)}
    save_safetensors(tensors, path, metadata=metadata)
    return ProgramExport(role, path, device, precision, time.perf_counter() - t0, dropped)


# -- what a program may contain ----------------------------------------------------------------------------------------
# Operators: an aten or egovlp overload, a function of Python's `operator` module (getitem, mul, ...), torch's
# symbolic-size helpers or math's rounding.
# The `operator` functions are named one by one: others (attrgetter, methodcaller, call) reach any attribute.
_TARGET = re.compile(
    r"torch\.ops\.(aten|egovlp)\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+"
    r"|_operator\.(getitem|add|sub|mul|floordiv|truediv|mod|pow|neg|pos|abs|eq|ne|lt|le|gt|ge|and_|or_|not_)"
    r"|torch\.sym_(max|min|not|float|int|ite|sum)|math\.(ceil|floor|trunc|sqrt)"
)
# Shape expressions as sympy's srepr writes them: integer arithmetic over named positive integer symbols. sympy
# parses them with `eval`, so only these names, integer literals and symbol names in quotes get through.
_SYMPY_NAMES = {
    "Symbol", "Integer", "Add", "Mul", "Pow", "Mod", "FloorDiv", "CeilToInt", "FloorToInt", "Max", "Min",
    "PythonMod", "CleanDiv", "IntTrueDiv", "Rational", "positive", "integer", "True", "False",
}  # fmt: skip
_SYMPY_TOKEN = re.compile(r"\s*(?:([A-Za-z_][A-Za-z0-9_]*)|('[a-z][a-z0-9_]*')|(-?[0-9]+)|([(),=]))")
# Guards torch compiles into the module's input check: size equalities and bounds, nothing else.
_SIZE = r"L\['[A-Za-z_][A-Za-z0-9_]*'\]\.size\(\)\[[0-9]+\]"
_GUARD = re.compile(rf"{_SIZE} (==|!=|<=|>=|<|>) (?:{_SIZE}|-?[0-9]+)")
# aten operators that reach outside tensors: from_file maps any file (shared=True writes back to it), save writes
# one, _print and warn write to the process's streams, set_grad_enabled changes the process's autograd state.
_FORBIDDEN_OPERATORS = re.compile(r"torch\.ops\.aten\.(from_file|save|_print|warn|set_grad_enabled)\.[A-Za-z0-9_]+")
# Shape expressions are evaluated with the sizes the file gives (hints, bounds): integer literals beyond 64 bits, an
# exponent that is not a small integer literal or a power of a power would make sympy compute numbers of billions
# of digits from a line of text (the loader would hang), so they are refused. Exported models raise sizes to
# small powers only (a flattened square: `Pow(s, Integer(2))`).
_MAX_LITERAL_DIGITS = 20
_MAX_EXPONENT = 16
# Node argument kinds that would bring in subgraphs or opaque objects
_FORBIDDEN_ARGUMENTS = {"as_graph", "as_custom_obj", "as_custom_objs", "as_operator", "as_operators"}


def _check_sympy(text: str, where: str) -> None:
    pos, depth = 0, 0
    calls: list[list] = []  # the open calls, innermost last: [function name, index of the argument being read]
    last_name = None
    while pos < len(text):
        m = _SYMPY_TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise ProgramError(f"{where}: shape expression {text[:80]!r} has a character the loader does not allow")
        name, _, number, punct = m.groups()
        if name is not None and name not in _SYMPY_NAMES:
            raise ProgramError(
                f"{where}: shape expression {text[:80]!r} names {name!r}, which the loader does not allow"
            )
        if number is not None and len(number.lstrip("-")) > _MAX_LITERAL_DIGITS:
            raise ProgramError(f"{where}: shape expression {text[:80]!r} holds {number[:24]}..., too large for a size")
        if name == "Pow" and any(call[0] == "Pow" for call in calls):
            raise ProgramError(f"{where}: shape expression {text[:80]!r} raises a power to a power")
        # an exponent is `Integer(k)`, |k| <= _MAX_EXPONENT, and a power has two arguments
        exponent = bool(calls) and calls[-1][0] == "Pow" and calls[-1][1] >= 1
        exponent_literal = len(calls) > 1 and calls[-1][0] == "Integer" and calls[-2] == ["Pow", 1]
        if exponent:
            allowed = (calls[-1][1] == 1 and (name == "Integer" or (punct == "(" and last_name == "Integer"))) or (
                punct == ")"
            )
        elif exponent_literal:
            allowed = punct == ")" or (number is not None and abs(int(number)) <= _MAX_EXPONENT)
        else:
            allowed = True
        if not allowed:
            raise ProgramError(
                f"{where}: shape expression {text[:80]!r} has an exponent other than an integer of at most "
                f"{_MAX_EXPONENT}"
            )
        if punct == "(":
            calls.append([last_name, 0])
        elif punct == ")" and calls:
            calls.pop()
        elif punct == "," and calls:
            calls[-1][1] += 1
        last_name = name
        depth += {"(": 1, ")": -1}.get(punct, 0)
        if depth < 0 or depth > 64:
            raise ProgramError(f"{where}: shape expression {text[:80]!r} is malformed")
        pos = m.end()


def check_program(data, where: str) -> None:
    """Raises ProgramError unless every operator, shape expression, guard and argument of `data` (the program JSON)
    is one the loader allows (module docstring)."""
    if not isinstance(data, dict) or not isinstance(data.get("graph_module"), dict):
        raise ProgramError(f"{where}: not a serialized torch.export program")
    guards = data.get("guards_code") or []
    if not isinstance(guards, list):
        raise ProgramError(f"{where}: guards_code is not a list")
    for guard in guards:
        if not isinstance(guard, str) or not _GUARD.fullmatch(guard):
            raise ProgramError(f"{where}: guard {str(guard)[:80]!r} is not a size check the loader allows")
    for key in data.get("range_constraints") or {}:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", str(key)):
            raise ProgramError(f"{where}: range constraint on {str(key)[:40]!r}, not a symbol name")
    graph = data["graph_module"].get("graph")
    if not isinstance(graph, dict) or graph.get("custom_obj_values"):
        raise ProgramError(f"{where}: the program holds custom objects or no graph")

    def walk(x) -> None:
        if isinstance(x, dict):
            for key, value in x.items():
                if key == "target":
                    allowed = isinstance(value, str) and _TARGET.fullmatch(value)
                    if not allowed or _FORBIDDEN_OPERATORS.fullmatch(value):
                        raise ProgramError(f"{where}: operator {str(value)[:80]!r} is not one the loader allows")
                elif key == "expr_str":
                    if not isinstance(value, str):
                        raise ProgramError(f"{where}: a shape expression is not text")
                    _check_sympy(value, where)
                elif key in _FORBIDDEN_ARGUMENTS and value is not None:
                    raise ProgramError(f"{where}: the program has a {key} argument (subgraph or opaque object)")
                elif key == "metadata" and isinstance(value, dict) and value:
                    if set(value) - {"stack_trace"}:
                        raise ProgramError(f"{where}: node metadata {sorted(value)[:4]} (the loader takes none)")
                walk(value)
        elif isinstance(x, list):
            for value in x:
                walk(value)

    try:
        walk(graph)
        # Tree specs name Python types that torch looks up in its registry of known containers (never imports).
        walk({k: v for k, v in data["graph_module"].items() if k != "graph"})
    except RecursionError:
        raise ProgramError(f"{where}: the program is nested too deeply") from None


# -- load --------------------------------------------------------------------------------------------------------------
def _header_metadata(path: str | os.PathLike) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ProgramError(f"{path}: not a readable safetensors file ({exc})") from exc


def _program_info(meta: dict, path) -> dict:
    try:
        info = json.loads(meta[INFO_KEY])
    except RecursionError:
        raise ProgramError(f"{path}: its {INFO_KEY} is nested too deeply") from None
    except (KeyError, ValueError) as exc:
        raise ProgramError(f"{path}: not an egovlp-deploy program (no {INFO_KEY} in its header)") from exc
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ProgramError(f"{path}: program format {info.get('format') if isinstance(info, dict) else info!r}, "
                           f"this egovlp-deploy reads {FORMAT!r}")  # fmt: skip
    return info


def read_program_info(path: str | os.PathLike) -> dict:
    """The facts a program file was written with (its header only)."""
    return _program_info(_header_metadata(path), path)


def load_program(path: str | os.PathLike, device: str = "cpu", check_digest: bool = True):
    """The ExportedProgram in `path` with its weights on `device`, after `check_program` accepted it."""
    from safetensors import SafetensorError
    from torch._export.serde import serialize as serde

    from egovlp_deploy.checkpoint import CheckpointError, load_safetensors

    meta = _header_metadata(path)  # read once: the facts and the program
    info = _program_info(meta, path)
    if info.get("torch") != torch.__version__:
        raise ProgramError(
            f"{path}: program exported with torch {info.get('torch')}, running torch {torch.__version__}: export it "
            "again (the serialized schema and the operators follow the torch that wrote them)"
        )
    if info.get("device") == "cuda" and not str(device).startswith("cuda"):
        raise ProgramError(f"{path}: a program exported for CUDA, asked to run on {device}")
    text = meta.get(PROGRAM_KEY)
    if not text:
        raise ProgramError(f"{path}: no program in its header")
    try:
        data = json.loads(text)
    except RecursionError:
        raise ProgramError(f"{path}: the program is nested too deeply") from None
    except ValueError as exc:
        raise ProgramError(f"{path}: the program is not JSON ({exc})") from exc
    check_program(data, where=str(path))
    if '"torch.ops.egovlp.' in text:  # the project's Triton kernels, registered by importing their modules
        from egovlp_deploy.kernels import divided_attention, gated_cross_attention  # noqa: F401
    try:
        tensors = load_safetensors(path, map_location=device, check_digest=check_digest)
    except CheckpointError as exc:
        raise ProgramError(str(exc)) from exc
    state_dict = {k[len("state_dict/") :]: v for k, v in tensors.items() if k.startswith("state_dict/")}
    constants = {k[len("constants/") :]: v for k, v in tensors.items() if k.startswith("constants/")}
    if len(state_dict) + len(constants) != len(tensors):
        raise ProgramError(f"{path}: tensors outside state_dict/ and constants/")
    # the verifier torch runs on a rebuilt program wants its parameters as nn.Parameter
    specs = data["graph_module"].get("signature", {}).get("input_specs", [])
    parameters = {s["parameter"].get("parameter_name") for s in specs if isinstance(s, dict) and "parameter" in s}
    for name in parameters & state_dict.keys():
        state_dict[name] = torch.nn.Parameter(state_dict[name], requires_grad=False)
    artifact = serde.SerializedArtifact(text.encode(), state_dict, constants, {})  # the very text checked above
    try:
        return serde.deserialize(artifact)
    # sympy and torch raise what they raise on a malformed but allowed program (ZeroDivisionError from
    # `FloorDiv(..., Integer(0))`, IndexError, ...): each is this file's error
    except (SafetensorError, KeyError, ValueError, AssertionError, RuntimeError, TypeError, ArithmeticError,
            IndexError, AttributeError) as exc:  # fmt: skip
        raise ProgramError(f"{path}: torch cannot rebuild the program ({type(exc).__name__}: {exc})") from exc


def program_module(path: str | os.PathLike, device: str = "cpu", check_digest: bool = True):
    """The program as a callable module taking the role's inputs by keyword, as the role module does."""
    return load_program(path, device, check_digest).module()  # exported in eval mode: no dropout in the graph


def load_program_runner(path: str | os.PathLike, role: str, device: str = "cpu"):
    """A callable `run(numpy inputs) -> {output name: numpy}` over a program (for the validator)."""
    import numpy as np

    module = program_module(path, device)
    spec = ROLES[role]

    def run(inputs: dict) -> dict:
        args = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in inputs.items()}
        with torch.inference_mode():
            out = module(**args)
        out = out if isinstance(out, (list, tuple)) else [out]
        return {name: t.detach().float().cpu().numpy() for name, t in zip(spec.output_names, out)}

    return run
