"""`egovlp-deploy bench ...` at its edges: bad arguments refused in one line before any work, output folders that
hold someone else's files, interrupted runs, the statistics of one and two samples, and tables that agree with
their JSON. Every expected number is computed here by hand (or by numpy/statistics), never read back from the
benchmark itself; nothing here asserts on speed."""

from __future__ import annotations

import json
import statistics
import sys
import threading

import numpy as np
import pytest

from egovlp_deploy import benchmarking
from egovlp_deploy.benchmarking import ResultsFolder, parse_int_list, parse_name_list
from egovlp_deploy.cli import main


def _fake_clock(monkeypatch, durations_s):
    """time.perf_counter advances by the next of `durations_s` during each timed call of the returned fn."""
    now = {"t": 0.0}
    durations = iter(durations_s)
    monkeypatch.setattr(benchmarking.time, "perf_counter", lambda: now["t"])

    def fn():
        now["t"] += next(durations)

    return fn


def _one_error_line(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


# -- statistics -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("samples_ms", [[7.0], [2.0, 6.0], [1.0, 5.0, 3.0]])
def test_median_of_one_two_and_three_samples(monkeypatch, samples_ms):
    fn = _fake_clock(monkeypatch, [0.0] + [ms / 1e3 for ms in samples_ms])  # the first call is the warm-up
    expected = {1: 7.0, 2: 4.0, 3: 3.0}[len(samples_ms)]  # by hand; the mean of the middle two for two
    got = benchmarking.median_ms(fn, repeats=len(samples_ms), warmup=1)
    assert got == pytest.approx(expected) == pytest.approx(statistics.median(samples_ms))


@pytest.mark.parametrize("repeats, warmup", [(0, 1), (-3, 1), (2, -1)])
def test_a_timing_of_no_calls_is_refused(repeats, warmup):
    """times_ms(repeats=0) used to time one call anyway, so `bench export --repeats 0` reported a median of one."""
    calls = []
    with pytest.raises(ValueError, match="repeats >= 1"):
        benchmarking.times_ms(lambda: calls.append(1), repeats=repeats, warmup=warmup)
    assert calls == []


@pytest.mark.parametrize(
    "samples_ms, expected",
    [
        ([5.0], (5.0, 5.0, 5.0)),  # one sample: every percentile is it
        ([2.0, 6.0], (4.0, 5.6, 5.96)),  # linear between the two: 2 + q * (6 - 2)
    ],
)
def test_e2e_percentiles_of_one_and_two_samples(monkeypatch, samples_ms, expected):
    from egovlp_deploy import bench_e2e

    now = {"t": 0.0}
    durations = iter([0.0] + [ms / 1e3 for ms in samples_ms])
    monkeypatch.setattr(bench_e2e.time, "perf_counter", lambda: now["t"])

    def fn():
        now["t"] += next(durations)

    stat = bench_e2e._timed(fn, iters=len(samples_ms), warmup=1)
    assert (stat["p50"], stat["p90"], stat["p99"]) == pytest.approx(expected)
    assert (stat["p50"], stat["p90"], stat["p99"]) == pytest.approx(np.percentile(samples_ms, [50, 90, 99]))
    assert stat["mean"] == pytest.approx(sum(samples_ms) / len(samples_ms)) and stat["iters"] == len(samples_ms)


def test_e2e_timing_of_no_calls_is_a_value_error_not_an_index_error():
    from egovlp_deploy import bench_e2e

    with pytest.raises(ValueError, match="iters >= 1"):
        bench_e2e._timed(lambda: None, iters=0, warmup=0)


# -- list arguments -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, message",
    [("1,x", "'x' is not an integer"), ("", "'' is not an integer"), ("1,,8", "'' is not an integer"),
     ("0", "0 is below 1"), ("-4", "-4 is below 1"), ("8,1,8", "8 is given twice")],
)  # fmt: skip
def test_int_lists_are_refused_with_the_flag_named(text, message):
    with pytest.raises(ValueError, match=f"--batches: {message}"):
        parse_int_list(text, "--batches")


def test_int_and_name_lists_keep_their_order():
    assert parse_int_list(" 32, 1 ,8", "--batches") == [32, 1, 8]
    assert parse_name_list("sdpa,reference", "--backends", ("reference", "sdpa")) == ["sdpa", "reference"]
    for text, message in (("sdpa,sdpa", "sdpa given twice"), ("sdpa,,x", "empty entry"), ("flash", "unknown flash")):
        with pytest.raises(ValueError, match=message):
            parse_name_list(text, "--backends", ("reference", "sdpa"))


# -- the output folder ----------------------------------------------------------------------------------------------
NAMES = ("kernels.json", "kernels.md", "kernels.png")


PNG = b"\x89PNG\r\n\x1a\n" + b"0" * 16


def _png(file):
    file.write(PNG)


def test_results_go_to_a_new_folder_with_spaces_and_unicode(tmp_path):
    out = tmp_path / "my results ü 結果" / "run 1"
    with ResultsFolder(out, "kernels", NAMES) as results:
        results.write({"rows": [{"ms": float("nan")}]}, "| a |\n", _png)
    data = json.loads((out / "kernels.json").read_text())  # strict JSON: NaN is null, not a bare NaN
    assert data == {"benchmark": "kernels", "complete": True, "rows": [{"ms": None}]}
    assert (out / "kernels.md").read_text() == "| a |\n"
    assert (out / "kernels.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in out.iterdir()) == sorted(NAMES)  # no temp or probe file left


def test_an_out_that_is_a_file_or_under_a_file_is_refused(tmp_path):
    user_file = tmp_path / "notes.txt"
    user_file.write_text("mine")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        ResultsFolder(user_file, "kernels", NAMES).__enter__()
    with pytest.raises(ValueError, match="cannot write there"):
        ResultsFolder(user_file / "sub", "kernels", NAMES).__enter__()
    assert user_file.read_text() == "mine"


@pytest.mark.parametrize(
    "files",
    [
        {"kernels.md": "my notes"},  # a table without our JSON beside it
        {"kernels.png": "my picture"},
        {"kernels.json": '{"rows": [1, 2]}'},  # JSON, but not a result of ours
        {"kernels.json": "not json at all"},
        {"kernels.json": '{"benchmark": "export", "meta": {}, "rows": []}'},  # another benchmark's
    ],
)
def test_files_of_our_names_that_we_did_not_write_are_kept_and_the_run_refused(tmp_path, files):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match="not written by `bench kernels`"):
        ResultsFolder(tmp_path, "kernels", NAMES).__enter__()
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == files


def test_a_rerun_replaces_our_own_results_including_those_written_before_the_marker(tmp_path):
    (tmp_path / "kernels.json").write_text(json.dumps({"meta": {"device": "x"}, "rows": []}))  # an older result
    (tmp_path / "kernels.md").write_text("old table")
    (tmp_path / "kernels.png").write_bytes(PNG)
    (tmp_path / "other.txt").write_text("untouched")
    with ResultsFolder(tmp_path, "kernels", NAMES) as results:
        results.write({"rows": [1]}, "new table", lambda f: f.write(b"\x89PNG new"))
    assert json.loads((tmp_path / "kernels.json").read_text())["rows"] == [1]
    assert (tmp_path / "kernels.md").read_text() == "new table"
    assert (tmp_path / "kernels.png").read_bytes() == b"\x89PNG new"
    assert (tmp_path / "other.txt").read_text() == "untouched"


def test_an_incomplete_result_says_so_and_drops_the_previous_runs_plot(tmp_path):
    with ResultsFolder(tmp_path, "kernels", NAMES) as results:
        results.write({"rows": [1, 2]}, "table 1", _png)
        results.write({"rows": [3]}, "| rows so far |\n", _png, complete=False)
    assert json.loads((tmp_path / "kernels.json").read_text())["complete"] is False
    md = (tmp_path / "kernels.md").read_text()
    assert md.startswith("**Incomplete") and md.endswith("| rows so far |\n")
    assert not (tmp_path / "kernels.png").exists()  # a plot of the earlier rows would not match this table


def test_a_plot_that_breaks_mid_way_leaves_the_previous_plot_and_no_temp_file(tmp_path):
    (tmp_path / "kernels.png").write_bytes(PNG)
    (tmp_path / "kernels.json").write_text(json.dumps({"benchmark": "kernels", "rows": []}))
    before = (tmp_path / "kernels.png").read_bytes()

    def interrupted(file):
        file.write(b"\x89PNG half")
        raise KeyboardInterrupt

    with ResultsFolder(tmp_path, "kernels", NAMES) as results, pytest.raises(KeyboardInterrupt):
        results.write({"rows": []}, "t", interrupted)
    assert (tmp_path / "kernels.png").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(NAMES)


def test_two_runs_into_one_folder_at_once_are_refused(tmp_path):
    with ResultsFolder(tmp_path, "kernels", NAMES):
        with pytest.raises(ValueError, match="another process is writing"):
            ResultsFolder(tmp_path, "kernels", NAMES).__enter__()


def test_without_matplotlib_the_json_and_table_are_written_and_the_missing_plot_said(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with ResultsFolder(tmp_path, "kernels", NAMES) as results:
        results.write({"rows": []}, "t", lambda path: pytest.fail("no plot without matplotlib"))
    assert (tmp_path / "kernels.json").is_file() and (tmp_path / "kernels.md").is_file()
    assert not (tmp_path / "kernels.png").exists()
    assert "no kernels.png: matplotlib is not installed" in capsys.readouterr().err


# -- bench preprocess -----------------------------------------------------------------------------------------------
def _preprocess_available():
    from egovlp_deploy import preprocess

    return preprocess.available()


needs_cpp = pytest.mark.skipif(not _preprocess_available(), reason="the C++ extension egovlp_deploy._C is not built")


@needs_cpp
def test_preprocess_table_agrees_with_hand_computed_medians(tmp_path, monkeypatch):
    """Fixed times per path: the JSON and the table carry the medians, ratio and bandwidth computed here."""
    from egovlp_deploy.kernels.bench import preprocess_bench

    times = iter([[3.0, 1.0, 4.0], [1.5, 2.5], [0.5]])  # reference, C++ fp32, C++ fp16 (ms)
    monkeypatch.setattr(preprocess_bench, "times_ms", lambda fn, repeats, warmup: next(times))
    out = tmp_path / "out dir ü"
    assert main(["bench", "preprocess", "--quick", "--no-decode", "--out", str(out)]) == 0
    (row,) = json.loads((out / "preprocess.json").read_text())["rows"]
    gbps = 2 * 3 * 32 * 32 * 4 / 2.0e-3 / 1e9  # T=2, S=32 float32 output over the 2.0 ms median
    assert (row["reference_ms"], row["cpp_fp32_ms"], row["cpp_fp16_ms"]) == (3.0, 2.0, 0.5)
    assert row["speedup"] == pytest.approx(1.5) and row["cpp_fp32_out_gbps"] == pytest.approx(gbps)
    assert (row["reference_min_ms"], row["cpp_fp32_min_ms"]) == (1.0, 1.5)
    assert (
        f"| 48p (48x64) | 2 | 3.00 | 2.00 | 0.50 | 1.5x | {gbps:.2f} | - | - |" in (out / "preprocess.md").read_text()
    )


@needs_cpp
@pytest.mark.parametrize(
    "extra, words",
    [
        (["--inputs", "256p,256p"], ["--inputs", "256p given twice"]),
        (["--inputs", "256p", "--frames", "4", "4"], ["--frames", "given twice"]),
        (["--inputs", "256p,,720p"], ["--inputs", "empty entry"]),
    ],
)
def test_preprocess_duplicated_or_empty_workloads_are_refused(tmp_path, capsys, extra, words):
    out = tmp_path / "out"
    assert main(["bench", "preprocess", *extra, "--out", str(out)]) == 2
    _one_error_line(capsys, *words)
    assert not out.exists()


@needs_cpp
@pytest.mark.parametrize("flag, value", [("--threads", "0"), ("--repeats", "0"), ("--warmup", "-1"), ("--size", "0")])
def test_preprocess_counts_out_of_range_are_refused_by_the_parser(tmp_path, flag, value):
    """--threads 0 used to mean 'torch's count' silently."""
    with pytest.raises(SystemExit) as exc:
        main(["bench", "preprocess", flag, value, "--out", str(tmp_path / "out")])
    assert exc.value.code == 2


@needs_cpp
def test_preprocess_refuses_a_bad_out_before_timing_anything(tmp_path, monkeypatch, capsys):
    """--out under a file used to fail only after every measurement, losing them."""
    from egovlp_deploy.kernels.bench import preprocess_bench

    monkeypatch.setattr(preprocess_bench, "times_ms", lambda *a: pytest.fail("timed before checking --out"))
    (tmp_path / "file").write_text("mine")
    assert main(["bench", "preprocess", "--quick", "--no-decode", "--out", str(tmp_path / "file" / "sub")]) == 2
    _one_error_line(capsys, "cannot write there")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "preprocess.md").write_text("my notes")
    assert main(["bench", "preprocess", "--quick", "--no-decode", "--out", str(tmp_path / "user")]) == 2
    _one_error_line(capsys, "preprocess.md already there")
    assert (tmp_path / "user" / "preprocess.md").read_text() == "my notes"


@needs_cpp
def test_preprocess_without_matplotlib_still_writes_json_and_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["bench", "preprocess", "--quick", "--no-decode", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preprocess.json", "preprocess.md"]


def test_preprocess_a_decoder_failing_is_a_result_not_a_crash(tmp_path, monkeypatch):
    """An IndexError inside the PyAV reader used to end the whole benchmark with a traceback."""
    from egovlp_deploy import decoding
    from egovlp_deploy.kernels.bench import preprocess_bench

    def broken(path, backend):
        raise IndexError("list index out of range")

    monkeypatch.setattr(decoding, "video_info", broken)
    result = preprocess_bench._decode_ms(tmp_path / "clip.mp4", 2, 1, 0)
    assert result["decord"] is None and result["pyav"] is None
    assert result["pyav_error"] == "IndexError: list index out of range"


# -- bench kernels --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--batches", "1,1", "--batches: 1 is given twice"),
        ("--frames", "4,x", "--frames: 'x' is not an integer"),
        ("--text-lengths", "0", "--text-lengths: 0 is below 1"),
        ("--backends", "reference,,sdpa", "--backends: empty entry"),
        ("--backends", "flash", "--backends: unknown flash"),
    ],
)
def test_kernels_bad_shapes_are_named_on_any_machine(tmp_path, capsys, flag, value, message):
    """On a CPU machine these used to be hidden behind 'needs a CUDA GPU' (and on a GPU: an int() traceback, or the
    same shape timed twice)."""
    out = tmp_path / "out"
    assert main(["bench", "kernels", flag, value, "--out", str(out)]) == 2
    _one_error_line(capsys, message)
    assert not out.exists()


def _stub_kernel_cases(monkeypatch, stop_after: int | None):
    """Two hand-timed cases (reference 4 ms, sdpa 1 ms; 2 MB minimum, 6 MB moved; copy bandwidth 4 GB/s); with
    stop_after, Ctrl-C after that many cases."""
    import torch

    from egovlp_deploy.kernels.bench import kernel_bench

    def cases(*args, **kwargs):
        for i in range(2):
            if stop_after is not None and i == stop_after:
                raise KeyboardInterrupt
            fns = {"reference": lambda: torch.ones(3), "sdpa": lambda: torch.ones(3) * 1.5}
            yield f"case {i}", "B=1", fns, 2_000_000

    monkeypatch.setattr(kernel_bench, "_cases", cases)
    monkeypatch.setattr(kernel_bench, "copy_bandwidth", lambda device, timer: 4.0)
    times = {"reference": 4.0, "sdpa": 1.0}
    monkeypatch.setattr(kernel_bench, "_timer", lambda device, quick: lambda fn: times[_backend_of(fn)])
    monkeypatch.setattr(kernel_bench, "bytes_moved", lambda fn: 6_000_000)


def _backend_of(fn):
    return "sdpa" if fn().max() > 1 else "reference"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU run's labels")
def test_kernels_cpu_run_says_it_is_not_a_gpu_timing_and_its_table_matches_hand_numbers(tmp_path, monkeypatch):
    _stub_kernel_cases(monkeypatch, stop_after=None)
    assert (
        main(["bench", "kernels", "--quick", "--no-encoder", "--backends", "reference,sdpa", "--out", str(tmp_path)])
        == 0
    )
    data = json.loads((tmp_path / "kernels.json").read_text())
    meta = data["meta"]
    assert data["complete"] is True and meta["device"].startswith("CPU (no CUDA device")
    assert "only check the plumbing" in meta["note"] and meta["machine"]["logical_cpus"]
    md = (tmp_path / "kernels.md").read_text()
    assert "only check the plumbing" in md
    # sdpa: 4 ms / 1 ms = 4x; |1.5 - 1| / 1 = 0.5 off; 2 MB in 1 ms = 2 GB/s = 50% of 4 GB/s; 6 MB / 2 MB moved
    assert "| case 0 | B=1 | sdpa | 1.0000 | - | 4.00 | 5.0e-01 | 3.0 | 2 | 50% |  |" in md
    sdpa = next(r for r in data["rows"] if r["backend"] == "sdpa")
    assert (sdpa["ms"], sdpa["speedup"], sdpa["max_rel_err"], sdpa["gbps"], sdpa["copy_fraction"]) == pytest.approx(
        (1.0, 4.0, 0.5, 2.0, 0.5)
    )


def test_kernels_interrupted_run_leaves_its_rows_marked_incomplete(tmp_path, monkeypatch):
    """Ctrl-C after the first case: its rows stay, marked incomplete in the JSON and the table, and the plot of an
    earlier run in the same folder does not stay beside them."""
    _stub_kernel_cases(monkeypatch, stop_after=None)
    argv = ["bench", "kernels", "--quick", "--no-encoder", "--backends", "reference,sdpa", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert (tmp_path / "kernels.png").is_file()
    _stub_kernel_cases(monkeypatch, stop_after=1)
    assert main(argv) == 130
    data = json.loads((tmp_path / "kernels.json").read_text())
    assert data["complete"] is False and [r["case"] for r in data["rows"]] == ["case 0", "case 0"]
    assert (tmp_path / "kernels.md").read_text().startswith("**Incomplete")
    assert not (tmp_path / "kernels.png").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


# -- bench profile / export -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value", [("--top", "-2"), ("--top", "0"), ("--iters", "0"), ("--batch", "-1")])
def test_profile_counts_out_of_range_are_refused_by_the_parser(tmp_path, flag, value):
    """--top -2 used to list all but the last two kernels (a Python slice from the end)."""
    with pytest.raises(SystemExit) as exc:
        main(["bench", "profile", flag, value, "--out", str(tmp_path / "out")])
    assert exc.value.code == 2


def test_profile_unknown_attention_is_refused(tmp_path, capsys):
    """Used to be ignored on the CPU (profiled as reference) and to fail deep in the model on a GPU."""
    assert main(["bench", "profile", "--attention", "flash", "--out", str(tmp_path / "out")]) == 2
    _one_error_line(capsys, "attention_backend must be one of")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--roles", "text_encoder,text_encoder"], ["--roles", "text_encoder given twice"]),
        (["--roles", "text"], ["--roles", "unknown text"]),
        (["--configs", "tiny,tiny"], ["--configs", "tiny given twice"]),
        (["--configs", "huge"], ["--configs", "unknown huge"]),
    ],
)
def test_export_bench_duplicated_or_unknown_roles_are_refused(tmp_path, capsys, extra, words):
    """A role given twice used to be exported and timed twice: two JSON rows per key, one of them in the table."""
    assert main(["bench", "export", *extra, "--out", str(tmp_path / "out")]) == 2
    _one_error_line(capsys, *words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flag, value", [("--repeats", "0"), ("--repeats", "-5"), ("--threads", "-1"), ("--text-len", "0")]
)
def test_export_bench_counts_out_of_range_are_refused_by_the_parser(tmp_path, flag, value):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "export", flag, value, "--out", str(tmp_path / "out")])
    assert exc.value.code == 2


def test_export_table_agrees_with_hand_numbers():
    from egovlp_deploy.export.bench import Row, format_table

    rows = [
        Row("tiny", "video_encoder", "torch-eager", 12.0, 1.0, 0.0),
        Row("tiny", "video_encoder", "ort-fp32", 8.0, 12.0 / 8.0, 1e-6),
        Row("tiny", "video_encoder", "ort-int8", 6.0, 12.0 / 6.0, 2e-2),
    ]
    meta = {"frames": 4, "text_len": 15, "threads": 2, "machine": {"cpu": "cpu"}, "cpu_count": 2, "torch": "t",
            "onnxruntime": "o", "repeats": 3, "git_sha": "g", "load_avg": (0.5, 0, 0)}  # fmt: skip
    table = format_table(rows, meta)
    assert "| tiny | video_encoder | 12.00 | 8.00 (1.50x) | 6.00 (2.00x) | 1.0e-06 / 2.0e-02 |" in table
    assert "1.50x, met" in table  # the 1.3x target


# -- bench e2e ------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_e2e_cuda_on_a_machine_without_cuda_is_refused(tmp_path, capsys):
    """Used to run every stage on the CPU and label the results `device cuda`."""
    out = tmp_path / "out"
    assert main(["bench", "e2e", "--device", "cuda", "--quick", "--out", str(out)]) == 2
    _one_error_line(capsys, "--device cuda: no CUDA device")
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--frames", "4,4"], ["--frames: 4 is given twice"]),
        (["--ks", "5,x"], ["--ks: 'x' is not an integer"]),
        (["--backends", "onnx"], ["--backends: unknown onnx"]),
        (["--torch-attention", "flash"], ["--torch-attention: unknown flash"]),
        (["--device", "gpu"], ["--device: 'gpu' is not cpu, cuda or cuda:N"]),
    ],
)
def test_e2e_bad_lists_are_refused_before_any_export(tmp_path, capsys, extra, words):
    out = tmp_path / "out"
    assert main(["bench", "e2e", *extra, "--out", str(out)]) == 2
    _one_error_line(capsys, *words)
    assert not out.exists()


@pytest.mark.parametrize("flag, value", [("--iters", "0"), ("--iters", "-2"), ("--warmup", "-1"), ("--threads", "0")])
def test_e2e_counts_out_of_range_are_refused_by_the_parser(tmp_path, flag, value):
    """--iters 0 used to end in numpy's IndexError traceback after the test video was written."""
    with pytest.raises(SystemExit) as exc:
        main(["bench", "e2e", flag, value, "--out", str(tmp_path / "out")])
    assert exc.value.code == 2


def test_e2e_never_writes_its_test_video_over_a_users_file(tmp_path, monkeypatch):
    from egovlp_deploy import bench_e2e

    (tmp_path / "bench_video.mp4").write_text("my video")
    written = []

    def record(path, *args, **kwargs):
        written.append(path)
        raise KeyboardInterrupt  # stop the run here

    monkeypatch.setattr(bench_e2e, "write_test_video", record)
    assert main(["bench", "e2e", "--quick", "--out", str(tmp_path)]) == 130
    assert (tmp_path / "bench_video.mp4").read_text() == "my video"
    assert written and tmp_path not in written[0].parents


def _e2e_result():
    rows = [
        {"stage": "re-rank cached", "backend": "torch", "precision": "fp16", "frames": 4, "k": 5, "p50": 2.0,
         "p90": 3.0, "p99": 4.0, "peak_rss_mib": 100.0},
        {"stage": "re-rank monolithic", "backend": "torch", "precision": "fp16", "frames": 4, "k": 5, "p50": 5.0,
         "p90": 6.0, "p99": 7.0, "peak_rss_mib": 100.0},
        {"stage": "unavailable", "backend": "tensorrt", "precision": "fp16", "frames": 4,
         "note": "no tensorrt here\nsee | the log"},
    ]  # fmt: skip
    meta = {"model": "tiny", "device": "cpu", "cpu_count": 2, "torch_threads": 2, "load_avg": (1.0, 1.0, 1.0),
            "iters": 3, "warmup": 1, "git_sha": "g"}  # fmt: skip
    return {"meta": meta, "rows": rows, "rerank_parity": [], "gmacs": [], "attention_picks": []}


def test_e2e_rerank_table_labels_its_columns_and_takes_the_ratio_from_the_same_run():
    from egovlp_deploy.bench_e2e import _speedups, format_markdown

    result = _e2e_result()
    result["speedups"] = _speedups(result["rows"])
    assert result["speedups"][0]["speedup"] == pytest.approx(2.5)  # monolithic 5.0 ms / cached 2.0 ms
    md = format_markdown(result)
    assert "| precision | backend | F | k | cached p50 ms | monolithic p50 ms | speedup | max abs diff |" in md
    assert "| fp16 | torch | 4 | 5 | 2.00 | 5.00 | 2.50x |" in md


def test_e2e_a_multi_line_error_note_stays_one_table_row():
    from egovlp_deploy.bench_e2e import _speedups, format_markdown

    result = _e2e_result()
    result["speedups"] = _speedups(result["rows"])
    (line,) = [x for x in format_markdown(result).splitlines() if x.startswith("| unavailable")]
    assert line.endswith("| no tensorrt here see \\| the log |")
    assert line.replace("\\|", "").count("|") == 11  # ten cells, as the header


# -- bench index ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flag, value", [("--seconds", "0"), ("--window", "0"), ("--stride", "-1"), ("--stride", "nan"), ("--threads", "0")]
)
def test_index_counts_out_of_range_are_refused_by_the_parser(tmp_path, flag, value):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "index", flag, value, "--out", str(tmp_path / "out")])
    assert exc.value.code == 2


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--decoders", "auto,auto"], ["--decoders: auto given twice"]),
        (["--decoders", "opencv"], ["--decoders: unknown opencv"]),
        (["--video", "missing.mp4"], ["--video missing.mp4: no such file"]),
    ],
)
def test_index_bad_inputs_are_refused_before_any_export(tmp_path, capsys, extra, words):
    """A missing --video used to be found only after the engines were exported into OUT."""
    out = tmp_path / "out"
    assert main(["bench", "index", *extra, "--out", str(out)]) == 2
    _one_error_line(capsys, *words)
    assert not out.exists()


def test_index_run_reads_a_child_that_writes_more_than_a_pipe_holds(tmp_path, monkeypatch):
    """The child's stderr went to a pipe read only after the child ended: 64 KiB of warnings blocked it forever."""
    from egovlp_deploy import bench_index

    child = tmp_path / "child.py"
    child.write_text(
        "import sys\nsys.stderr.write('w' * 300_000)\nprint('{\"new_windows\": 3, \"ms_per_clip\": null}')\n"
    )
    real_popen = bench_index.subprocess.Popen

    def popen(cmd, **kwargs):
        return real_popen([sys.executable, str(child)], **kwargs)

    monkeypatch.setattr(bench_index.subprocess, "Popen", popen)
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(bench_index.index_run(tmp_path / "v.mp4", tmp_path, "pyav", 2.0, 1.0)),
        daemon=True,
    )
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "index_run blocked on the child's output"
    assert result["windows"] == 3 and result["peak_rss_mib"] > 0


def test_index_generated_video_interrupted_leaves_nothing(tmp_path, monkeypatch):
    import av

    from egovlp_deploy import bench_index

    made = {"n": 0}
    real = av.VideoFrame.from_ndarray

    def from_ndarray(*args, **kwargs):
        made["n"] += 1
        if made["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", from_ndarray)
    with pytest.raises(KeyboardInterrupt):
        bench_index.write_bench_video(tmp_path / "h264.mp4", 1, 64, 48)
    assert list(tmp_path.iterdir()) == []


def test_index_table_agrees_with_hand_numbers():
    from egovlp_deploy.bench_index import format_markdown

    report = {
        "machine": {"cpu": "cpu", "logical_cpus": 2},
        "git": "g",
        "date": "d",
        "video": {"path": "/x/v.mp4", "seconds": 4.0, "frames": 120, "fps": 30.0, "bytes": 2**20},
        "window_sec": 2.0,
        "stride_sec": 1.0,
        "load_average": (0.5, 0.5, 0.5),
        "rows": [
            {"what": "decode only", "seconds": 0.0125, "realtime": 4.0 / 0.0125, "vs_decode": 1.0},
            {"what": "index", "seconds": 2.5, "realtime": 1.6, "vs_decode": 0.0125 / 2.5, "windows": 3,
             "peak_rss_mib": 300.04},
            {"what": "ffmpeg", "error": "RuntimeError: a | b"},
        ],
    }  # fmt: skip
    md = format_markdown(report)
    assert "| decode only | 0.013 | 320.0 | 1 |  |  |" in md  # 0.0125 s -> 0.013 at three decimals
    assert "| index | 2.500 | 1.6 | 0.005 | 3 | 300.0 |" in md
    assert "| ffmpeg | failed: RuntimeError: a \\| b | | | | |" in md
