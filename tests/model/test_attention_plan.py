"""The "tuned" attention backend (model/attention_plan.py): each attention shape runs the implementation measured
fastest, among those whose output matches the reference; picks persist in a plan file per device and versions;
nothing is timed where it cannot be (tracing, graph capture), and the report says what was picked.

The timings are replaced by a stand-in timer with fixed milliseconds per candidate, so the choice is known in
advance; the outputs and the correctness guard run the real implementations."""

import json

import pytest
import torch

from egovlp_deploy.model import attention as A
from egovlp_deploy.model.attention_plan import (
    PLAN_KIND,
    AttentionPlan,
    AttentionPlanError,
    active_plan,
    can_measure,
    read_plan_file,
    using,
)

CUDA = torch.cuda.is_available()


def fixed_timer(ms: dict, log: list | None = None):
    """A timer that says candidate `name` takes ms[name] milliseconds (and runs it once, as a real timer would)."""

    def timer(name, fn, device, calls, metric):
        fn()
        if log is not None:
            log.append(name)
        return ms[name]

    return timer


def qkv_case(B=2, F=3, N=4, heads=2, d=8, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, 1 + F * N, 3 * heads * d, generator=g).to(device, dtype)
    return qkv, heads, F, d**-0.5


def divided(qkv, heads, F, scale, backend, mode="time"):
    return A.divided_attention_tokens(qkv, heads, F, mode, scale, backend)


@pytest.mark.parametrize("fastest", ["sdpa", "reference"])
def test_the_fastest_measured_implementation_is_picked_and_computes_the_same(fastest):
    qkv, heads, F, scale = qkv_case()
    ms = {"sdpa": 1.0, "reference": 2.0} if fastest == "sdpa" else {"sdpa": 3.0, "reference": 2.0}
    plan = AttentionPlan(timer=fixed_timer(ms))
    with using(plan), torch.no_grad():
        got = divided(qkv, heads, F, scale, "tuned")
    want = divided(qkv, heads, F, scale, "reference")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    (entry,) = plan.entries.values()
    assert entry.pick == fastest and entry.ms == ms and entry.op == "divided_time"
    assert entry.shape == {"batch": 2, "tokens": 13, "width": 16, "heads": 2, "frames": 3}
    (line,) = plan.report()
    assert f"divided_time batch=2 tokens=13 width=16 heads=2 frames=3 float32 [wall]: {fastest}" in line
    assert plan.summary().startswith(f"tuned attention (wall): 1 {fastest} of 1 shape(s)")


def test_the_pick_is_what_runs(monkeypatch):
    """The recorded pick decides the implementation of later calls (spied on through the sdpa path)."""
    qkv, heads, F, scale = qkv_case()
    calls = []
    real = A.divided_attention_sdpa
    monkeypatch.setattr(A, "divided_attention_sdpa", lambda *a: calls.append(1) or real(*a))
    plan = AttentionPlan(timer=fixed_timer({"sdpa": 1.0, "reference": 2.0}))
    with using(plan), torch.no_grad():
        divided(qkv, heads, F, scale, "tuned")
        measured = len(calls)
        for _ in range(3):
            divided(qkv, heads, F, scale, "tuned")
    assert len(calls) == measured + 3


def test_each_shape_key_is_measured_once_and_new_shapes_again():
    log = []
    plan = AttentionPlan(timer=fixed_timer({"sdpa": 1.0, "reference": 2.0}, log))
    with using(plan), torch.no_grad():
        for _ in range(3):
            divided(*qkv_case(), "tuned")
        divided(*qkv_case(), "tuned", mode="space")  # another op
        divided(*qkv_case(B=1), "tuned")  # another batch
        divided(*qkv_case(dtype=torch.float64), "tuned")  # another dtype
    assert len(plan.entries) == 4 and len(log) == 8 and plan.measured == 4


def test_cross_attention_keys_include_the_mask_and_both_lengths():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, n, 16, generator=g) for n in (5, 9, 9))
    mask = torch.ones(2, 9)
    mask[1, 6:] = 0
    bias = A.extended_attention_mask(mask, torch.float32)
    plan = AttentionPlan(timer=fixed_timer({"sdpa": 1.0, "reference": 2.0}))
    with using(plan), torch.no_grad():
        got = A.multihead_attention(q, k, v, 2, 0.25, bias, "tuned")
        A.multihead_attention(q, k, v, 2, 0.25, None, "tuned")
    torch.testing.assert_close(got, A.multihead_attention(q, k, v, 2, 0.25, bias, "reference"), rtol=1e-5, atol=1e-6)
    shapes = [e.shape for e in plan.entries.values()]
    assert shapes == [
        {"batch": 2, "queries": 5, "keys": 9, "width": 16, "heads": 2, "masked": 1},
        {"batch": 2, "queries": 5, "keys": 9, "width": 16, "heads": 2, "masked": 0},
    ]


def test_a_wrong_implementation_is_rejected_however_fast(monkeypatch):
    qkv, heads, F, scale = qkv_case()
    real = A.divided_attention_sdpa
    monkeypatch.setattr(A, "divided_attention_sdpa", lambda *a: real(*a) * 1.1)  # 10% off
    plan = AttentionPlan(timer=fixed_timer({"sdpa": 0.1, "reference": 2.0}))
    with using(plan), torch.no_grad():
        got = divided(qkv, heads, F, scale, "tuned")
    torch.testing.assert_close(got, divided(qkv, heads, F, scale, "reference"))
    (entry,) = plan.entries.values()
    assert entry.pick == "reference" and "sdpa" not in entry.ms
    assert entry.rejected["sdpa"].startswith("relative error")
    assert "sdpa rejected (relative error" in plan.report()[0]


def test_nan_inputs_measure_without_rejecting_everything():
    """NaN in the inputs gives NaN in the reference too: matching NaNs count as equal, so a pick is still made."""
    qkv, heads, F, scale = qkv_case()
    qkv[0, 3, :] = float("nan")
    plan = AttentionPlan(timer=fixed_timer({"sdpa": 1.0, "reference": 2.0}))
    with using(plan), torch.no_grad():
        divided(qkv, heads, F, scale, "tuned")
    (entry,) = plan.entries.values()
    assert entry.pick == "sdpa" and not entry.rejected


def test_an_implementation_that_fails_is_rejected_with_its_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    qkv, heads, F, scale = qkv_case()
    plan = AttentionPlan(candidates=("triton", "sdpa", "reference"), timer=fixed_timer({"sdpa": 1.0, "reference": 2.0}))
    with using(plan), torch.no_grad():
        divided(qkv, heads, F, scale, "tuned")
    (entry,) = plan.entries.values()
    assert entry.pick == "sdpa"
    assert entry.rejected["triton"].startswith("ValueError: attention_backend 'triton' needs a CUDA device")


def test_the_plan_file_persists_picks_and_another_process_reuses_them(tmp_path):
    path = tmp_path / "plan.json"
    with using(AttentionPlan(path, timer=fixed_timer({"sdpa": 1.0, "reference": 2.0}))), torch.no_grad():
        divided(*qkv_case(), "tuned")
    data = json.loads(path.read_text())
    assert data["kind"] == PLAN_KIND and len(data["entries"]) == 1 and data["entries"][0]["pick"] == "sdpa"

    log = []  # a later run: the file's pick, nothing timed
    later = AttentionPlan(path, timer=fixed_timer({"sdpa": 9.0, "reference": 2.0}, log))
    with using(later), torch.no_grad():
        divided(*qkv_case(), "tuned")
    assert log == [] and later.measured == 0
    assert later.report()[0].split(": ")[1].startswith("sdpa")


def test_entries_measured_on_another_device_are_kept_but_not_used(tmp_path):
    path = tmp_path / "plan.json"
    with using(AttentionPlan(path, timer=fixed_timer({"sdpa": 1.0, "reference": 2.0}))), torch.no_grad():
        divided(*qkv_case(), "tuned")
    data = json.loads(path.read_text())
    data["entries"][0]["device"] = "NVIDIA H100 80GB HBM3"
    data["entries"][0]["ms"] = {"triton": 0.01, "sdpa": 1.0}
    data["entries"][0]["pick"] = "triton"
    path.write_text(json.dumps(data))

    log = []
    plan = AttentionPlan(path, timer=fixed_timer({"sdpa": 3.0, "reference": 2.0}, log))
    with using(plan), torch.no_grad():
        divided(*qkv_case(), "tuned")
    assert sorted(log) == ["reference", "sdpa"]  # measured here, the H100 pick ignored
    entries = read_plan_file(path)
    assert sorted((e.context["device"].split(":")[0], e.pick) for e in entries) == [
        ("NVIDIA H100 80GB HBM3", "triton"),
        ("cpu", "reference"),
    ]


def test_two_plans_on_one_file_merge_their_measurements(tmp_path):
    path = tmp_path / "plan.json"
    a = AttentionPlan(path, timer=fixed_timer({"sdpa": 1.0, "reference": 2.0}))
    b = AttentionPlan(path, timer=fixed_timer({"sdpa": 1.0, "reference": 2.0}))
    with torch.no_grad():
        with using(a):
            divided(*qkv_case(), "tuned")
        with using(b):
            divided(*qkv_case(), "tuned", mode="space")
    assert sorted(e.op for e in read_plan_file(path)) == ["divided_space", "divided_time"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("{", "not valid JSON"),
        ("[]", "expected a JSON object"),
        (json.dumps({"kind": "egovlp-index", "format_version": 1}), "not an attention plan"),
        (json.dumps({"kind": PLAN_KIND, "format_version": 99, "entries": []}), "format_version 99"),
        (json.dumps({"kind": PLAN_KIND, "format_version": 1, "entries": {}}), "'entries' must be"),
        (json.dumps({"kind": PLAN_KIND, "format_version": 1, "entries": [{"op": "x"}]}), "lacks"),
        (
            json.dumps(
                {
                    "kind": PLAN_KIND,
                    "format_version": 1,
                    "entries": [
                        {
                            "device": "d",
                            "torch": "t",
                            "triton": "t",
                            "metric": "wall",
                            "op": "attention",
                            "shape": {"batch": 1},
                            "dtype": "float32",
                            "ms": {"sdpa": 1.0},
                            "pick": "os.system",
                        }
                    ],
                }
            ),
            "malformed entry",
        ),
    ],
)
def test_a_bad_plan_file_is_a_clear_error_and_is_left_alone(tmp_path, content, message):
    path = tmp_path / "plan.json"
    path.write_text(content)
    with pytest.raises(AttentionPlanError, match=message):
        AttentionPlan(path)
    assert path.read_text() == content


def test_a_plan_file_in_a_missing_folder_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(AttentionPlanError, match="does not exist"):
        AttentionPlan(tmp_path / "nope" / "plan.json")


class Divided(torch.nn.Module):
    def __init__(self, heads, F, scale):
        super().__init__()
        self.heads, self.F, self.scale = heads, F, scale

    def forward(self, x):
        return divided(x, self.heads, self.F, self.scale, "tuned")


def test_nothing_is_timed_while_exporting_and_auto_runs():
    """torch.export (fake tensors, static or symbolic sizes) traces 'auto' and measures nothing."""
    qkv, heads, F, scale = qkv_case()
    log = []
    plan = AttentionPlan(timer=fixed_timer({"sdpa": 1.0, "reference": 2.0}, log))
    batch = torch.export.Dim("batch", min=1, max=8)
    with using(plan), torch.no_grad():
        program = torch.export.export(Divided(heads, F, scale), (qkv,))
        torch.export.export(Divided(heads, F, scale), (qkv,), dynamic_shapes={"x": {0: batch}})
    assert log == [] and not plan.entries
    torch.testing.assert_close(program.module()(qkv), divided(qkv, heads, F, scale, "reference"))


def test_torch_compile_traces_tuned_attention_in_one_graph():
    """Inside torch.compile nothing is measured and no lock or file is touched: one graph, auto's choice."""
    qkv, heads, F, scale = qkv_case()
    log = []
    plan = AttentionPlan(timer=fixed_timer({"sdpa": 1.0, "reference": 2.0}, log))
    compiled = torch.compile(lambda x: divided(x, heads, F, scale, "tuned"), backend="eager", fullgraph=True)
    with using(plan), torch.no_grad():
        got = compiled(qkv)
    torch.testing.assert_close(got, divided(qkv, heads, F, scale, "reference"))
    assert log == [] and not plan.entries


def test_unmeasurable_calls_run_auto_and_are_reported(monkeypatch):
    """Where the inputs cannot be timed (here: as inside a CUDA graph capture), an unmeasured key runs 'auto' and
    the report says so; a key measured before keeps its pick."""
    import egovlp_deploy.model.attention_plan as P

    qkv, heads, F, scale = qkv_case()
    plan = AttentionPlan(timer=fixed_timer({"sdpa": 1.0, "reference": 2.0}))
    with using(plan), torch.no_grad():
        divided(qkv, heads, F, scale, "tuned", mode="space")
        monkeypatch.setattr(P, "can_measure", lambda *t: False)
        got = divided(qkv, heads, F, scale, "tuned")
        divided(qkv, heads, F, scale, "tuned", mode="space")
    torch.testing.assert_close(got, divided(qkv, heads, F, scale, "reference"))
    assert [e.op for e in plan.entries.values()] == ["divided_space"]
    lines = plan.report()
    assert lines[0].startswith("divided_space batch=2 ") and ": sdpa (ms:" in lines[0]
    assert lines[1] == ("divided_time {'batch': 2, 'tokens': 13, 'width': 16, 'heads': 2, 'frames': 3} float32: "
                        "unmeasured, ran the default")  # fmt: skip
    assert plan.used[next(iter(plan.entries))] == 2 and "1 unmeasured (default)" in plan.summary()


def test_can_measure_refuses_fake_and_meta_tensors():
    assert can_measure(torch.ones(2))
    assert not can_measure(torch.ones(2, device="meta"))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.ones(2))
    assert not can_measure(fake)


def test_training_never_measures_and_keeps_gradients():
    qkv, heads, F, scale = qkv_case()
    qkv.requires_grad_()
    log = []
    with using(AttentionPlan(timer=fixed_timer({"sdpa": 1.0, "reference": 2.0}, log))):
        divided(qkv, heads, F, scale, "tuned").sum().backward()
    assert log == [] and qkv.grad is not None


def test_without_an_active_plan_a_process_plan_measures():
    with using(None):
        plan = active_plan()
        assert plan.path is None and plan is active_plan()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (real timing: CUDA events and graph replays)")
@pytest.mark.parametrize("metric", ["wall", "graph"])
def test_real_timing_on_the_gpu(metric):
    qkv, heads, F, scale = qkv_case(B=1, F=16, N=196, heads=12, d=64, dtype=torch.float16, device="cuda")
    plan = AttentionPlan(metric=metric, calls=5)
    with using(plan), torch.no_grad():
        got = divided(qkv, heads, F, scale, "tuned")
    want = divided(qkv, heads, F, scale, "reference")
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    (entry,) = plan.entries.values()
    assert set(entry.ms) | set(entry.rejected) == {"triton", "sdpa", "reference"}
    assert entry.context["metric"] == metric and all(ms > 0 for ms in entry.ms.values())
