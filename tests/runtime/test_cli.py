"""CLI smoke: index -> search -> mcq -> features on three tiny videos, bench e2e --quick, --help everywhere."""

import json

import pytest
from safetensors.numpy import load_file

from egovlp_deploy.cli import main


def test_help(capsys):
    for cmd in ("index", "search", "mcq", "features", "demo"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
    assert "--rerank" in capsys.readouterr().out


def test_index_search_mcq_features(engines, video_root, mcq_json, tmp_path, capsys):
    vids = [str(video_root / u / "0.mp4") for u in ("vid_a", "vid_b", "vid_c")]
    idx = str(tmp_path / "idx")
    assert main(["index", *vids, "--engines", str(engines), "--out", idx, "--prefixes", "--quiet"]) == 0
    assert "3 videos" in capsys.readouterr().out
    assert main(["search", idx, "#C C opens the box", "--rerank", "5", "--top", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["#C C opens the box"]
    assert len(hits) == 3 and all(h["vtm"] is not None for h in hits)
    assert main(["search", idx, "  "]) == 2  # empty query: named error, exit 2
    assert "empty query" in capsys.readouterr().err
    out = tmp_path / "mcq.json"
    assert (
        main(
            [
                "mcq",
                str(mcq_json),
                "--video-root",
                str(video_root),
                "--engines",
                str(engines),
                "--json",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["questions"] == 2 and set(summary["accuracy"]) == {"dual", "fusion", "ensemble"}
    assert len(json.loads(out.read_text())["results"][0]["scores"]["ensemble"]) == 5
    feats = tmp_path / "feats"
    assert (
        main(
            [
                "features",
                *vids[:2],
                "--engines",
                str(engines),
                "--out",
                str(feats),
                "--frames",
                "8",
                "--stride",
                "8",
                "--quiet",
            ]
        )
        == 0
    )
    capsys.readouterr()
    a = load_file(str(feats / "vid_a_0.safetensors"))
    assert a["features"].shape == (4, 128) and a["timestamps"].shape == (4, 2)  # 30 frames / 8, last one clipped
    assert (
        main(
            [
                "features",
                *vids[:2],
                "--engines",
                str(engines),
                "--out",
                str(feats),
                "--frames",
                "8",
                "--stride",
                "8",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["skipped"] == 2  # a rerun resumes: both videos already done
    assert (
        main(
            [
                "features",
                vids[2],
                "--engines",
                str(engines),
                "--out",
                str(feats),
                "--mode",
                "fusion",
                "--query",
                "#C C opens the box",
                "--query",
                "#C C pulls the cup",
                "--quiet",
            ]
        )
        == 0
    )
    c = load_file(str(feats / "vid_c_0.safetensors"))
    assert c["video_cls"].shape[:2] == (2, 2) and c["text_tokens"].shape[:2] == (2, 2)  # 20 frames / 16
    assert main(["features", vids[2], "--engines", str(engines), "--out", str(feats), "--mode", "fusion"]) == 2


def test_bad_engine_folder_and_missing_video(engines, video_root, tmp_path, capsys):
    assert main(["index", str(tmp_path / "none.mp4"), "--engines", str(engines), "--out", str(tmp_path / "i")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert (
        main(["index", str(video_root / "vid_a" / "0.mp4"), "--engines", str(tmp_path), "--out", str(tmp_path / "i")])
        == 2
    )
    assert "manifest" in capsys.readouterr().err


def test_an_output_file_in_a_missing_folder_is_refused_before_any_work(engines, video_root, mcq_json, tmp_path, capsys):
    """mcq --out in a folder that does not exist: one line naming it, before the engines load; a direct write names the
    target, not its temp file."""
    from egovlp_deploy.checkpoint import atomic_write_bytes

    out = tmp_path / "missing" / "mcq.json"
    args = ["mcq", str(mcq_json), "--engines", str(engines), "--video-root", str(video_root), "--out", str(out)]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == f"egovlp-deploy mcq: error: --out {out}: its folder does not exist"
    with pytest.raises(FileNotFoundError, match=f"{out}: its folder {out.parent} does not exist"):
        atomic_write_bytes(out, b"x")
    assert not out.parent.exists()


def test_bench_e2e_quick(engines, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "e2e", "--quick", "--engines", str(engines), "--out", str(out)]) == 0
    result = json.loads((out / "e2e.json").read_text())
    stages = {r["stage"] for r in result["rows"]}
    assert {"decode+preprocess", "video encode", "text encode", "re-rank cached", "re-rank monolithic"} <= stages
    assert result["rerank_parity"][0]["max_abs_diff"] < 1e-5
    assert (out / "e2e.md").is_file() and (out / "e2e.png").stat().st_size > 1000
    assert 0 < result["gmacs"][0]["saving_pct"] < 100


def test_bench_e2e_torch_attention_rows(engines, tmp_path):
    """--torch-attention gives one torch row set per attention path, labelled, each with exact re-rank parity;
    'tuned' lists what it picked per attention shape."""
    out = tmp_path / "bench_attn"
    assert (
        main(
            [
                "bench",
                "e2e",
                "--engines",
                str(engines),
                "--frames",
                "4",
                "--backends",
                "torch",
                "--torch-attention",
                "auto,reference,tuned",
                "--ks",
                "5",
                "--iters",
                "2",
                "--warmup",
                "0",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads((out / "e2e.json").read_text())
    encode = {r["backend"]: r for r in result["rows"] if r["stage"] == "video encode"}
    assert set(encode) == {"torch", "torch/reference", "torch/tuned"}
    assert "reference attention" in encode["torch/reference"]["provider"]
    assert {p["backend"] for p in result["rerank_parity"]} == {"torch", "torch/reference", "torch/tuned"}
    assert all(p["max_abs_diff"] < 1e-5 for p in result["rerank_parity"])
    (picks,) = result["attention_picks"]
    assert picks["backend"] == "torch/tuned" and picks["summary"].startswith("tuned attention (wall)")
    assert any(line.startswith("divided_time batch=1 ") for line in picks["picks"])
    assert "Attention picks, torch/tuned fp32 F=4" in (out / "e2e.md").read_text()


@pytest.mark.parametrize(
    "error, note",
    [(RuntimeError(), "RuntimeError:"), (ValueError("\nthe fusion head does not load"), "ValueError: the fusion")],
)
def test_bench_e2e_a_failing_run_keeps_its_rows_and_the_others_go_on(
    engines, tmp_path, monkeypatch, capsys, error, note
):
    """A run that fails half way (on the GPU: an Inductor or a CUDA error, a role that does not load) is a `failed`
    row, not an `unavailable` one: the stages it measured before stay in the results, the next run still runs, the
    traceback is in the log and the exit status is 1."""
    from egovlp_deploy.runtime.engines import TorchRunner

    calls = {"fusion_head": 0}
    run = TorchRunner.__call__

    def fail_once(self, **inputs):
        if self.role == "fusion_head" and not calls["fusion_head"]:
            calls["fusion_head"] += 1
            raise error  # RuntimeError(): no message, like Inductor's assertions
        return run(self, **inputs)

    monkeypatch.setattr(TorchRunner, "__call__", fail_once)
    out = tmp_path / "bench_fail"
    argv = ["bench", "e2e", "--engines", str(engines), "--frames", "4", "--backends", "torch", "--ks", "5"]
    assert main(argv + ["--torch-attention", "auto,reference", "--iters", "2", "--warmup", "0", "--out", str(out)]) == 1
    result = json.loads((out / "e2e.json").read_text())
    rows = [(r["stage"], r["backend"]) for r in result["rows"]]
    assert ("video encode", "torch") in rows and ("text encode", "torch") in rows  # measured before the failure
    assert ("failed", "torch") in rows and ("re-rank cached", "torch") not in rows
    assert ("re-rank cached", "torch/reference") in rows and ("re-rank monolithic", "torch/reference") in rows
    failed = next(r for r in result["rows"] if r["stage"] == "failed")
    assert failed["note"].startswith(note)
    assert "| failed | torch |" in (out / "e2e.md").read_text() and (out / "e2e.png").is_file()
    err = capsys.readouterr().err
    assert "bench e2e: torch fp32 F=4 failed:" in err and "Traceback" in err and "in fail_once" in err


def test_runtime_rejects_an_unknown_attention_path(engines):
    from egovlp_deploy.runtime.engines import EngineError, Runtime

    with pytest.raises(EngineError, match="attention must be one of"):
        Runtime(engines, backend="torch", attention="flash")


def test_bench_index_quick(engines, tmp_path, capsys):
    """bench index: the decode-only row and one index row per decoder, from the same run, in JSON/markdown/PNG."""
    out = tmp_path / "bench_index"
    assert (
        main(["bench", "index", "--quick", "--engines", str(engines), "--decoders", "auto,pyav", "--out", str(out)])
        == 0
    )
    result = json.loads((out / "index.json").read_text())
    rows = {r["what"]: r for r in result["rows"]}
    assert "decode only (PyAV, 2 threads)" in rows
    for decoder in ("auto", "pyav"):
        row = rows[f"index --decoder {decoder}"]
        assert row["windows"] == 3 and row["peak_rss_mib"] > 0 and row["vs_decode"] > 0  # 4 s: 2 s windows, 1 s apart
    assert (out / "index.md").is_file() and (out / "index.png").stat().st_size > 1000


def test_the_commands_run_no_warm_up_pass(engines, video_root, mcq_json, tmp_path, monkeypatch, capsys):
    """A one-shot command's first call pays the lazy allocation a warm-up pass would: the warm-up (7-14 s per
    paper-size role on a small CPU) bought nothing but time."""
    from egovlp_deploy.runtime.engines import Runtime

    def no_warm_up(self, role, batch=1, text_len=8):
        raise AssertionError(f"a warm-up pass of {role}")

    monkeypatch.setattr(Runtime, "example", no_warm_up)
    idx = str(tmp_path / "idx")
    video = str(video_root / "vid_a" / "0.mp4")
    assert main(["index", video, "--engines", str(engines), "--out", idx, "--prefixes", "--quiet"]) == 0
    assert main(["search", idx, "#C C opens the box", "--rerank", "2", "--top", "2", "--json"]) == 0
    out = tmp_path / "mcq.json"
    mcq = ["mcq", str(mcq_json), "--video-root", str(video_root), "--engines", str(engines), "--out", str(out)]
    assert main(mcq + ["--max-questions", "1", "--json"]) == 0
    features = ["features", video, "--engines", str(engines), "--out", str(tmp_path / "f"), "--quiet"]
    assert main(features) == 0, capsys.readouterr().err
