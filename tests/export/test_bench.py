import json

from egovlp_deploy.cli import main


def test_bench_export_writes_json_markdown_and_plot(tmp_path):
    out = tmp_path / "bench"
    assert (
        main(["bench", "export", "--configs", "tiny", "--roles", "text_encoder", "--repeats", "2", "--out", str(out)])
        == 0
    )
    data = json.loads((out / "export.json").read_text())
    backends = {r["backend"] for r in data["rows"]}
    assert backends == {"torch-eager", "ort-fp32", "ort-int8"}
    fp32 = next(r for r in data["rows"] if r["backend"] == "ort-fp32")
    assert fp32["max_rel_err"] <= 1e-4 and fp32["speedup"] > 0
    assert "| tiny | text_encoder |" in (out / "export.md").read_text()
    assert (out / "export.png").stat().st_size > 1000
