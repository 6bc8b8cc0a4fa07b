"""The global-batch sampler, the single-process behaviour of the gathers, and the --device check."""

import pytest
import torch

from egovlp_deploy.trainer import distributed
from egovlp_deploy.trainer.distributed import GlobalBatchSampler, gather, gather_with_grad, resolve_device


def test_rank_slices_rebuild_the_single_process_batches():
    single = list(GlobalBatchSampler(50, 8, seed=3))
    for world in (2, 4):
        per_rank = [list(GlobalBatchSampler(50, 8, rank=r, world_size=world, seed=3)) for r in range(world)]
        rebuilt = [sum((per_rank[r][b] for r in range(world)), []) for b in range(len(single))]
        assert rebuilt == single
    assert len(single) == 50 // 8 and len({i for b in single for i in b}) == 48  # no repeats within an epoch


def test_epochs_reshuffle_and_resume_mid_epoch():
    s = GlobalBatchSampler(40, 4, seed=1)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert e0 != e1 and sorted(sum(e0, [])) == sorted(sum(e1, []))
    s.set_epoch(1, start_batch=3)
    assert list(s) == e1[3:] and len(s) == len(e1) - 3


def test_sampler_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="not divisible"):
        GlobalBatchSampler(10, 3, world_size=2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchSampler(3, 4)


def test_single_process_gathers_are_identities():
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x and gather(x) is x


def _gpus(monkeypatch, count: int) -> list:
    """Pretend this torch sees `count` GPUs (0: a CPU-only build); returns the devices set_device is given."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


@pytest.mark.parametrize("name", ["tpu", "cuda:", "cuda:x", "cpu:0", "auto:1", "CUDA", " cuda", "cuda:-1"])
def test_device_names_other_than_auto_cpu_cuda_cuda_n_are_refused(monkeypatch, name):
    _gpus(monkeypatch, 2)
    with pytest.raises(ValueError, match=r"^--device .*: expected auto, cpu, cuda or cuda:N$"):
        resolve_device(name)


def test_cuda_on_a_machine_without_it_is_refused_and_auto_takes_the_cpu(monkeypatch):
    _gpus(monkeypatch, 0)
    for name in ("cuda", "cuda:0", "cuda:7"):
        with pytest.raises(ValueError, match=f"^--device {name}: CUDA is not available"):
            resolve_device(name)
    assert resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")


def test_an_explicit_gpu_index_is_honoured_and_checked(monkeypatch):
    chosen = _gpus(monkeypatch, 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("cuda") == resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"^--device cuda:2: cuda:2 is not there, but 2 CUDA device\(s\) are visible$"):
        resolve_device("cuda:2")
    info = distributed.setup("cuda:1")  # one process: the index is used, not LOCAL_RANK's default 0
    assert info.device == torch.device("cuda", 1) and chosen == [torch.device("cuda", 1)]


def test_under_torchrun_local_rank_picks_the_gpu(monkeypatch):
    _gpus(monkeypatch, 2)
    assert resolve_device("cuda", local_rank=1) == resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="under torchrun each process uses cuda:LOCAL_RANK; give --device cuda"):
        resolve_device("cuda:0", local_rank=1)
    with pytest.raises(ValueError, match="LOCAL_RANK 2 needs cuda:2, but 2 CUDA device"):
        resolve_device("cuda", local_rank=2)
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match="under torchrun"):
        distributed.setup("cuda:1")
