"""Scale-out under `torchrun`: the one place that knows whether this process is one of many.

`sparsecnn train` and `sparsecnn compare` run unchanged under
`torchrun --nproc-per-node N` (several nodes through torchrun's rendezvous). `start` reads
torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...), joins the process
group (NCCL on GPUs, gloo on the CPU) and gives this process its device: cuda:LOCAL_RANK.
Without torchrun nothing is initialised and every helper here is the one-process identity,
so the library code calls them unconditionally.

Every collective has a timeout (COLLECTIVE_TIMEOUT_S, env SPARSECNN_DIST_TIMEOUT_S): a
rank that dies or stalls makes the others fail instead of hanging; torchrun then stops the
whole job. The failing rank prints its own one-line error; a rank that fails only because a
peer went away says so in one line instead of a traceback (`_peer_failure_hook`).
"""
from __future__ import annotations

import atexit
import datetime
import os
import sys

import torch
import torch.distributed as dist

from ..common.errors import UserError

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# NCCL's own default; long enough for a rank that exports or evaluates a little more than the others.
COLLECTIVE_TIMEOUT_S = 600.0
# What gloo and the c10d store say when the other end of a collective has gone.
PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out", "timeout")


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in TORCHRUN_ENV)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that prints, shows progress and writes files."""
    return rank() == 0


def start(device_arg: str | None) -> torch.device:
    """This process's device; under torchrun, also join the process group (once).

    `device_arg` is the command's --device: auto/cuda become cuda:LOCAL_RANK under torchrun;
    an explicit cuda:N is refused when several processes share a node (they would share the GPU).
    """
    from ..runtimes import resolve_device

    device = resolve_device(device_arg)
    if not launched_by_torchrun():
        return device
    local_rank = int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    if device.type == "cuda":
        if device.index is not None and local_world > 1 and device.index != local_rank:
            raise UserError(f"--device {device_arg} under torchrun with {local_world} processes per node: each "
                            "process takes the GPU of its local rank; give --device cuda")
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} has no GPU: this node shows {torch.cuda.device_count()}; "
                            "give torchrun --nproc-per-node at most that many")
        device = torch.device("cuda", local_rank if device.index is None or local_world > 1 else device.index)
        torch.cuda.set_device(device)
    if not is_distributed():
        timeout = float(os.environ.get("SPARSECNN_DIST_TIMEOUT_S", COLLECTIVE_TIMEOUT_S))
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout), **kwargs)
        atexit.register(_finish)
        sys.excepthook = _peer_failure_hook(sys.excepthook, int(os.environ["RANK"]))
    return device


def _peer_failure_hook(previous, my_rank: int):
    """An uncaught error that only says a peer went away becomes one line; anything else is shown as is."""
    def hook(kind, exc, tb):
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else kind.__name__
        if isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and
                                               any(p in text.lower() for p in PEER_GONE)):
            print(f"sparsecnn: rank {my_rank} stopped: another process of this torchrun job failed or stalled "
                  f"({text[:120]}); its error is printed above", file=sys.stderr)
            return
        previous(kind, exc, tb)
    return hook


def _finish() -> None:
    if is_distributed():
        dist.destroy_process_group()


def main_only(fn):
    """`fn` on rank 0 (or the only process), a no-op elsewhere: one rank prints and logs for all."""
    return fn if is_main() else _nothing


def _nothing(*_args, **_kwargs) -> None:
    return None


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@torch.no_grad()
def broadcast_(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Overwrite `tensors` (same shapes and dtypes on every rank) with rank `src`'s, in one collective."""
    if not is_distributed() or not tensors:
        return
    if len({t.dtype for t in tensors}) > 1:  # mixed dtypes: one broadcast each
        for t in tensors:
            dist.broadcast(t, src)
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.broadcast(flat, src)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view(t.shape))
        offset += n


def broadcast_masks(masks: dict[str, torch.Tensor], src: int = 0) -> dict[str, torch.Tensor]:
    """Rank `src`'s keep-masks on every rank (computed once there, identical everywhere)."""
    if not is_distributed() or not masks:
        return masks
    names = sorted(masks)
    flat = [masks[n].to(_carrier(masks[n]), torch.uint8) for n in names]  # gloo and NCCL both carry uint8
    broadcast_(flat, src)
    return {n: f.to(masks[n].device).bool() for n, f in zip(names, flat)}


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of `t` (in place; returned for chaining)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` concatenated along dim 0 in rank order (first dims may differ)."""
    if not is_distributed():
        return t
    home = t.device
    t = t.to(_carrier(t))
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[:t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(home)


def _carrier(t: torch.Tensor) -> torch.device:
    """Where `t` must be for a collective: NCCL carries GPU tensors only."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` in DistributedDataParallel when distributed (gradients averaged over ranks), else itself.
    DDP broadcasts rank 0's parameters and buffers at construction: every rank starts identical."""
    if not is_distributed() or world_size() == 1:
        # one process has no peer to average with: DDP's reducer would only copy every gradient into
        # its buckets and all-reduce them with itself (measured on the H100, ResNet-18 at 64x64, batch
        # 512: 18 % longer epochs under `torchrun --nproc-per-node 1`); the rest of the distributed
        # path (sharding, mask broadcast, metric all-reduce) still runs
        return model
    from torch.nn.parallel import DistributedDataParallel

    # gradients are views into DDP's buckets: no copy into them before each all-reduce
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True)
