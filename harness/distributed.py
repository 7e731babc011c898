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

Strategies: ddp (wrap_ddp: replicas, gradients all-reduced as a sum) and fsdp (wrap_fsdp: FSDP2 fully_shard,
gradients reduce-scattered as a sum). Under fsdp every forward is a collective (all-gathers), so all ranks must
run the same forwards; checkpoints gather full tensors (full_state_dict, full_optimizer_state) so that they have
the one-process format and resume at any world size.
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
        # every rank is done before any rank tears the group down: a rank that destroyed it while a peer still had
        # a collective in flight aborted in gloo at exit ("terminate called without an active exception"). Not on
        # an error: torchrun ends the peers of a failed rank, and a barrier would only make them wait.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def resolve_strategy(strategy: str, lora: bool) -> str:
    """The strategy a multi-process run uses. auto -> ddp always: replicas with summed gradients, the path that
    equals one process for LoRA and for models that fit one device; a full fine-tuning too large for one device
    asks for fsdp explicitly (auto never changes how a run trains behind the user's back). fsdp = FSDP2
    fully_shard for full fine-tuning; with LoRA it is refused (the adapter is small and the frozen base would be
    all-gathered in every forward for nothing: use ddp)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed.strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    if strategy == "fsdp" and lora:
        raise ValueError("distributed.strategy: fsdp shards full fine-tuning only; with backbone.lora use ddp "
                         "(or auto)")
    return "ddp" if strategy == "auto" else strategy


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


# --- FSDP2 (distributed.strategy: fsdp) ---------------------------------------------------------------------------

# methods other than forward that run a backbone's weights (LLaDA's ML-Cache sampler and hidden states; a block's
# cached row forward): FSDP2 all-gathers around forward only, unless a method is registered
ROOT_FORWARD_METHODS = ("hidden_states", "ml_cache_refresh", "ml_cache_step")
BLOCK_FORWARD_METHODS = ("forward_rows",)


def wrap_fsdp(module: torch.nn.Module) -> torch.nn.Module:
    """torch's FSDP2 fully_shard over all ranks, in place: each transformer block (every element of the model's
    nn.ModuleLists) is one unit, then the root (embeddings, final norm, head). Gradients are reduce-scattered as
    a SUM: each rank's loss is already divided by the global token count, so the sum is the one-process gradient
    (FSDP2 averages by default). Build the optimizer after this: it must hold the shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
    device = next(module.parameters()).device
    mesh = init_device_mesh(device.type, (world_size(),))
    blocks = [b for lst in module.modules() if isinstance(lst, torch.nn.ModuleList) for b in lst]
    for block in blocks:
        fully_shard(block, mesh=mesh)
        for name in BLOCK_FORWARD_METHODS:
            if hasattr(block, name):
                register_fsdp_forward_method(block, name)
    fully_shard(module, mesh=mesh)
    for name in ROOT_FORWARD_METHODS:
        if hasattr(module, name):
            register_fsdp_forward_method(module, name)
    for unit in module.modules():   # the settings are per unit (not recursive)
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)   # a plain SUM: gloo has no PREMUL_SUM; factor 1 skips the divide
    return module


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor as a plain full tensor (a collective for a sharded one; clip_grad_norm_'s global norm over sharded
    gradients is replicated, so it costs nothing); a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kw)


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective (every rank calls it): the full tensors of a sharded module under their usual names, on rank 0's
    CPU; {} on the other ranks."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(module, options=_full_options(cpu_offload=True))


def load_full_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Every rank passes the same full tensors; each keeps its shard (a scatter per tensor, in key order: sorted
    here, since safetensors' load orders keys differently in each process)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    ordered = {k: state[k] for k in sorted(state)}
    result = set_model_state_dict(module, ordered, options=_full_options(strict=strict))
    if result.unexpected_keys:   # strict=False (a file of the trainable weights only) still refuses foreign keys
        raise ValueError(f"keys not in the model, e.g. {sorted(result.unexpected_keys)[:4]}")


def _optimizer_names(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter in the optimizer's order (the numbering of torch.optim's state_dict)."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Collective: the optimizer state of a sharded module with full tensors, in torch.optim's own layout
    (parameters numbered in optimizer order), which is what one process saves, so a checkpoint resumes at any
    world size. On rank 0's CPU; {} on the other ranks."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    by_name = get_optimizer_state_dict(module, optimizer, options=_full_options(cpu_offload=True))
    if not by_name:
        return {}
    index = {n: i for i, n in enumerate(_optimizer_names(module, optimizer))}
    return {"state": {index[n]: s for n, s in by_name["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]}


def load_full_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of full_optimizer_state (any world size wrote it): every rank passes it, each keeps its shards."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    names = _optimizer_names(module, optimizer)
    by_name = {"state": {names[i]: s for i, s in state["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(module, optimizer, by_name, options=_full_options())
