"""A pickle's memo lets a few hundred bytes build a tuple holding the same tuple twice, forty levels deep; hashing it
as a dict key takes 2^40 steps inside C code that no signal interrupts. The checkpoint readers refuse such a pickle
before unpickling it, in torch's zip format and in the legacy format (header pickles and the main one).

The reads run in a child process with a timeout: a reader that hangs there fails the test instead of hanging it."""

import pickle
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

from egovlp_deploy.checkpoint import _pickle_expansion

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def hash_bomb(levels: int = 40) -> bytes:
    """Protocol-2 pickle of {t: 1} where t_0 = () and t_{i+1} = (t_i, t_i), each level taken from the memo."""
    ops = bytearray(b"\x80\x02}")  # PROTO 2, EMPTY_DICT
    ops += b")q\x000"  # EMPTY_TUPLE, BINPUT 0, POP
    for i in range(levels):
        ops += b"h%ch%c\x86q%c0" % (i, i, i + 1)  # BINGET i, BINGET i, TUPLE2, BINPUT i+1, POP
    ops += b"h%cK\x01s." % levels  # BINGET levels, BININT1 1, SETITEM, STOP
    return bytes(ops)


def _run(paths) -> list[str]:
    code = textwrap.dedent(
        """
        import sys
        from egovlp_deploy.checkpoint import CheckpointError
        from egovlp_deploy.pretrained_init import read_state_dict
        for path in sys.argv[1:]:
            try:
                read_state_dict(path)
                print("loaded")
            except CheckpointError as exc:
                print(type(exc).__name__, str(exc).replace("\\n", " "))
        """
    )
    done = subprocess.run([sys.executable, "-c", code, *map(str, paths)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.splitlines()


def test_hash_bombs_are_refused_before_unpickling(tmp_path):
    bomb = hash_bomb()
    zipped = tmp_path / "zip.pth"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("a/data.pkl", bomb)
        archive.writestr("a/byteorder", b"little")
    header = pickle.dumps(_LEGACY_MAGIC, protocol=2) + pickle.dumps(1001, protocol=2)
    legacy_header = tmp_path / "legacy_header.pth"  # the bomb as the sys-info pickle
    legacy_header.write_bytes(header + bomb)
    legacy_main = tmp_path / "legacy_main.pth"  # the bomb as the main pickle
    legacy_main.write_bytes(header + pickle.dumps({"little_endian": True}, protocol=2) + bomb)
    lines = _run([zipped, legacy_header, legacy_main])
    assert len(lines) == 3
    for line in lines:
        assert "the pickle builds an object of" in line and "refusing a corrupt or hostile checkpoint" in line


def test_torch_pickles_expand_to_a_few_parts_per_opcode(tmp_path):
    import io

    shared = torch.ones(3)
    state = {"a": shared, "b": shared, "c": torch.zeros(2, 2)[:, 1], "meta": {"k": [1, (2, 3)] * 50}}
    torch.save(state, tmp_path / "x.pth")
    with zipfile.ZipFile(tmp_path / "x.pth") as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    count, largest = _pickle_expansion(io.BytesIO(data))
    assert 0 < largest < 4 * count
    assert _pickle_expansion(io.BytesIO(hash_bomb(20)))[1] > 2**20


@pytest.mark.parametrize(
    "variant",
    [
        lambda bomb: bomb[:-1],  # cut before STOP
        lambda bomb: bomb[:-1] + b"\xff",  # an unknown opcode in STOP's place
        lambda bomb: bomb[:2] + b"I0x10\n0" + bomb[2:],  # an INT the C unpickler reads in base 0, pickletools not
    ],
    ids=["truncated", "trailing-junk", "hex-int"],
)
def test_a_bomb_followed_by_a_malformed_part_is_refused_too(tmp_path, variant):
    """The unpickler runs the opcodes one by one: it builds and hashes the bomb before it meets what is malformed
    after it. A pickle the check cannot read through is refused, not handed on."""
    zipped = tmp_path / "zip.pth"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("a/data.pkl", variant(hash_bomb()))
        archive.writestr("a/byteorder", b"little")
    header = pickle.dumps(_LEGACY_MAGIC, protocol=2) + pickle.dumps(1001, protocol=2)
    legacy = tmp_path / "legacy_main.pth"
    legacy.write_bytes(header + pickle.dumps({"little_endian": True}, protocol=2) + variant(hash_bomb()))
    for line in _run([zipped, legacy]):
        assert "corrupt checkpoint: its pickle cannot be read" in line, line


@pytest.mark.parametrize(
    "opcode, error",
    [
        (b"\x8e" + (1 << 62).to_bytes(8, "little") + b"abc", "its pickle cannot be read (ValueError: expected"),
        (b"\x8d" + (1 << 62).to_bytes(8, "little") + b"abc", "its pickle cannot be read (ValueError: expected"),
        (b"\x95" + (1 << 62).to_bytes(8, "little") + b"K\x01.", "corrupt or truncated checkpoint (UnpicklingError"),
    ],
    ids=["BINBYTES8", "BINUNICODE8", "FRAME"],
)
def test_a_legacy_pickle_declaring_more_bytes_than_its_file_is_refused(tmp_path, opcode, error):
    """A legacy file is read as a stream: a length opcode (or a protocol-4 frame, which the expansion check does not
    read into) declaring 2^62 bytes made the file object try to allocate them (a bare MemoryError) before anything
    read the length against the file."""
    header = pickle.dumps(_LEGACY_MAGIC, protocol=2) + pickle.dumps(1001, protocol=2)
    legacy = tmp_path / "legacy_main.pth"
    legacy.write_bytes(header + pickle.dumps({"little_endian": True}, protocol=2) + b"\x80\x04" + opcode)
    (line,) = _run([legacy])
    assert error in line, line
