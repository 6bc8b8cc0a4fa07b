"""The shared benchmark timer and provenance stamp."""

import itertools

from egovlp_deploy import benchmarking


def test_median_ms_times_each_call_after_the_warm_up(monkeypatch):
    durations = iter([0.001, 0.005, 0.003])  # seconds taken by the three timed calls
    clock = itertools.count()
    now = {"t": 0.0}

    def fake_perf_counter():
        next(clock)
        return now["t"]

    calls = []

    def fn():
        calls.append(1)
        if len(calls) > 2:  # the first two calls are the warm-up
            now["t"] += next(durations)

    monkeypatch.setattr(benchmarking.time, "perf_counter", fake_perf_counter)
    assert abs(benchmarking.median_ms(fn, repeats=3, warmup=2) - 3.0) < 1e-9  # ms: the middle of 1, 5, 3
    assert len(calls) == 5


def test_git_sha_outside_a_checkout_says_unknown(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EGOVLP_GIT_SHA", raising=False)
    monkeypatch.setattr(benchmarking, "__file__", str(tmp_path / "benchmarking.py"))
    assert benchmarking.git_sha() == "unknown"


def test_git_sha_takes_the_stamp_a_script_hands_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside any checkout: without the stamp this says 'unknown'
    monkeypatch.setattr(benchmarking, "__file__", str(tmp_path / "benchmarking.py"))
    monkeypatch.setenv("EGOVLP_GIT_SHA", "b04ce06")
    assert benchmarking.git_sha() == "b04ce06"
