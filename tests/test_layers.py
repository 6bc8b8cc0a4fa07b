"""The package's layers point down and its modules form no import cycle, read from the source with `ast`.

Layers: model <- data / objectives / evaluation <- trainer; model <- export; runtime <- artifacts (+ the model
factory for its torch backend); the CLI, the demo and the end-to-end benchmarks on top. Every import counts,
function-local ones included: a lazy import still couples the two modules. Each rule is also run on a mutated
copy of the sources, to show that it fails when the code breaks it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# checkout folder -> the package it is installed as (pyproject.toml maps the top-level folders into the package)
FOLDERS = {
    "egovlp_deploy": "egovlp_deploy",
    "kernels": "egovlp_deploy.kernels",
    "export": "egovlp_deploy.export",
    "trainer": "egovlp_deploy.trainer",
}
TOP = ("egovlp_deploy.cli", "egovlp_deploy.demo", "egovlp_deploy.bench_e2e", "egovlp_deploy.bench_index")


def read_sources() -> dict[str, tuple[str, bool]]:
    """{module name: (source text, is a package __init__)} of every module of the installed package."""
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if "csrc" in parts:
                continue
            is_package = parts[-1] == "__init__"
            name = ".".join([package] + (parts[:-1] if is_package else parts))
            out[name] = (path.read_text(), is_package)
    return out


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, dict[str, int]]:
    """{module: {imported module of the package: first line}} for every import statement, at any depth."""
    graph: dict[str, dict[str, int]] = {}
    for name, (text, is_package) in sources.items():
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module
                targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in sources:  # `from pkg import name`: a module, else the package
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.setdefault(target, node.lineno)
        graph[name] = edges
    return graph


def _inside(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


# (what may not import, what it may not import, why)
RULES = [
    (
        ("egovlp_deploy.runtime", "egovlp_deploy.export"),
        ("egovlp_deploy.trainer",),
        "a device install and the exporters do not need the trainer",
    ),
    (
        ("egovlp_deploy.runtime",),
        ("egovlp_deploy.export.runner",),
        "the runtime reads exported artifacts; it does not export",
    ),
    (("egovlp_deploy.export",), ("egovlp_deploy.runtime",), "the exporters sit below the runtime"),
    (
        ("egovlp_deploy.model", "egovlp_deploy.kernels", "egovlp_deploy.config", "egovlp_deploy.checkpoint"),
        (
            "egovlp_deploy.trainer",
            "egovlp_deploy.export",
            "egovlp_deploy.runtime",
            "egovlp_deploy.data",
            "egovlp_deploy.evaluation",
        ),
        "the model sits below everything that uses it",
    ),
    (("egovlp_deploy",), TOP, "the CLI, the demo and the end-to-end benchmarks are the top layer"),
]


def layer_violations(graph: dict[str, dict[str, int]]) -> list[str]:
    found = []
    for sources, forbidden, why in RULES:
        for module, edges in graph.items():
            if not _inside(module, *sources) or module in TOP:
                continue
            for target, line in edges.items():
                if _inside(target, *forbidden):
                    found.append(f"{module} (line {line}) imports {target}: {why}")
    return found


def import_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


@pytest.fixture(scope="module")
def sources():
    found = read_sources()
    assert "egovlp_deploy.model.egovlp" in found and "egovlp_deploy.trainer.train" in found
    return found


def _with_line(sources, module: str, line: str) -> dict[str, tuple[str, bool]]:
    text, is_package = sources[module]
    return {**sources, module: (text + "\n" + line + "\n", is_package)}


def test_layers_point_down(sources):
    assert layer_violations(import_graph(sources)) == []


def test_no_import_cycles(sources):
    assert import_cycles(import_graph(sources)) == []


@pytest.mark.parametrize(
    "module, line, expected",
    [
        ("egovlp_deploy.runtime.engines", "from egovlp_deploy.trainer.train import train", "runtime.engines (line"),
        ("egovlp_deploy.export.validate", "    from ..trainer import evaluate", "export.validate (line"),
        ("egovlp_deploy.runtime.mcq", "from egovlp_deploy.export import runner", "imports egovlp_deploy.export.runner"),
        (
            "egovlp_deploy.runtime.index",
            "from ..export.runner import run_export",
            "imports egovlp_deploy.export.runner",
        ),
        ("egovlp_deploy.model.egovlp", "from ..trainer.training_state import MANIFEST", "model.egovlp (line"),
        ("egovlp_deploy.export.manifest", "from egovlp_deploy.runtime.engines import Runtime", "export.manifest"),
        ("egovlp_deploy.runtime.commands", "from ..cli import add_module_command", "imports egovlp_deploy.cli"),
    ],
)
def test_each_layer_rule_fails_on_a_mutation(sources, module, line, expected):
    found = layer_violations(import_graph(_with_line(sources, module, line)))
    assert len(found) == 1 and expected in found[0], found


@pytest.mark.parametrize(
    "module, line, cycle",
    [
        (
            "egovlp_deploy.transforms",
            "def f():\n    from . import preprocess",
            ["egovlp_deploy.preprocess", "egovlp_deploy.transforms"],
        ),
        (
            "egovlp_deploy.config",
            "from egovlp_deploy.model.factory import load_model",
            ["egovlp_deploy.config", "egovlp_deploy.model.egovlp", "egovlp_deploy.model.factory"],
        ),
    ],
)
def test_a_cycle_is_found_even_through_a_function_local_import(sources, module, line, cycle):
    cycles = import_cycles(import_graph(_with_line(sources, module, line)))
    assert len(cycles) == 1 and set(cycle) <= set(cycles[0]), cycles
