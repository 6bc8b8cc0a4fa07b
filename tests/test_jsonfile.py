"""egovlp_deploy.jsonfile.read_json: one named error, chosen by the caller, for every way a JSON file can be bad."""

import json

import pytest

from egovlp_deploy.config import ConfigError
from egovlp_deploy.jsonfile import json_text, read_json


class MyError(Exception):
    pass


def test_reads_json(tmp_path):
    (tmp_path / "a.json").write_text('{"x": [1, 2.5, null]}', encoding="utf-8")
    assert read_json(tmp_path / "a.json") == {"x": [1, 2.5, None]}
    assert read_json(tmp_path / "a.json", MyError, expect=dict) == {"x": [1, 2.5, None]}


@pytest.mark.parametrize(
    "content,message",
    [
        (b"\xff\xfe\x00\x01", "not valid JSON"),  # not UTF-8
        (b'{"x": 1', "not valid JSON"),  # truncated
        (b"", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b"[" * 100_000, "nested too deeply"),  # RecursionError inside json.loads
    ],
)
def test_bad_files_raise_the_callers_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(MyError, match=message) as info:
        read_json(path, MyError, expect=dict)
    assert str(path) in str(info.value)


def test_missing_file_and_its_message(tmp_path):
    with pytest.raises(MyError, match="no such file"):
        read_json(tmp_path / "none.json", MyError)
    with pytest.raises(ConfigError, match="^custom$"):
        read_json(tmp_path / "none.json", ConfigError, missing="custom")


def test_a_directory_is_a_named_error_too(tmp_path):
    with pytest.raises(MyError, match="cannot be read"):
        read_json(tmp_path, MyError)


def _strict(text: str):
    """json.loads as jq or JavaScript read: NaN and Infinity are not JSON."""

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_json_text_writes_standard_json_with_null_for_non_finite_floats():
    value = {
        "loss": float("nan"),
        "acc": {"Inter-video": 50.0, "Intra-video": float("inf")},
        "rows": [1, -float("inf")],
    }
    assert _strict(json_text(value)) == {
        "loss": None,
        "acc": {"Inter-video": 50.0, "Intra-video": None},
        "rows": [1, None],
    }
    assert json_text({"b": 1, "a": (2.5, True)}, indent=1) == json.dumps({"b": 1, "a": [2.5, True]}, indent=1)


def test_the_training_log_and_summary_are_standard_json(tmp_path):
    from egovlp_deploy.trainer.train import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=True, tensorboard=False)
    log.write({"step": 3, "loss": float("nan"), "egomcq": {"dual": {"Intra-video": float("nan")}}})
    log.close()
    assert _strict((tmp_path / "metrics.jsonl").read_text()) == {
        "step": 3,
        "loss": None,
        "egomcq": {"dual": {"Intra-video": None}},
    }
