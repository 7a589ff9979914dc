"""torch.distributed helpers; every function is a no-op (or identity) at world size 1."""

from __future__ import annotations

import datetime
import os
import socket
import time

import torch
import torch.distributed as dist

from .errors import ReportedError, UserError


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CollectiveTimeoutError(RuntimeError):
    """A collective did not complete within the process group's timeout: some rank stopped responding."""


def init_process_group(backend: str, rank: int, world_size: int, init_method: str = "env://",
                       timeout_s: float | None = None) -> None:
    """Initialise torch.distributed; with ``env://`` and no MASTER_ADDR, default to localhost.

    ``timeout_s``: how long any collective may wait for the other ranks (torch's default, 30 min, when None).
    With gloo a collective that waits longer raises on every rank that waits, so a stopped or hung rank ends
    the job instead of blocking it forever (:func:`describe_timeout` names the rank). With NCCL the same needs
    ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1`` (torch's default since 2.2).
    """
    if init_method == "env://":
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
    kwargs = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
    dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=world_size, **kwargs)


def is_timeout(e: BaseException) -> bool:
    """True for the errors torch raises when a collective times out (gloo and NCCL word them differently)."""
    text = str(e).lower()
    return isinstance(e, (RuntimeError, dist.DistBackendError)) and ("timed out" in text or "timeout" in text)


def describe_timeout(e: BaseException, timeout_s: float | None, probe_s: float = 10.0) -> str:
    """A one-line message for a collective timeout naming the rank(s) that did not respond.

    After a timeout the process group's connections are closed, so the ranks take a roll call through the
    rendezvous store instead: every live rank reaches this point within about the same timeout, writes its name,
    and after ``probe_s`` the names that are missing are the stopped ranks. If the store itself does not answer,
    rank 0 (which hosts it) is the one that stopped.
    """
    rank, world = get_rank(), get_world_size()
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"smallssl/alive/{rank}", "1")
        deadline = time.time() + probe_s
        while True:
            missing = [r for r in range(world) if not store.check([f"smallssl/alive/{r}"])]
            if not missing or time.time() > deadline:
                break
            time.sleep(0.5)
        stuck = f"rank(s) {', '.join(map(str, missing))} did not respond" if missing else \
            "every rank answered a roll call afterwards (a slow step, not a stopped rank?)"
    except Exception:  # noqa: BLE001 - an unreachable store means its host, rank 0, stopped
        stuck = "rank(s) 0 did not respond (the rendezvous store it hosts is unreachable)"
    waited = f"{timeout_s:g} s" if timeout_s else "the process-group timeout"
    return (f"a collective timed out on rank {rank} after {waited}: {stuck} (stopped, hung or killed). The job "
            "stops; resume with --resume auto. Raise --dist-timeout if a rank legitimately needs longer (e.g. a "
            "slow checkpoint or evaluation)")


def barrier() -> None:
    if is_dist():
        dist.barrier()


@torch.no_grad()
def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from every rank along dim 0 (no gradient), rank order."""
    if not is_dist():
        return x
    out = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (returns ``x``)."""
    if is_dist():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= get_world_size()
    return x


def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_dist():
        dist.broadcast(x, src)
    return x


def any_rank(*flags: bool, device: torch.device | str = "cpu") -> tuple[bool, ...]:
    """For each flag, True if it is true on any rank (one collective for all; identity at world size 1)."""
    if not is_dist():
        return tuple(bool(f) for f in flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v > 0) for v in t.tolist())

# ---------------------------------------------------------------------------- collectives with autograd
class _GatherWithGrad(torch.autograd.Function):
    """All-gather (B, D) from every rank into (W B, D); backward sums the incoming gradients over ranks and
    returns this rank's rows (works on gloo, which has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x)
        ctx.rows = (dist.get_rank() * x.shape[0], (dist.get_rank() + 1) * x.shape[0])
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        g = g.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g[ctx.rows[0]:ctx.rows[1]]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (world * B, ...) in rank order, differentiable (SimCLR's global negatives); identity at world
    size 1."""
    return _GatherWithGrad.apply(x) if get_world_size() > 1 else x


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; backward sums the incoming gradients over ranks (every rank holds the same loss)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        g = g.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g


def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over ranks (Barlow Twins' global cross-correlation); identity at world size 1.
    ``kernels/sinkhorn.py`` keeps its own all-reduce so that ``kernels`` imports nothing from smallssl."""
    return _AllReduceSum.apply(x) if get_world_size() > 1 else x


# ------------------------------------------------------------------------------------------ process layout
def env_distributed() -> bool:
    """Launched by torchrun / Slurm with ``RANK`` and ``WORLD_SIZE`` in the environment."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def use_cuda(device: str) -> bool:
    """``device`` is ``auto`` (CUDA when visible), ``cpu`` or ``cuda`` (an error when none is visible)."""
    if device == "cpu":
        return False
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA GPU is visible; use --device cpu")
    return torch.cuda.is_available()


def procs_per_node(multiprocessing_distributed: bool, nproc_per_node: int | None, cuda: bool) -> int:
    """Processes per node: torchrun's / Slurm's, else ``nproc_per_node`` (default: #GPUs, or 1 on CPU)."""
    if env_distributed():
        # torchrun sets LOCAL_WORLD_SIZE; Slurm sets SLURM_NTASKS_PER_NODE (e.g. "2" or "2(x3)"); else one node.
        local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
        return int(local) if local and int(local) > 0 else int(os.environ["WORLD_SIZE"])
    if multiprocessing_distributed:
        return nproc_per_node or (torch.cuda.device_count() if cuda else 1)
    return 1


def world_size_of(nproc: int, nodes: int) -> int:
    """Total processes: the environment's ``WORLD_SIZE`` under torchrun / Slurm, else ``nproc x nodes``."""
    return int(os.environ["WORLD_SIZE"]) if env_distributed() else nproc * max(nodes, 1)


def spawn(fn, nproc: int, args: tuple, forward_signals: tuple[str, ...] = ("SIGTERM", "SIGUSR2")):
    """Run ``fn(local_rank, *args, result_queue)`` in ``nproc`` spawned processes; return what rank 0 put.

    Signals named in ``forward_signals`` that reach this (parent) process are passed on to every child, so that
    ``timeout`` or a scheduler signalling only the parent still gets an iteration-level checkpoint.
    """
    import signal

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    result_q = ctx.SimpleQueue()
    pc = mp.start_processes(fn, nprocs=nproc, args=(*args, result_q), start_method="spawn", join=False)

    def forward(signum, _frame):
        for p in pc.processes:
            if p.is_alive():
                os.kill(p.pid, signum)

    previous = {name: signal.signal(getattr(signal, name), forward) for name in forward_signals}
    try:
        while not pc.join(grace_period=5):  # a failed rank: the others get 5 s, then SIGTERM, then SIGKILL
            pass
    except mp.ProcessExitedException as e:
        if e.exit_code == 2:  # the rank printed its one-line error already
            raise ReportedError(f"training process {e.error_index} stopped with an error") from None
        raise UserError(f"training process {e.error_index} died ({e}); the other processes were stopped. "
                        "Resume with --resume auto") from None
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)
    return result_q.get() if not result_q.empty() else {}


@torch.no_grad()
def replicas_in_sync(module: torch.nn.Module, device: torch.device) -> bool:
    """True when every rank holds the same parameters and buffers (queue included); raises otherwise.

    BN running statistics are per rank (``broadcast_buffers=False``, as in official MoCo) and not compared.
    """
    sums = torch.stack([t.detach().double().sum() for k, t in module.state_dict().items()
                        if t.is_floating_point() and not k.endswith(("running_mean", "running_var"))])
    gathered = all_gather_cat(sums.to(device)[None])
    if not torch.equal(gathered.min(0).values, gathered.max(0).values):
        raise RuntimeError("replicas diverged across ranks (parameters or queue differ); this is a bug")
    return True
