"""torch.distributed for `harness train` and `harness eval` under torchrun (and `accelerate launch`, which
starts processes the same way): the process group, which rank owns what, and the few collectives the trainer
and the evaluation path use. Nothing here launches processes or implements a collective: torchrun starts the
ranks and sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; torch.distributed does the rest.

One process (no torchrun, or WORLD_SIZE=1) never creates a process group, and every function here is then a
no-op or the identity, so single-process runs are unchanged.

Backend: gloo for CPU tensors always; with CUDA present the group is "cpu:gloo,cuda:nccl" (CUDA tensors, e.g.
DDP's gradient buckets, go over NCCL; the small objects gathered here stay on the CPU over gloo). Collectives
time out after HARNESS_DIST_TIMEOUT_S seconds (default 1800): a rank that dies makes torchrun end every rank,
and a rank stuck in a collective fails with torch's timeout error instead of hanging.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Callable

import torch

STRATEGIES = ("auto", "ddp", "fsdp")
DEFAULT_TIMEOUT_S = 1800


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun / accelerate set it (1 when not launched by them)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not a number") from None


def _dist():
    import torch.distributed as dist
    return dist


def active() -> bool:
    """A process group with more than one rank is up."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return _dist().get_rank() if active() else 0


def world_size() -> int:
    return _dist().get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if active() else 0


def is_main() -> bool:
    return rank() == 0


def rank_prefix() -> str:
    """"[rank r/W] " in front of a message of a multi-process job (also after its group is down), "" otherwise."""
    if active():
        return f"[rank {rank()}/{world_size()}] "
    world = os.environ.get("WORLD_SIZE", "1")
    return f"[rank {os.environ.get('RANK', '?')}/{world}] " if world.isdigit() and int(world) > 1 else ""


def backend_name() -> str:
    forced = os.environ.get("HARNESS_DIST_BACKEND")
    if forced:
        return forced
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


@contextlib.contextmanager
def session():
    """Bring the default process group up when launched with WORLD_SIZE > 1 (and it is not up yet), take it
    down at the end. A no-op in one process."""
    world = launched_world_size()
    dist = _dist()
    if world <= 1 or dist.is_initialized():
        yield
        return
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; run with one process")
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise ValueError(f"WORLD_SIZE={world} but {key} is not set; start multi-process jobs with torchrun "
                             f"(torchrun --nproc-per-node {world} --no-python harness ...) or accelerate launch")
    try:
        timeout = float(os.environ.get("HARNESS_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    except ValueError:
        raise ValueError(f"HARNESS_DIST_TIMEOUT_S={os.environ['HARNESS_DIST_TIMEOUT_S']!r} is not a number") from None
    backend = backend_name()
    if "nccl" in backend and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
    try:
        yield
    finally:
        dist.destroy_process_group()


def resolve_strategy(strategy: str, lora: bool) -> str:
    """auto -> ddp (replicas with summed gradients; LoRA and models that fit one device). fsdp is not built yet."""
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed.strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    if strategy == "fsdp":
        raise ValueError("distributed.strategy: fsdp (FSDP2 fully_shard for full fine-tuning of 8B backbones) is "
                         "not supported yet; use ddp (LoRA, or full fine-tuning of a model that fits one device)")
    return "ddp"


# --- who does what ----------------------------------------------------------------------------------------------

def share(n: int, what: str = "items") -> tuple[int, int]:
    """[lo, hi) of this rank's contiguous block of n items that must divide evenly (training: prompt groups)."""
    w = world_size()
    if n % w:
        raise ValueError(f"{what} = {n} does not divide over {w} processes; use a multiple of {w} (each process "
                         f"takes whole prompt groups; nothing is padded or duplicated)")
    per = n // w
    return rank() * per, (rank() + 1) * per


def split_blocks(n_blocks: int) -> tuple[int, int]:
    """[lo, hi) of this rank's contiguous run of n_blocks blocks (uneven: the first n % W ranks take one more)."""
    w, r = world_size(), rank()
    base, extra = divmod(n_blocks, w)
    lo = r * base + min(r, extra)
    return lo, lo + base + (1 if r < extra else 0)


# --- collectives (identities in one process) --------------------------------------------------------------------

def barrier() -> None:
    if active():
        _dist().barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """obj of every rank, in rank order ([obj] in one process)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    _dist().all_gather_object(out, obj)
    return out


def gather_tensors(t: torch.Tensor | None) -> torch.Tensor | None:
    """Concatenation (dim 0, rank order) of every rank's tensor, on t's device; t itself in one process."""
    if not active() or t is None:
        return t
    parts = all_gather_objects(t.detach().cpu())
    return torch.cat(parts).to(t.device)


def all_reduce_max(values: list[float]) -> list[float]:
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    _dist().all_reduce(t, op=_dist().ReduceOp.MAX)
    return t.tolist()


def all_reduce_sum(values: list[float]) -> list[float]:
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    _dist().all_reduce(t)
    return t.tolist()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's obj on every rank."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


_REBUILDABLE = {c.__name__: c for c in (ValueError, KeyError, FileNotFoundError, FileExistsError, PermissionError,
                                         NotADirectoryError, IsADirectoryError, OSError, ImportError, RuntimeError)}


def on_main(fn: Callable[[], Any]) -> Any:
    """fn() on rank 0 only, its result on every rank. When it raises, every rank raises an error with the same
    message (the same type where it is a builtin error), so the whole job stops with one clear line instead of
    the other ranks waiting in their next collective. In one process: fn()."""
    if not active():
        return fn()
    outcome = None
    if is_main():
        try:
            outcome = ("ok", fn())
        except Exception as e:  # noqa: BLE001 -- re-raised below on every rank
            error = e
            outcome = ("error", type(e).__name__, e.args[0] if isinstance(e, KeyError) and e.args else str(e))
    outcome = broadcast_object(outcome)
    if outcome[0] == "ok":
        return outcome[1]
    if is_main():
        raise error
    cls = _REBUILDABLE.get(outcome[1], RuntimeError)
    raise cls(f"rank 0 failed: {outcome[2]}" if cls is RuntimeError else outcome[2])


# --- gradients ----------------------------------------------------------------------------------------------------

def _sum_hook(state, bucket):
    """DDP comm hook: the SUM of the ranks' gradients (DDP's default divides by the world size). The loss of each
    rank is already divided by the global token count, so the sum is the one-process gradient."""
    fut = _dist().all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def wrap_ddp(module: torch.nn.Module) -> torch.nn.Module:
    """torch's DistributedDataParallel around module, gradients summed over ranks (see _sum_hook)."""
    import warnings
    from torch.nn.parallel import DistributedDataParallel as DDP
    device = next(module.parameters()).device
    with warnings.catch_warnings():   # broadcast_buffers=False: the replicas' buffers are equal by construction
        warnings.simplefilter("ignore", FutureWarning)
        ddp = DDP(module, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False)
    ddp.register_comm_hook(None, _sum_hook)
    return ddp
