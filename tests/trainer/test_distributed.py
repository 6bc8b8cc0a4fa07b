"""The global-batch sampler and the single-process behaviour of the gathers."""

import pytest
import torch

from egovlp_deploy.trainer.distributed import GlobalBatchSampler, gather, gather_with_grad


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
