"""Hostile torch zip archives: listing tens of thousands of members costs the reader time in proportion to the
list, never its square (a duplicate name among them is found by counting once)."""

import signal
import zipfile

import pytest

from egovlp_deploy.checkpoint import CheckpointError, read_torch_checkpoint


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_many_members_with_one_twice_are_refused_quickly(tmp_path):
    path = tmp_path / "many.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a/data.pkl", b"\x80\x02}q\x00.")
        for i in range(60_000):
            archive.writestr(f"a/data/{i}", b"")
        archive.writestr("a/data/0", b"")  # zipfile warns about the duplicate name and writes it

    def expired(*_):
        raise AssertionError("reading the archive's names took more than 5 s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(5)
    try:
        with pytest.raises(CheckpointError, match="holds 'a/data/0' more than once"):
            read_torch_checkpoint(path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
