"""Files and folders we write atomically get the permissions a plain open()/mkdir() would give under the umask
(tempfile alone makes them 0o600/0o700: an index or engines folder another user or a serving container cannot
read), and a replaced file keeps its mode."""

import os
import stat

import pytest

from egovlp_deploy.checkpoint import atomic_write_bytes, make_temp_dir


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_new_file_follows_umask(tmp_path, umask, mask):
    umask(mask)
    atomic_write_bytes(tmp_path / "a.json", b"{}")
    plain = tmp_path / "plain"
    plain.write_bytes(b"{}")
    assert mode(tmp_path / "a.json") == mode(plain) == 0o666 & ~mask


def test_replaced_file_keeps_its_mode(tmp_path, umask):
    target = tmp_path / "index.json"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    atomic_write_bytes(target, [b"new", b"er"])
    assert target.read_bytes() == b"newer" and mode(target) == 0o640


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_temp_folder_follows_umask(tmp_path, umask, mask):
    umask(mask)
    assert mode(make_temp_dir(tmp_path, ".x.")) == 0o777 & ~mask


def test_trainer_checkpoint_and_tokenizer_folders_are_readable(tmp_path, umask, tiny_model):
    from egovlp_deploy.tokenizer import train_demo_tokenizer
    from egovlp_deploy.trainer.training_state import save_checkpoint

    umask(0o022)
    step = save_checkpoint(tmp_path / "run", 1, tiny_model, {"step": 1}, {"recipe": "test"})
    assert mode(step) == 0o755
    assert {mode(p) for p in step.iterdir()} == {0o644}
    tok = tmp_path / "tokenizer"
    train_demo_tokenizer(tok, ["a cup on the table", "the person opens a door"] * 4, vocab_size=300)
    assert mode(tok) == 0o755


def test_safetensors_metadata_comes_out_in_one_order(tmp_path):
    """The safetensors library keeps metadata in a hash map seeded per process: the same tensors and metadata gave
    other bytes from one run to the next (features promised bit-identical resumed outputs)."""
    import subprocess
    import sys

    script = (
        "import sys, numpy as np; from safetensors.numpy import save; "
        "from egovlp_deploy.checkpoint import stable_safetensors; "
        "meta = {k: k * 3 for k in ('source', 'settings', 'model_id', 'video', 'a', 'z')}; "
        "parts = stable_safetensors(save({'x': np.ones(3)}, metadata=meta)); "
        "sys.stdout.buffer.write(b''.join(bytes(p) for p in parts))"
    )
    outs = {subprocess.run([sys.executable, "-c", script], capture_output=True, check=True).stdout for _ in range(4)}
    assert len(outs) == 1
    from safetensors import safe_open

    (tmp_path / "a.safetensors").write_bytes(outs.pop())
    with safe_open(str(tmp_path / "a.safetensors"), framework="numpy") as f:
        assert f.metadata()["source"] == "sourcesourcesource" and f.get_tensor("x").tolist() == [1.0, 1.0, 1.0]
