"""Process-group helpers: torchrun setup, the gradient-carrying all_gather, and the global-batch sampler.

Only the trainer touches `torch.distributed`. With one process every helper degrades to the identity, so the same
code path runs on a laptop and on many GPUs.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any

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


# Seconds a collective waits for the other processes before it fails (and with it the run, with an error naming the
# wait): a process that hangs (a stuck file system, a deadlock) stops the others after this long, not never. It must
# exceed the longest time one process works while the others wait for it: the start (imports, the demo tokenizer),
# rank 0's checkpoint save, a rank's share of an evaluation.
TIMEOUT_ENV = "EGOVLP_DIST_TIMEOUT_S"
_FAILURE_KEY = "egovlp/failed/"  # + rank: that process's error, for the others to name (see report_failure)
_store = None  # the process group's key-value store, kept past destroy_process_group (see report_failure)


def collective_timeout() -> datetime.timedelta | None:
    """The collectives' timeout that $EGOVLP_DIST_TIMEOUT_S sets (seconds), or None: torch's default, 30 minutes for
    gloo (CPU) and 10 for NCCL (GPU). ValueError (a bad argument) for a value that is not a positive number."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or not raw.strip():
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return datetime.timedelta(seconds=seconds)


def setup(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), if any, on the
    device `resolve_device` checks.

    NCCL on GPUs, gloo on CPUs. Multi-node runs are torchrun's business: `--nnodes`, `--node-rank`,
    `--rdzv-endpoint` (see the README); nothing here changes. A collective that waits longer than
    `collective_timeout()` ($EGOVLP_DIST_TIMEOUT_S, else torch's 30 minutes on gloo and 10 on NCCL) fails.
    """
    global _store
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank if "LOCAL_RANK" in os.environ else None)
    timeout = collective_timeout() if world > 1 else None
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        options = {} if timeout is None else {"timeout": timeout}
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", **options)
        try:
            _store = dist.distributed_c10d._get_default_store()
        except (AttributeError, RuntimeError):  # a torch without it: errors then name no other process's failure
            _store = None
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def teardown() -> None:
    global _store
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _store = None


# -- a process that fails ----------------------------------------------------------------------------------------
# Where a collective's own failure comes from: gloo's transport (a closed connection, a timed-out receive) and the
# process groups' messages; an error of this process's work that names a path with "gloo" in it is none of these.
_COLLECTIVE_SOURCES = re.compile(r"gloo/transport|gloo/gloo/|ProcessGroupGloo|ProcessGroupNCCL|NCCL error")


def is_collective_failure(exc: BaseException) -> bool:
    """`exc` is a collective's own failure (another process stopped, or did not answer within the timeout), not an
    error of this process's work: torch's DistError, or the plain RuntimeError gloo raises."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return type(exc) is RuntimeError and _COLLECTIVE_SOURCES.search(str(exc)) is not None


def report_failure(info: DistInfo, exc: BaseException) -> None:
    """Leave this process's error (`Type: first line`) in the process group's store, where the other processes,
    whose next collective fails when this one leaves, read it to name this rank and the cause (`failure_message`).
    Nothing waits for them: under torchrun the store is its agent's and outlives every worker; without it (srun,
    mpirun) the store lives in rank 0's process, and goes with it — the others then say no error could be read, and
    rank 0's own output says why. Never raises."""
    if _store is None or not info.distributed or isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return  # an interrupt reaches every process alike: each says so itself
    from egovlp_deploy.errors import error_line

    try:
        _store.set_timeout(datetime.timedelta(seconds=5))
        _store.set(f"{_FAILURE_KEY}{info.rank}", error_line(exc, 500))
    except Exception:  # the store is gone (rank 0 exited first) or slow: the error of this process stands alone
        pass


def failure_message(info: DistInfo, exc: BaseException) -> str | None:
    """For a collective that failed (`is_collective_failure`): what this process knows of why, naming the processes
    that reported an error (`report_failure`) and the timeout where none did; None for any other error."""
    if not is_collective_failure(exc):
        return None
    reports = {}
    if _store is not None:
        try:
            _store.set_timeout(datetime.timedelta(seconds=5))
            for rank in range(info.world_size):
                key = f"{_FAILURE_KEY}{rank}"
                if rank != info.rank and _store.check([key]):
                    reports[rank] = _store.get(key).decode(errors="replace")
        except Exception:  # the store went with a process that stopped (rank 0 hosts it without torchrun's agent)
            pass
    first = next((x.strip() for x in str(exc).splitlines() if x.strip()), "")
    first = re.sub(r"^\[[^\]]*\] ", "", first).split(". ")[0][:300]  # without gloo's source position and advice
    timeout = collective_timeout()
    waited = f"{timeout.total_seconds():g} s" if timeout else "torch's default, 30 min on gloo and 10 on NCCL"
    if reports:
        cause = "; ".join(f"rank {rank} stopped with {line}" for rank, line in sorted(reports.items()))
    elif "timed out" in first.lower() or "timeout" in first.lower():
        cause = f"another process did not answer within the collectives' timeout, {waited} (${TIMEOUT_ENV} sets it)"
    else:
        cause = (
            "no other process's error could be read: one was killed (out of memory, a signal), its machine is gone, "
            "or rank 0 stopped (without torchrun its error goes with it: its own output says why)"
        )
    return f"rank {info.rank} of {info.world_size}: a collective with the other processes failed ({first}): {cause}"


def agreement_problems(info: DistInfo, what: dict[str, Any]) -> list[str]:
    """Compare `what` (name -> a JSON-able value each process computes for itself) across the processes, by
    digest: "name: rank R differs from rank 0" for each that differs, the same list on every process ([] with
    one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return []
    mine = {k: hashlib.sha256(json.dumps(v, sort_keys=True, default=str).encode()).hexdigest() for k, v in what.items()}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    problems = []
    for name in what:
        ranks = [r for r in range(1, len(every)) if every[r].get(name) != every[0].get(name)]
        if ranks:
            which = f"ranks {', '.join(map(str, ranks))} differ" if len(ranks) > 1 else f"rank {ranks[0]} differs"
            problems.append(f"{name}: {which} from rank 0")
    return problems


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


def all_true(flag: bool, device: torch.device | None = None) -> bool:
    """Whether `flag` holds on every process: a decision every process takes alike (skip a step or take it)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = torch.tensor([int(bool(flag))], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())
    return bool(flag)


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
