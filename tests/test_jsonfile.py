"""egovlp_deploy.jsonfile.read_json: one named error, chosen by the caller, for every way a JSON file can be bad."""

import pytest

from egovlp_deploy.config import ConfigError
from egovlp_deploy.jsonfile import read_json


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
