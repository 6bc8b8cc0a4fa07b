"""`egovlp-deploy bench kernels --quick` runs end to end on the CPU (interpreter) and writes its three outputs."""

import json

from egovlp_deploy.cli import main


def test_quick_bench_writes_json_markdown_png(tmp_path):
    assert main(["bench", "kernels", "--quick", "--no-encoder", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "kernels.json").read_text())
    rows = data["rows"]
    assert {r["backend"] for r in rows} >= {"reference", "sdpa", "triton"}
    assert all(r["ms"] and r["ms"] > 0 for r in rows), [r for r in rows if not r["ms"]]
    fused = [r for r in rows if r["backend"] == "triton" and r["min_bytes"]]
    assert fused and all(r["bytes_moved"] == r["min_bytes"] for r in fused)  # one read, one write
    assert data["meta"]["device"] and "| case |" in (tmp_path / "kernels.md").read_text()
    assert (tmp_path / "kernels.png").stat().st_size > 0


def test_a_backend_failing_with_an_empty_message_is_a_row_and_its_traceback_is_logged(tmp_path, monkeypatch, capsys):
    """Inductor raised `AssertionError()` with no message at the base encoder: the row must say so, the run go on."""
    import torch

    from egovlp_deploy.kernels.bench import kernel_bench

    def fail():
        raise AssertionError()

    def one_case(*args, **kwargs):
        yield (
            "stand-in",
            "B=1",
            {"reference": lambda: torch.ones(4), "compile": fail, "triton": lambda: torch.ones(4)},
            None,
        )

    monkeypatch.setattr(kernel_bench, "_cases", one_case)
    assert main(["bench", "kernels", "--quick", "--no-encoder", "--out", str(tmp_path)]) == 0
    rows = {r["backend"]: r for r in json.loads((tmp_path / "kernels.json").read_text())["rows"]}
    assert rows["compile"]["ms"] is None and rows["compile"]["note"] == "AssertionError:"
    assert rows["triton"]["ms"] > 0  # the backends after the failing one still run
    err = capsys.readouterr().err
    assert "stand-in B=1 compile failed" in err and "Traceback" in err and "in fail" in err
