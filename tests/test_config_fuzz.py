"""Fuzzing the model config: any JSON value in any field either gives a config that loads and runs a forward with
finite outputs, or raises ConfigError; nothing else.

Each config class (VideoConfig, TextConfig, the top-level EgoVLPv2Config) has its own test, which replaces some of
its fields in the tiny config's JSON with generated values. The ceilings in `config.LIMITS` are lowered for the run
(they are configurable for exactly this) so that every config that loads is small enough to run here.
Examples per class: 500 with HYPOTHESIS_PROFILE=nightly, 25 otherwise.
"""

import contextlib
import json
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egovlp_deploy import ConfigError, EgoVLPv2, EgoVLPv2Config
from egovlp_deploy import config as config_module
from egovlp_deploy.activations import ACTIVATION_NAMES

EXAMPLES = 500 if os.environ.get("HYPOTHESIS_PROFILE") == "nightly" else 25
FUZZ_LIMITS = {
    "frames": 8,
    "img_size": 64,
    "video_tokens": 300,
    "depth": 6,
    "width": 256,
    "mlp_width": 1024,
    "heads": 64,
    "vocab_size": 5000,
    "positions": 4096,
    "params": 3_000_000,
}
NAMES = sorted(
    set(ACTIVATION_NAMES)
    | set(config_module.TIME_INITS)
    | set(config_module.PROJECTIONS)
    | set(config_module.ATTENTION_BACKENDS)
)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 300),
    st.integers(),
    st.sampled_from([0, 1, 2, 4, 8, 16, 64, 10**9, 10**30, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(0, 1),
    st.floats(1e-15, 10),
    st.sampled_from([float("nan"), float("inf"), -0.0, 5e-324, 1e-12, 1e300]),
    st.text(max_size=6),
    st.sampled_from(NAMES),
)
json_values = st.one_of(
    json_scalars, st.lists(json_scalars, max_size=2), st.dictionaries(st.text(max_size=3), json_scalars, max_size=2)
)


@contextlib.contextmanager
def lowered_limits():
    saved = dict(config_module.LIMITS)
    config_module.LIMITS.update(FUZZ_LIMITS)
    try:
        yield
    finally:
        config_module.LIMITS.clear()
        config_module.LIMITS.update(saved)


def tiny_forward_is_finite(config: EgoVLPv2Config) -> None:
    torch.manual_seed(0)
    model = EgoVLPv2(config).eval()
    if config.attention_backend == "triton":  # the CPU runs the kernels in the slow interpreter: same math, reference
        model.set_attention_backend("reference")
    v, t = config.video, config.text
    video = torch.randn(2, v.num_frames, v.in_chans, v.img_size, v.img_size)
    length = min(t.max_text_length, 6)
    ids = torch.randint(0, t.vocab_size, (2, length))
    ids[:, 0], ids[:, -1] = t.bos_token_id, t.eos_token_id
    mask = torch.ones_like(ids)
    with torch.no_grad():
        outputs = [model.encode_video(video), model.encode_text(ids, mask)]
        fused = model.fuse(video, ids, mask)
        outputs += [fused.video_cls, fused.text_hidden, fused.vtm_logits, model.mlm_head(fused.text_hidden)]
    for out in outputs:
        assert torch.isfinite(out).all(), config


def load_or_config_error(data: dict) -> None:
    text = json.dumps(data)  # through JSON text, as a config.json is read (NaN and Infinity included)
    try:
        config = EgoVLPv2Config.from_dict(json.loads(text))
    except ConfigError:
        return
    tiny_forward_is_finite(config)


TINY = EgoVLPv2Config.tiny().to_dict()
SECTIONS = {
    "video": sorted(TINY["video"]),
    "text": sorted(TINY["text"]),
    None: sorted(k for k in TINY if k not in ("video", "text")),
}


def plausible(value):
    """Values near a field's tiny-config value, mostly in range, so that many generated configs load and run."""
    if isinstance(value, bool) or isinstance(value, str):
        return st.sampled_from(NAMES)
    if isinstance(value, int):
        nearby = st.sampled_from(sorted({1, 2, 4, 8, value, value * 2, max(value // 2, 1)}))
        return st.one_of(nearby, nearby, nearby, st.integers(0, 2 * value + 2))
    return st.one_of(st.sampled_from([value, value * 10, value / 10]), st.floats(0, 1))


def mutations(section):
    """1 to 3 fields of the section, each set to a plausible value (three times in four) or any JSON value."""
    current = TINY[section] if section else TINY

    def change(key):
        near = plausible(current[key])
        return st.tuples(st.just(key), st.one_of(near, near, near, json_values))

    return st.lists(st.sampled_from(SECTIONS[section]).flatmap(change), min_size=1, max_size=3).map(dict)


@pytest.mark.parametrize("section", ["video", "text", None], ids=["VideoConfig", "TextConfig", "EgoVLPv2Config"])
def test_any_json_value_loads_and_runs_finite_or_raises_config_error(section):
    rare = st.integers(0, 9).map(lambda i: i == 9)  # about one example in ten drops a key, one adds an unknown one

    @settings(
        max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES < 100, suppress_health_check=[HealthCheck.too_slow]
    )
    @given(changes=mutations(section), drop=rare, extra=rare)
    def check(changes, drop, extra):
        data = json.loads(json.dumps(TINY))
        target = data[section] if section else data
        target.update(changes)
        if drop:  # a missing key
            target.pop(sorted(changes)[0])
        if extra:  # an unknown key
            target["unexpected"] = 1
        load_or_config_error(data)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny forwards: one thread is several times faster on a busy machine
    try:
        with lowered_limits():
            check()
    finally:
        torch.set_num_threads(threads)


def test_fuzz_limits_keep_the_tiny_model_loadable():
    with lowered_limits():
        load_or_config_error(TINY)
        assert math.isfinite(config_module.estimated_parameters(EgoVLPv2Config.from_dict(TINY)))
