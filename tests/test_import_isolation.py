"""No folder of the checkout shadows another distribution, wherever Python starts, and the model, runtime and
exporters import without transformers.

Python started in the repository root (`python -c`, `-m`, a REPL) puts the root first on sys.path. The top-level
`kernels/`, `export/` and `trainer/` folders have no `__init__.py`, so an installed package of the same name (Hugging
Face's `kernels`, which transformers imports) still wins, and the source `egovlp_deploy/` folder hands the import over
to the installed package (which holds the mapped subpackages and the compiled extension). Fresh interpreters: the
question is what a new process finds.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import egovlp_deploy

ROOT = Path(__file__).resolve().parents[1]
INSTALLED = Path(egovlp_deploy.__file__).resolve().parent
SOURCE_FOLDERS = [ROOT / name for name in ("egovlp_deploy", "kernels", "export", "trainer")]

_REPORT = """
import json, sys
import egovlp_deploy, egovlp_deploy.kernels, egovlp_deploy.export, egovlp_deploy.trainer, egovlp_deploy.runtime
import egovlp_deploy._C
names = [n for n in ("kernels", "export", "trainer") if n not in sys.modules]
{extra}
print(json.dumps({{name: getattr(module, "__file__", None) for name, module in sys.modules.items()
                  if name.split(".")[0] in ("egovlp_deploy", "kernels", "export", "trainer")}}))
"""


def _modules(cwd: Path, extra: str = "", env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", _REPORT.format(extra=extra)], cwd=cwd, capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _inside(path: str | None, folder: Path) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(folder)


def _from_source(path: str | None) -> bool:
    return any(_inside(path, folder) for folder in SOURCE_FOLDERS)


def test_the_installed_package_is_tested():
    assert not _from_source(egovlp_deploy.__file__), "the tests must run against the installed package"
    assert (INSTALLED / "kernels" / "__init__.py").is_file()


@pytest.mark.parametrize("where", ["checkout root", "elsewhere"])
def test_egovlp_deploy_imports_the_installed_package(where, tmp_path):
    modules = _modules(ROOT if where == "checkout root" else tmp_path)
    ours = {name: path for name, path in modules.items() if name.split(".")[0] == "egovlp_deploy"}
    assert {"egovlp_deploy", "egovlp_deploy.kernels", "egovlp_deploy.export", "egovlp_deploy.trainer",
            "egovlp_deploy._C"} <= ours.keys()
    outside = {name: path for name, path in ours.items() if path and not _inside(path, INSTALLED)}
    assert not outside, outside


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


@pytest.mark.parametrize("module", ["egovlp_deploy", "egovlp_deploy.model", "egovlp_deploy.runtime",
                                    "egovlp_deploy.export.pipeline", "egovlp_deploy.kernels.divided_attention"])
def test_model_runtime_and_exporters_import_without_transformers(module, tmp_path):
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")]
    assert module in imported
    assert not [name for name in imported if name.split(".")[0] == "transformers"]
