"""Every training config field has a declared type and range: a value outside it is a ConfigError naming the key,
the value and the range, raised before any work starts; a fuzz test over JSON values checks nothing else escapes.

HYPOTHESIS_PROFILE=nightly runs 500 random examples per config class; the default run, 60 fixed ones (derandomized),
keeps the whole file under ~20 s."""

import dataclasses
import json
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egovlp_deploy import ConfigError
from egovlp_deploy.trainer.config import RULES, TrainConfig
from egovlp_deploy.trainer.optim import build_optimizer, build_scheduler

NIGHTLY = os.environ.get("HYPOTHESIS_PROFILE") == "nightly"
EXAMPLES = 500 if NIGHTLY else 60


@pytest.mark.parametrize(
    "data,match",
    [
        # a negative clip norm flips the gradient's sign; a negative decay grows the weights
        ({"optim": {"grad_clip": -1}}, r"optim.grad_clip must be > 0 \(a finite number\) or null, got -1"),
        ({"optim": {"grad_clip": 0}}, "optim.grad_clip"),
        ({"optim": {"weight_decay": -0.01}}, r"optim.weight_decay must be in \[0, 1\] \(a finite number\), got -0.01"),
        # both divided by mid-run (ZeroDivisionError after the first step, no checkpoint saved)
        ({"log": {"every_steps": 0}}, r"log.every_steps must be > 0 \(an integer\), got 0"),
        ({"eval": {"every_epochs": 0}}, r"eval.every_epochs must be > 0 \(an integer\), got 0"),
        # such a step makes the weights inf, which crashed the VTM draw
        ({"optim": {"lr": 1e308}}, r"optim.lr must be in \(0, 1\] \(a finite number\), got 1e\+308"),
        ({"optim": {"lr": float("nan")}}, "optim.lr .* got nan"),
        ({"optim": {"lr": 10**400}}, "optim.lr .* got an integer of 401 digits"),
        ({"optim": {"grad_clip": float("inf")}}, "optim.grad_clip .* got inf"),
        ({"schedule": {"max_minutes": float("nan")}}, "schedule.max_minutes"),
        ({"objective": {"temperature": 0}}, "objective.temperature"),
        ({"objective": {"mlm_probability": 1.5}}, "objective.mlm_probability"),
        ({"objective": {"vtm_weight": -2}}, "objective.vtm_weight"),
        ({"checkpoint": {"keep_last": -1}}, "checkpoint.keep_last"),
        ({"data": {"backend": "ffmpeg"}}, r"data.backend must be one of \['auto', 'decord', 'pyav'\], got 'ffmpeg'"),
        ({"data": {"tokenizer": ""}}, "data.tokenizer must be a non-empty string"),
        ({"data": {"neg_window": 0}}, "data.neg_window"),
        ({"data": {"text_max_length": 100}, "model": {"preset": "tiny"}}, r"data.text_max_length must be in \[3, 64\]"),
        ({"model": {"text_dropout": 1.0}}, "model.text_dropout"),
        ({"eval": {"max_questions": 0}}, "eval.max_questions"),
        ({"seed": -1}, "seed must be in"),
    ],
)
def test_out_of_range_values_name_the_key_value_and_range(data, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict(data)


def test_every_field_has_a_rule():
    declared = {"": {f.name for f in dataclasses.fields(TrainConfig)} - set(TrainConfig.SECTIONS)}
    declared |= {name: {f.name for f in dataclasses.fields(klass)} for name, klass in TrainConfig.SECTIONS.items()}
    assert {name: set(rules) for name, rules in RULES.items()} == declared


def test_train_checks_a_config_built_in_code_before_any_work(tmp_path):
    from egovlp_deploy.trainer.train import train

    cfg = TrainConfig()
    cfg.log.every_steps = 0
    with pytest.raises(ConfigError, match="log.every_steps"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_optimizer_refuses_a_negative_weight_decay():
    with pytest.raises(ValueError, match="weight_decay"):
        build_optimizer(torch.nn.Linear(2, 2), 1e-3, -0.1, 1.0, 1.0)


def test_the_cli_reports_a_bad_value_in_one_line(tmp_path, capsys):
    from egovlp_deploy.cli import main

    (tmp_path / "c.json").write_text(json.dumps({"optim": {"grad_clip": -1}}))
    assert main(["train", "--config", str(tmp_path / "c.json"), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optim.grad_clip must be > 0" in err[0] and "got -1" in err[0]
    (tmp_path / "ok.json").write_text("{}")
    assert (
        main(
            [
                "train",
                "--config",
                str(tmp_path / "ok.json"),
                "--output",
                str(tmp_path / "run"),
                "--set",
                "log.every_steps=0",
            ]
        )
        == 2
    )
    assert "log.every_steps must be > 0 (an integer), got 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# -- fuzz ----------------------------------------------------------------------------------------------------------
EDGES = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2,
    3,
    64,
    2**32,
    2**63,
    10**400,
    0.0,
    -0.0,
    0.5,
    0.999,
    1.0,
    1.5,
    -0.5,
    1e-12,
    1e308,
    -1e308,
    math.inf,
    -math.inf,
    math.nan,
    "",
    " ",
    "auto",
    "tiny",
    "base",
    "big",
    "rand",
    "fp16",
    "pyav",
    "demo",
    [],
    {},
    [1],
    {"a": 1},
]
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6) | st.sampled_from(EDGES)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=4,
)


field_values = st.one_of(st.sampled_from(EDGES), scalars, values)  # edge values often, anything now and then
CHOICES = [
    "base",
    "tiny",
    "big",
    "small",
    "zeros",
    "rand",
    "auto",
    "decord",
    "pyav",
    "fp32",
    "bf16",
    "fp16",
    "demo",
    "x",
    "",
    "  ",
]


def field_strategy(annotation: str):
    """Values of about the declared type (so that many configs load and the ranges get tried), and anything else
    now and then."""
    if "bool" in annotation:
        typed = st.booleans()
    elif "int" in annotation:
        typed = st.integers(-3, 100) | st.integers()
    elif "float" in annotation:
        typed = st.floats(-2, 2) | st.integers(-3, 5) | st.floats()
    else:
        typed = st.sampled_from(CHOICES) | st.text(max_size=4)
    if "None" in annotation:
        typed = typed | st.none()
    return st.one_of(typed, typed, field_values)


def draw_section(data, name: str) -> dict:
    """A section's JSON object: one to three of its keys (now and then an unknown one) with generated values; the
    others keep their defaults."""
    annotations = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig.SECTIONS[name])}
    keys = data.draw(st.lists(st.sampled_from([*annotations, "unknown_key"]), min_size=1, max_size=3, unique=True))
    return {key: data.draw(field_strategy(annotations.get(key, "")), label=key) for key in keys}


def check_loads_or_config_error(data) -> TrainConfig | None:
    try:
        config = TrainConfig.from_dict(data)
    except ConfigError:
        return None
    json.dumps(config.to_dict(), allow_nan=False)  # what loads is finite and stores as plain JSON
    return config


def optimizer_step(config: TrainConfig) -> None:
    """One clipped AdamW step on a small module with the config's optim section: finite, and descending."""
    o = config.optim
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer = build_optimizer(
        model, o.lr, o.weight_decay, o.lr_mult_head, o.lr_mult_cross_modal, o.lr_mult_text, split_text=False
    )
    scheduler = build_scheduler(optimizer, int(o.warmup_fraction * 10), 10)
    loss = model(torch.randn(8, 4)).pow(2).sum()
    loss.backward()
    before = [p.grad.clone() for p in model.parameters()]
    max_norm = o.grad_clip if o.grad_clip is not None else math.inf
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    for b, p in zip(before, model.parameters()):
        assert torch.all(b * p.grad >= 0), "clipping changed a gradient's sign"
    optimizer.step()
    scheduler.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(TrainConfig.SECTIONS))
@settings(max_examples=EXAMPLES, deadline=None, derandomize=not NIGHTLY, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_section_loads_or_raises_config_error(name, data):
    config = check_loads_or_config_error({name: draw_section(data, name)})
    if config is not None and name == "optim":
        optimizer_step(config)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not NIGHTLY)
@given(data=st.dictionaries(st.sampled_from([*TrainConfig.SECTIONS, "seed", "unknown_key"]), field_values, max_size=4))
def test_fuzz_top_level_loads_or_raises_config_error(data):
    check_loads_or_config_error(data)
