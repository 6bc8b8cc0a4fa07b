"""scripts/gpu_check.sh, run through on this CPU with a stand-in interpreter: every `egovlp-deploy` command it gives
must parse with today's command line, and every test it names must exist, so that a GPU session (15 minutes, drawn
by chance) is not spent on a renamed option or test. The stand-in records each command line (the test parses it),
skips pip, collects the named tests instead of running them, and runs anything else (the targets script) for real."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"

STAND_IN = """#!{python}
import json, os, subprocess, sys
args = sys.argv[1:]
log = os.environ["GPU_CHECK_STAND_IN_LOG"]
def record(line):
    with open(log, "a") as f:
        f.write(line + "\\n")
if args[:2] == ["-m", "egovlp_deploy.cli"]:
    record("cli " + json.dumps(args[2:]))  # parsed by the test, in its own process (one torch import, not fifteen)
elif args[:2] == ["-m", "pip"]:
    record("pip")
elif args[:2] == ["-m", "pytest"]:
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *args[2:]], capture_output=True,
                          text=True)
    said = "" if done.returncode == 0 else ": " + (done.stdout + done.stderr)[-3000:]
    record(f"pytest rc={{done.returncode}}{{said}}")
    sys.exit(done.returncode)
elif args[:1] == ["-c"]:
    record("probe")
else:
    os.execv(sys.executable, [sys.executable, *args])
"""


def test_every_command_and_test_of_the_gpu_check_exists(tmp_path):
    stand_in = tmp_path / "python"
    stand_in.write_text(STAND_IN.format(python=sys.executable))
    stand_in.chmod(0o755)
    log = tmp_path / "calls.log"
    env = dict(os.environ, PYTHON=str(stand_in), OUT=str(tmp_path / "out"), GPU_CHECK_STAND_IN_LOG=str(log))
    env.pop("STEPS", None)
    before = set(Path("/tmp").glob("gpu_check*"))
    try:
        done = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    finally:  # the script's work folders (fixed under /tmp, as on the GPU machine)
        for path in set(Path("/tmp").glob("gpu_check*")) - before:
            shutil.rmtree(path, ignore_errors=True)
    calls = log.read_text().splitlines()
    assert not [c for c in calls if c.startswith("pytest") and c != "pytest rc=0"], calls
    commands = [json.loads(c.removeprefix("cli ")) for c in calls if c.startswith("cli ")]
    assert not [" ".join(c) for c in commands if not parses(c)]
    # profile, the base export and bench, the kernels, the tiny export and bench, two program exports and benches,
    # the AOTInductor export and bench, the sweep (the precision step only with gpu_inputs/ carried)
    expected = 1 + 2 + 1 + 2 + 4 + 2 + 1
    assert len(commands) in (expected, expected + 1), calls
    assert "pytest rc=0" in calls and "pip" in calls
    assert (tmp_path / "out" / "gpu_check.tgz").is_file(), done.stdout[-2000:]


def parses(argv: list[str]) -> bool:
    """Whether today's command line accepts `egovlp-deploy ARGV` (argparse's complaint goes to the captured stderr)."""
    from egovlp_deploy.cli import build_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()) as said:
            build_parser().parse_args(argv)
    except SystemExit:
        print(f"refused: {' '.join(argv)}\n{said.getvalue()}")
        return False
    return True
