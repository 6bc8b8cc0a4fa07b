"""The kernels compile for Hopper (sm_90) without a GPU (`kernels/aot_check.py`: Triton's ahead-of-time path).

The interpreter that runs the other kernel tests on the CPU accepts programs the GPU compiler rejects, so this
builds the real cubins, as the H100 would. It runs in a subprocess without TRITON_INTERPRET (set for this test
session by conftest), which would turn the kernels into Python functions.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from egovlp_deploy.kernels.aot_check import DOT_PRECISION


def aot_check(*args: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "egovlp_deploy.kernels.aot_check", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if not records and "ptxas" in proc.stderr:
        pytest.skip(f"no ptxas for Triton's ahead-of-time build: {proc.stderr.strip()[-300:]}")
    assert records, f"aot_check printed nothing (rc {proc.returncode}): {proc.stderr[-2000:]}"
    failures = [r for r in records if not r["ok"]]
    assert not failures, f"{len(failures)} variants failed to compile for sm_90, first: {failures[0]}"
    assert proc.returncode == 0, proc.stderr[-2000:]
    return records


def test_every_fp16_autotuning_config_compiles_for_sm90():
    records = aot_check("--dtypes", "fp16", "--all-configs")
    # 6 divided configs x (packed, not) x (D=64, D=16) x (CLS split, not) + 6 cross configs x (bias, no bias) x
    # (split, not) + the split combine at D=64, D=16
    assert len(records) == 6 * 2 * 2 * 2 + 6 * 2 * 2 + 2
    assert all(r["cubin_bytes"] > 1000 for r in records)


def test_bf16_and_fp32_compile_for_sm90():
    records = aot_check("--dtypes", "bf16,fp32")
    assert {r["dtype"] for r in records} == {"bf16", "fp32"}
    assert {r["config"]["PRECISION"] for r in records if r["dtype"] == "fp32" and r["kernel"] != "combine_splits"} == {
        "ieee"
    }  # the split combine has no dot


def test_interpreter_is_refused():
    proc = subprocess.run(
        [sys.executable, "-m", "egovlp_deploy.kernels.aot_check"],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "unset TRITON_INTERPRET" in proc.stderr


def test_the_dot_precision_table_matches_the_launcher(monkeypatch):
    """DOT_PRECISION must say what the launcher passes on a GPU, or aot_check builds kernels nobody runs."""
    from egovlp_deploy.kernels._triton_common import dot_flags

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # dot_flags reads it per call: the GPU branch
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        assert dot_flags(dtype) == {"UPCAST": False, "PRECISION": DOT_PRECISION[name]}
