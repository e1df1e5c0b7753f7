"""Process group set-up: NCCL on GPUs, gloo on CPU; also runs as a single plain process."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device_id(self):
        """The CUDA device index this process uses (None on CPU), for DALI and FAISS: torch's
        ``local_rank % device_count``, not ``local_rank`` (SLURM often shows each rank one GPU)."""
        return self.device.index if self.device.type == "cuda" else None


def setup() -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and join the process group."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kw = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30), **kw)
    return DistInfo(rank, world, local, device)


def deterministic() -> None:
    """Deterministic kernels (``train.deterministic``): cuBLAS needs a fixed workspace, set
    before its first matmul, or ``torch.use_deterministic_algorithms`` makes that matmul raise."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def wrap_ddp(model: torch.nn.Module, find_unused_parameters: bool = False, keep_local=()):
    """DDP over ``model``.  ``keep_local``: names of buffers the method keeps identical on every
    rank itself (InvP's memory bank and kNN graph, updated with every rank's all-gathered
    batch), which DDP must not re-broadcast from rank 0 at every forward (~700 MB a step for a
    1.28M x 128 bank); the other buffers (BatchNorm statistics) are broadcast as usual."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if keep_local:
        DDP._set_params_and_buffers_to_ignore_for_model(model, list(keep_local))
    return DDP(model, find_unused_parameters=find_unused_parameters)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank (so that all ranks stop together)."""
    return any_ranks([flag], device)[0]


def any_ranks(flags, device: torch.device):
    """``any_rank`` for several flags (bools or 0-d tensors) in one all-reduce and one sync."""
    t = torch.stack([torch.as_tensor(f, device=device).float().reshape(()) for f in flags])
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [v > 0 for v in t.tolist()]


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (pickled; for small host-side results such as a clustering)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= dist.get_world_size()
    return x


def fingerprint(tensors) -> torch.Tensor:
    """(len, 4) float64 digest of each tensor, viewed as rows (its first dimension) x the rest:
    sum, sum of squares, and the row sums and column sums each weighted by their position.
    The weighted sums change when entries move between rows or columns, which the first two
    cannot see (an L2-normalised memory bank keeps its sum of squares fixed at N whatever it
    holds).  Accumulated in float64 without a float64 copy of the tensor (a 1.28M x 128 bank
    is checked every epoch)."""
    f64 = torch.float64
    out = []
    for t in tensors:
        x = t.detach()
        x = x.reshape(len(x), -1) if x.dim() > 1 else x.reshape(-1, 1)
        if not x.is_floating_point():
            x = x.double()  # integer state (a kNN graph) is small
        r, c = x.sum(1, dtype=f64), x.sum(0, dtype=f64)
        out.append(
            torch.stack(
                [
                    r.sum(),
                    torch.linalg.vector_norm(x, dtype=f64) ** 2,
                    (r * torch.arange(1, len(r) + 1, device=x.device, dtype=f64)).sum(),
                    (c * torch.arange(1, len(c) + 1, device=x.device, dtype=f64)).sum(),
                ]
            )
        )
    return torch.stack(out)


def same_on_all_ranks(tensors, device: torch.device) -> bool:
    """Whether every rank holds bit-identical ``tensors`` (a module: its parameters), compared by
    their ``fingerprint``.  Buffers of a module are left out: BatchNorm running statistics come
    from each rank's own last batch (DDP re-broadcasts rank 0's at the next forward); method
    state such as a memory bank is passed in by its method."""
    if not dist.is_initialized():
        return True
    if isinstance(tensors, torch.nn.Module):
        tensors = tensors.parameters()
    with torch.no_grad():
        fp = fingerprint([t for t in tensors if t.numel()]).to(device)
    ref = fp.clone()
    dist.broadcast(ref, 0)
    ok = torch.tensor([1.0 if torch.equal(fp, ref) else 0.0], device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() == 1.0)
