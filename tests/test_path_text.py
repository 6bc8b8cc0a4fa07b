"""File names as text: non-UTF-8 bytes and control characters never reach a terminal line or a UTF-8 writer raw."""

import os

from egovlp_deploy.path_text import printable, utf8_path


def test_non_utf8_bytes_become_escapes():
    name = os.fsdecode(b"/videos/caf\xe9.mp4")  # latin-1: a lone surrogate after fsdecode
    assert utf8_path(name) == "/videos/caf\\xe9.mp4"
    assert utf8_path(name).encode("utf-8")  # a UTF-8 writer takes it
    assert utf8_path("/videos/café ☕.mp4") == "/videos/café ☕.mp4"  # UTF-8 names stay as they are


def test_control_characters_cannot_split_a_line():
    assert printable("/v/a\nb\tc\x1b[31m.mp4") == "/v/a\\nb\\tc\\x1b[31m.mp4"
    assert "\n" not in printable(os.fsdecode(b"/v/x\n\xff.mp4"))
    assert printable("/v/kitchen (2) ☕.mp4") == "/v/kitchen (2) ☕.mp4"
