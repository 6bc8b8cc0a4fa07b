"""The Makefile's setup as a fresh machine runs it, with a stand-in Python that records every pip call.

`make setup` runs against the checkout's real Makefile and sources, in a temporary venv folder: the stand-in answers
`-m venv` by making the venv's `bin/python` (itself), records `-m pip ...` instead of installing, and runs `-c` code
with the real interpreter, which sees the torch version the test chose (a distribution's metadata on PYTHONPATH).
"""

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCK_FLAGS = ("--constraint requirements.lock", "--requirement requirements.lock")

FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1" = -m ] && [ "$2" = venv ]; then
    mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && exit 0
fi
if [ "$1" = -m ] && [ "$2" = pip ]; then
    echo "pip ${*:3}" >> "$FAKE_LOG"
    if [ -n "$FAKE_FAIL" ] && [[ "$*" == *"$FAKE_FAIL"* ]]; then echo "pip failed" >&2; exit 1; fi
    exit 0
fi
if [ "$1" = -c ]; then exec env PYTHONPATH="$FAKE_SITE" "$REAL_PYTHON" "$@"; fi
echo "unexpected call: $*" >&2
exit 3
"""

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
# A make that runs these tests (`make test-latest` passes USE_LOCK=no) exports its command-line variables: the make
# runs below start from the Makefile's own defaults.
MAKEFILE_VARIABLES = ("PYTHON", "VENV", "TORCH_SPEC", "EXTRAS", "USE_LOCK", "LOCKED_TORCH", "LOCKED_PYTHON", "DEMO_OUT",
                      "DEMO_ARGS", "PYTEST_WORKERS", "UV_SPEC")  # fmt: skip


def _clean_environment() -> dict:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MAKE", "MFLAGS", "FAKE_")) and k not in MAKEFILE_VARIABLES
    }


def _machine(tmp_path: Path, torch_version: str) -> dict:
    """A stand-in Python and the environment of a make run whose venv gets torch `torch_version`."""
    fake = tmp_path / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    meta = tmp_path / "site" / f"torch-{torch_version}.dist-info"
    meta.mkdir(parents=True)
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {torch_version}\n")
    env = _clean_environment()
    env.update(FAKE_LOG=str(tmp_path / "pip.log"), FAKE_SITE=str(tmp_path / "site"), REAL_PYTHON=sys.executable)
    return env


def _make(tmp_path: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), *args, f"VENV={tmp_path / 'venv'}",
         f"PYTHON={tmp_path / 'python3'}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip


def _pip_calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "pip.log"
    return log.read_text().splitlines() if log.exists() else []


def _uses_the_lock(calls: list[str]) -> bool:
    return any(flag in call for call in calls for flag in LOCK_FLAGS)


@pytest.mark.skipif(
    sys.version_info[:2] != (3, 11) or platform.system() != "Linux" or platform.machine() != "x86_64",
    reason="the lock is for Python 3.11 on Linux x86_64",
)
def test_the_locked_cpu_build_installs_the_locked_versions(tmp_path):
    env = _machine(tmp_path, "2.13.0+cpu")
    out = _make(tmp_path, env, "setup")
    assert out.returncode == 0, out.stdout + out.stderr
    calls = _pip_calls(tmp_path)
    assert all(flag in "\n".join(calls) for flag in LOCK_FLAGS), calls
    assert "installing the locked versions" in out.stdout


@pytest.mark.skipif(
    sys.version_info[:2] != (3, 11) or platform.system() != "Linux" or platform.machine() != "x86_64",
    reason="the lock is for Python 3.11 on Linux x86_64",
)
def test_other_extras_are_resolved_within_the_lock(tmp_path):
    """The lock's list holds the default extras only: others are resolved from pyproject.toml, held to the lock."""
    env = _machine(tmp_path, "2.13.0+cpu")
    out = _make(tmp_path, env, "setup", "EXTRAS=dev,gpu")
    assert out.returncode == 0, out.stdout + out.stderr
    deps = [call for call in _pip_calls(tmp_path) if ".[dev,gpu]" in call]
    assert len(deps) == 1 and "--constraint requirements.lock" in deps[0], _pip_calls(tmp_path)
    assert not any("--requirement" in call for call in _pip_calls(tmp_path))


@pytest.mark.parametrize(
    ("torch_version", "why"),
    [("2.13.0", "PyPI's Linux wheel: the CUDA build, which pins its own triton"), ("2.11.0", "another torch")],
)
def test_another_torch_build_resolves_from_pyproject(tmp_path, torch_version, why):
    """With PyPI's torch==2.13.0 (no local CPU wheel) the lock's triton conflicts with the one torch pins: pip
    finds no solution. The versions come from pyproject.toml instead, and the output says why."""
    env = _machine(tmp_path, torch_version)
    out = _make(tmp_path, env, "setup")
    assert out.returncode == 0, out.stdout + out.stderr
    calls = _pip_calls(tmp_path)
    assert not _uses_the_lock(calls), (why, calls)
    assert any(call.endswith("--no-build-isolation .[dev,cpu]") for call in calls), calls
    assert f"torch {torch_version}" in out.stdout and "resolving the versions from pyproject.toml" in out.stdout


def test_another_python_resolves_from_pyproject(tmp_path):
    """The lock pins wheels of one Python (its numpy has none for 3.10): the lock's CPU torch on another Python
    (here the lock declared for a Python that is not this one) resolves from pyproject.toml."""
    env = _machine(tmp_path, "2.13.0+cpu")
    out = _make(tmp_path, env, "setup", "LOCKED_PYTHON=3.9")
    assert out.returncode == 0, out.stdout + out.stderr
    assert not _uses_the_lock(_pip_calls(tmp_path)), _pip_calls(tmp_path)
    assert "is for torch 2.13.0+cpu, Python 3.9" in out.stdout


def test_use_lock_no_never_reads_the_lock(tmp_path):
    env = _machine(tmp_path, "2.13.0+cpu")
    out = _make(tmp_path, env, "setup", "USE_LOCK=no")
    assert out.returncode == 0, out.stdout + out.stderr
    assert not _uses_the_lock(_pip_calls(tmp_path))


def test_a_second_setup_installs_nothing(tmp_path):
    """`make demo` twice, or `make test` after `make demo`: the second setup finds everything done."""
    env = _machine(tmp_path, "2.13.0+cpu")
    assert _make(tmp_path, env, "setup").returncode == 0
    before = _pip_calls(tmp_path)
    out = _make(tmp_path, env, "setup")
    assert out.returncode == 0, out.stdout + out.stderr
    assert _pip_calls(tmp_path) == before
    assert _make(tmp_path, env, "-q", "setup").returncode == 0


def test_an_interrupted_install_resumes(tmp_path):
    """A failed (or interrupted) dependency install leaves no stamp: the next run installs again and finishes."""
    env = _machine(tmp_path, "2.11.0")
    out = _make(tmp_path, dict(env, FAKE_FAIL=".[dev,cpu]"), "setup")
    assert out.returncode != 0
    assert not (tmp_path / "venv" / ".deps-installed").exists()
    assert not any("--force-reinstall ." in call for call in _pip_calls(tmp_path))
    out = _make(tmp_path, env, "setup")
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "venv" / ".package-installed").exists()
    assert any(call.endswith("--force-reinstall .") for call in _pip_calls(tmp_path))


def test_demo_takes_an_output_folder_with_a_space(tmp_path):
    """`make demo DEMO_OUT="my demo"`: the folder reaches the demo as one argument."""
    env = _machine(tmp_path, "2.13.0+cpu")
    assert _make(tmp_path, env, "setup").returncode == 0
    cli = tmp_path / "venv" / "bin" / "egovlp-deploy"
    cli.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$FAKE_LOG.demo"\n')
    cli.chmod(0o755)
    out = _make(tmp_path, env, "demo", "DEMO_OUT=my demo", "DEMO_ARGS=--quick")
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "pip.log.demo").read_text().splitlines() == ["demo", "--out", "my demo", "--force", "--quick"]


def test_clean_removes_only_what_the_makefile_and_the_build_wrote(tmp_path):
    """A `dist/` (where `python -m build` puts a user's wheels) is never written by the Makefile: it stays."""
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    ours = [".venv", ".venv-latest", ".venv-lock", "build/cp311-cp311-linux_x86_64"]
    for folder in ours:
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "file").write_text("x")
    (tmp_path / "dist").mkdir()
    (tmp_path / "dist" / "egovlp_deploy-0.1.0.tar.gz").write_text("a user's sdist")
    out = subprocess.run(
        ["make", "-C", str(tmp_path), "clean"], env=_clean_environment(), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert [folder for folder in ours if (tmp_path / folder.split("/")[0]).exists()] == []
    assert (tmp_path / "dist" / "egovlp_deploy-0.1.0.tar.gz").read_text() == "a user's sdist"


def test_a_command_that_needs_a_missing_extra_names_the_extra(tmp_path):
    """`pip install egovlp-deploy` without the cpu or gpu extra has no ONNX Runtime: the export that validates with it
    stops with one line naming the extra, not a traceback, and writes nothing."""
    code = (
        "import sys; sys.modules['onnxruntime'] = None\n"  # what `import onnxruntime` meets where it is not installed
        "from egovlp_deploy.cli import main\n"
        f"sys.exit(main(['export', '--checkpoint', 'random:tiny', '--out', {str(tmp_path / 'engines')!r},"
        " '--roles', 'text_encoder', '--no-task-checks', '--quiet']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == (
        "egovlp-deploy export: error: onnxruntime is not installed (it comes with the cpu or gpu extra: "
        "pip install 'egovlp-deploy[cpu]')"
    )
    assert not (tmp_path / "engines").exists()


def test_the_distribution_claims_one_import_name_that_no_other_distribution_claims():
    """The wheel's top level is `egovlp_deploy` alone (the checkout's `kernels/`, `export/` and `trainer/` install
    inside it): no generic name such as Hugging Face's `kernels` is taken over, in either direction."""

    def top_level(dist) -> set[str]:
        names = set()
        for file in dist.files or ():
            first = file.parts[0]
            if len(file.parts) == 1 and file.suffix not in (".py", ".so", ".pyd"):
                continue  # .pth files and other loose files at the top
            if first == ".." or first.endswith((".dist-info", ".egg-info", ".data")) or first == "__pycache__":
                continue
            names.add(first.split(".")[0])
        return names

    ours = importlib.metadata.distribution("egovlp-deploy")
    names = {name for name in top_level(ours) if not name.startswith("_editable_")}  # an editable install's hook
    assert names == {"egovlp_deploy"}, names
    others = {
        dist.metadata["Name"]: top_level(dist) & names
        for dist in importlib.metadata.distributions()
        if dist.metadata["Name"] and dist.metadata["Name"].lower() != "egovlp-deploy"
    }
    assert {name: shared for name, shared in others.items() if shared} == {}


def test_the_installed_package_holds_the_shipped_configs():
    """The trainer's recipes are read from the installed package (`trainer.config.SHIPPED`), never the checkout."""
    from egovlp_deploy.trainer.config import SHIPPED

    shipped = sorted(path.name for path in (ROOT / "egovlp_deploy" / "configs").glob("*.json"))
    assert shipped and sorted(path.name for path in SHIPPED.glob("*.json")) == shipped
