"""An AOTInductor package is native code that loading runs: the runtime loads the very bytes it checked against the
manifest, so a package replaced after the check (a race with whoever can write the engines folder) never runs.

No real package is built: the loader is replaced by one that records the bytes it is given."""

import pytest
import torch

from egovlp_deploy.config import EgoVLPv2Config
from egovlp_deploy.export import manifest as manifest_module
from egovlp_deploy.export.manifest import Manifest, io_entry
from egovlp_deploy.runtime.engines import EngineError, Runtime

GOOD, EVIL = b"PK good package bytes " * 64, b"PK evil package bytes " * 64


def _engines(tmp_path):
    folder = tmp_path / "engines"
    package = folder / "aoti" / "cpu_fp32" / "video_encoder.pt2"
    package.parent.mkdir(parents=True)
    package.write_bytes(GOOD)
    config = EgoVLPv2Config.tiny()
    manifest = Manifest(source_checkpoint={}, model_config=config.to_dict(), export={"max_batch": 2, "max_text_len": 8})
    io = io_entry("video_encoder", config, "fp32", 2, 8)
    manifest.add(folder, package, role="video_encoder", format="aoti", precision="fp32", io=io, device="cpu")
    manifest.save(folder)
    return folder, package


class _Loaded(Exception):
    pass


@pytest.fixture
def loads(monkeypatch):
    """The bytes each aoti_load_package call was given; the call then fails (nothing is run)."""
    seen = []

    def fake_load(path, *args, **kwargs):
        with open(path, "rb") as f:
            seen.append(f.read())
        raise _Loaded("fake loader")

    monkeypatch.setattr(torch._inductor, "aoti_load_package", fake_load)
    return seen


def test_a_package_replaced_after_the_check_never_reaches_the_loader(tmp_path, monkeypatch, loads):
    folder, package = _engines(tmp_path)
    real_check = manifest_module.check_tool_versions

    def check_then_swap(*args, **kwargs):  # runs after the size and sha256 checks of verify_artifact
        real_check(*args, **kwargs)
        package.write_bytes(EVIL)

    monkeypatch.setattr(manifest_module, "check_tool_versions", check_then_swap)
    with pytest.raises(EngineError, match="not the one the manifest hashes"):
        Runtime(folder, backend="aoti", warmup=False).runner("video_encoder")
    assert EVIL not in loads


def test_the_checked_package_is_what_the_loader_reads(tmp_path, loads):
    folder, _ = _engines(tmp_path)
    with pytest.raises(EngineError, match="fake loader"):
        Runtime(folder, backend="aoti", warmup=False).runner("video_encoder")
    assert loads == [GOOD]


def test_the_help_says_a_package_is_code(capsys):
    from egovlp_deploy.cli import main

    with pytest.raises(SystemExit):
        main(["search", "--help"])
    assert "native code" in " ".join(capsys.readouterr().out.split())


def test_a_temp_folder_that_cannot_take_the_copy_is_named(tmp_path, monkeypatch, loads):
    """The private copy needs room in the temp folder: a write that fails there (a full disk, a file-size limit) says
    so, instead of "cannot load the AOTInductor package (File too large)"."""
    import builtins
    import errno
    import io

    folder, _ = _engines(tmp_path)
    real_open = builtins.open

    class Full(io.BufferedWriter):
        def write(self, data):
            raise OSError(errno.EFBIG, "File too large")

    def full_copies(file, mode="r", *args, **kwargs):
        return Full(io.FileIO(file, "xb")) if mode == "xb" else real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_copies)
    with pytest.raises(EngineError, match=r"cannot copy it to .*package\.pt2 .*File too large.*needs room for a copy"):
        Runtime(folder, backend="aoti", warmup=False).runner("video_encoder")
    assert loads == []


def test_a_package_is_hashed_once_on_the_bytes_loaded_and_a_changed_one_is_refused(tmp_path, monkeypatch, loads):
    """The manifest check leaves the package's sha256 to the private copy's hash (one pass over gigabytes, not
    two), and a package changed before the load (same size, other bytes) still never reaches the loader."""
    folder, package = _engines(tmp_path)
    hashed = []
    real = manifest_module.sha256_verified
    monkeypatch.setattr(manifest_module, "sha256_verified", lambda path: hashed.append(path) or real(path))
    with pytest.raises(EngineError, match="fake loader"):
        Runtime(folder, backend="aoti", warmup=False).runner("video_encoder")
    assert loads == [GOOD] and package not in map(type(package), hashed)
    package.write_bytes(EVIL)  # as long as GOOD
    with pytest.raises(EngineError, match="not the one the manifest hashes"):
        Runtime(folder, backend="aoti", warmup=False).runner("video_encoder")
    assert loads == [GOOD]
