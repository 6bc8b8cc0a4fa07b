"""Shared fixtures. Triton kernels run in the interpreter where there is no GPU, so set it before any import."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from egovlp_deploy import EgoVLPv2, EgoVLPv2Config
from official_format import randomize_
from shared_folders import changed_shared_folders

# Under pytest-xdist (`make test` runs one worker per core) each worker gets its share of the cores: more torch
# threads than cores make OpenMP's waiting threads spin against the other worker's.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture
def tiny_config():
    return EgoVLPv2Config.tiny()


@pytest.fixture
def tiny_model(tiny_config):
    """A tiny model with every weight random and non-zero gates, so every path matters."""
    model = EgoVLPv2(tiny_config)
    randomize_(model, seed=7)
    return model.eval()


def make_inputs(config, batch=2, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    v, t = config.video, config.text
    video = torch.randn(batch, v.num_frames, v.in_chans, v.img_size, v.img_size, generator=g)
    ids = torch.randint(5, t.vocab_size, (batch, length), generator=g)
    ids[:, 0] = t.bos_token_id
    ids[:, -1] = t.eos_token_id
    if batch > 1:  # the last row is padded
        ids[-1, length - 3] = t.eos_token_id
        ids[-1, length - 2 :] = t.pad_token_id
    return video, ids, ids.ne(t.pad_token_id).long()


@pytest.fixture
def tiny_inputs(tiny_config):
    return make_inputs(tiny_config)


@pytest.fixture(scope="session")
def demo_tokenizer_dir(tmp_path_factory):
    from egovlp_deploy.tokenizer import train_demo_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_demo_tokenizer(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def _shared_folders_stay_unchanged():
    """A test that wrote into a folder of `built_once` would change what tests on the other workers read: fail."""
    yield
    changed = changed_shared_folders()
    assert not changed, f"a test changed a shared folder (copy it before changing it): {changed}"
