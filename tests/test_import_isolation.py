"""No folder of the checkout shadows another distribution, wherever Python starts, and the model, runtime and
exporters import without transformers.

Python started in the repository root (`python -c`, `-m`, a REPL) puts the root first on sys.path. The top-level
`kernels/`, `export/` and `trainer/` folders have no `__init__.py`, so an installed package of the same name (Hugging
Face's `kernels`, which transformers imports) still wins, and the source `egovlp_deploy/` folder hands the import over
to the installed package (which holds the mapped subpackages and the compiled extension). Fresh interpreters: the
question is what a new process finds.
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = [ROOT / name for name in ("egovlp_deploy", "kernels", "export", "trainer")]
# What the installation maps these names to, as this process (pytest, which never puts the root on sys.path) sees
# them: the wheel's files, or the checkout's files for an editable install.
PACKAGE = (
    "egovlp_deploy",
    "egovlp_deploy.kernels",
    "egovlp_deploy.export",
    "egovlp_deploy.trainer",
    "egovlp_deploy.runtime",
    "egovlp_deploy._C",
)
EXPECTED = {name: str(Path(importlib.import_module(name).__file__).resolve()) for name in PACKAGE}

_REPORT = """
import json, sys
import egovlp_deploy, egovlp_deploy.kernels, egovlp_deploy.export, egovlp_deploy.trainer, egovlp_deploy.runtime
import egovlp_deploy._C
{extra}
print(json.dumps({{name: getattr(module, "__file__", None) for name, module in sys.modules.items()
                  if name.split(".")[0] in ("egovlp_deploy", "kernels", "export", "trainer")}}))
"""


def _modules(cwd: Path, extra: str = "", env: dict | None = None) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _REPORT.format(extra=extra)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _from_source(path: str | None) -> bool:
    return path is not None and any(Path(path).resolve().is_relative_to(folder) for folder in SOURCE_FOLDERS)


def test_the_tests_see_the_built_package():
    """The source folder alone has neither the mapped subpackages nor the compiled extension."""
    assert Path(EXPECTED["egovlp_deploy.kernels"]).name == "__init__.py"
    assert not _from_source(EXPECTED["egovlp_deploy._C"])


@pytest.mark.parametrize("where", ["checkout root", "elsewhere"])
def test_egovlp_deploy_imports_the_installed_package(where, tmp_path):
    modules = _modules(ROOT if where == "checkout root" else tmp_path)
    found = {name: str(Path(modules[name]).resolve()) if modules.get(name) else None for name in PACKAGE}
    assert found == EXPECTED


def test_hugging_face_kernels_is_not_shadowed_from_the_checkout_root():
    pytest.importorskip("kernels", reason="Hugging Face `kernels` is not installed (transformers < 5 needs none)")
    modules = _modules(ROOT, extra="import transformers.activations, kernels")
    assert not _from_source(modules["kernels"]), modules["kernels"]


def test_no_top_level_folder_shadows_a_distribution_of_the_same_name(tmp_path):
    """Stand-in distributions named like the top-level folders, on PYTHONPATH (after the root on sys.path)."""
    for name in ("kernels", "export", "trainer"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"ORIGIN = 'distribution {name}'\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    modules = _modules(ROOT, extra="import kernels, export, trainer", env=env)
    for name in ("kernels", "export", "trainer"):
        assert Path(modules[name]).resolve() == (tmp_path / name / "__init__.py").resolve(), modules[name]


@pytest.mark.parametrize(
    "module",
    [
        "egovlp_deploy",
        "egovlp_deploy.model",
        "egovlp_deploy.runtime",
        "egovlp_deploy.export.runner",
        "egovlp_deploy.kernels.divided_attention",
    ],
)
def test_model_runtime_and_exporters_import_without_transformers(module, tmp_path):
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")]
    assert module in imported
    assert not [name for name in imported if name.split(".")[0] == "transformers"]
