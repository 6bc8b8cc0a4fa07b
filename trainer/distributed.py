"""Process-group helpers: torchrun setup, the gradient-carrying all_gather, and the global-batch sampler.

Only the trainer touches `torch.distributed`. With one process every helper degrades to the identity, so the same
code path runs on a laptop and on many GPUs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


DEVICE_HELP = (
    "auto (cuda if available, else cpu), cpu, cuda or cuda:N (default: auto); cuda means cuda:0, and under torchrun "
    "each process takes cuda:LOCAL_RANK, so there give auto or cuda, not an index"
)
_DEVICE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


def resolve_device(device: str, local_rank: int | None = None) -> torch.device:
    """The device `--device` names, checked before any work: "auto", "cpu", "cuda" or "cuda:N" with N below the
    number of visible GPUs. `local_rank` is LOCAL_RANK under torchrun, which picks the process's GPU ("auto" and
    "cuda" mean cuda:LOCAL_RANK; an explicit index is refused: torchrun assigns one GPU per process). ValueError
    (a bad argument) for any other name, and for a GPU that this machine or this torch build does not have."""
    match = _DEVICE.match(device)
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise ValueError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    kind, index = match.group(1), match.group(2)
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available (no GPU, or a torch build without CUDA)")
    if local_rank is not None and index is not None:
        raise ValueError(
            f"--device {device}: under torchrun each process uses cuda:LOCAL_RANK; give --device cuda (or auto) "
            "and choose the GPUs with CUDA_VISIBLE_DEVICES"
        )
    gpu = int(index) if index is not None else (local_rank or 0)
    count = torch.cuda.device_count()
    if gpu >= count:
        which = f"LOCAL_RANK {gpu} needs cuda:{gpu}" if index is None else f"cuda:{gpu} is not there"
        raise ValueError(f"--device {device}: {which}, but {count} CUDA device(s) are visible")
    return torch.device("cuda", gpu)


def setup(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), if any, on the
    device `resolve_device` checks.

    NCCL on GPUs, gloo on CPUs. Multi-node runs are torchrun's business: `--nnodes`, `--node-rank`,
    `--rdzv-endpoint` (see the README); nothing here changes.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank if "LOCAL_RANK" in os.environ else None)
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns world_size x this rank's slice of the gradient.

    Every rank computes the same global loss from the gathered tensor, so the gradient reaching rank r's slice is
    the full dL/d(slice_r) on every rank. Scaling by world_size undoes DDP's averaging, making a W-process run take
    exactly the step of one process over the whole global batch. (The official AllGather_multi returns the slice
    unscaled, i.e. gradients W times smaller; AdamW hides most of that, the scale-out test would not.)
    """

    @staticmethod
    def forward(ctx, tensor):
        world = dist.get_world_size()
        ctx.rank, ctx.size, ctx.world = dist.get_rank(), tensor.shape[0], world
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size] * ctx.world


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `tensor` along dim 0 (rank order), keeping the gradient path to the local part."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


@torch.no_grad()
def gather(tensor: torch.Tensor) -> torch.Tensor:
    """all_gather without gradient (inputs, labels, predictions)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's slice of each global batch of a per-epoch shuffled order.

    The order is a permutation seeded by (seed, epoch), identical on every rank (what DistributedSampler does), but
    each global batch is cut into contiguous per-rank slices, so gathering in rank order rebuilds the exact batch a
    single process would see. `start_batch` resumes mid-epoch at a data position saved in a checkpoint.
    """

    def __init__(
        self, num_items: int, global_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True
    ):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        if num_items < global_batch:
            raise ValueError(f"the dataset has {num_items} items, fewer than one global batch of {global_batch}")
        self.num_items, self.global_batch = num_items, global_batch
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.local_batch = global_batch // world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:  # batches per epoch (the last partial global batch is dropped)
        return self.num_items // self.global_batch - self.start_batch

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.num_items, generator=g).tolist()
        else:
            order = list(range(self.num_items))
        for b in range(self.start_batch, self.num_items // self.global_batch):
            start = b * self.global_batch + self.rank * self.local_batch
            yield order[start : start + self.local_batch]
