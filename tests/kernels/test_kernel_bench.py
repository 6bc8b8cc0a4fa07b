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
