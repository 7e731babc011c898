"""The one GRPO loop: rollouts -> rewards -> group advantages -> K inner iterations of
PPO-clipped updates on per-token ratios (minus beta * k3-KL to a reference) -> checkpoints.

Everything random in a step is derived from (seed, step): which prompts, the rollout noise, the
views of each inner iteration. So a resumed run needs only weights, optimizer, scheduler and the
step to continue exactly as if it had never stopped.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import inspect
import json
import math
import os
import pickle
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from harness import distributed, registry
from harness.backbones.base import PromptBatch, mask_prompt_tokens, token_logprobs
from harness.checkpoint import load_weights
from harness.config import apply_overrides, dump_config, load_config, read_yaml, validate
from harness.io import append_jsonl, atomic_write_text, read_jsonl, sha256_file
from harness.runs import (ADAPTER_FILE, CONFIG_FILE, LOG_LINE_FILE, MODEL_FILE, TRAINER_STATE_FILE, RunDir,
                          weights_file)
from harness.samples import Sample, images_from_codes
from harness.sampling import Rollout, generate
from harness.shapes.prompts import sample_metadata
from trainers.config import TrainConfig
from trainers.methods import Method, RolloutTrace, View
from trainers.rewards import build_reward, group_advantages, object_credit


def derived_seed(*parts) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 62) - 1)


# --- the per-token objective ------------------------------------------------------------------------

def clipped_token_loss(logp, old_logp, ref_logp, adv_token, clip_eps: float, beta: float, kl_max_log_ratio: float | None = None):
    """Per-token loss = -(min(rho A, clip(rho) A) - beta * k3), k3 = exp(d) - d - 1 with d = ref - logp.

    k3's pull on a token grows as exp(d): one token the policy has pushed far below the reference can
    dominate a step (and then grad clipping shrinks the whole update). With kl_max_log_ratio = c, k3 is
    continued linearly beyond d = c, so the pull per token is at most exp(c) - 1 (Huber-style)."""
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.minimum(ratio * adv_token, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv_token)
    if beta > 0 and ref_logp is not None:
        d = ref_logp - logp
        if kl_max_log_ratio is None:
            kl = torch.exp(d) - d - 1
        else:
            dc = d.clamp(max=kl_max_log_ratio)
            e = torch.exp(dc)
            kl = e - dc - 1 + (e - 1) * (d - dc)
    else:
        kl = torch.zeros_like(logp)
    return -(surrogate - beta * kl), ratio, kl


# --- state --------------------------------------------------------------------------------------------

@dataclass
class Trainer:
    cfg: TrainConfig
    backbone: object
    method: Method
    reward: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    reference: object | None          # frozen module for full fine-tuning (sharded too under fsdp); None with LoRA
    sampler: object
    ema: dict[str, torch.Tensor] | None = None   # moving average of the trainable weights (optim.ema_decay > 0)
    ddp: torch.nn.Module | None = None           # under torchrun: DistributedDataParallel around backbone.module
    strategy: str = "single"                     # "single" (one process) or the resolved distributed.strategy
                                                 # (fsdp: backbone.module and reference are FSDP2-sharded in place)
    last_codes: torch.Tensor | None = None       # the last step's rollout codes, all ranks' (what tests compare)

    @contextlib.contextmanager
    def update_forward(self, sync: bool = True):
        """Forwards (and their backward) of an update: through the DDP wrapper under torchrun, gradients summed
        over ranks at the backward of a sync pass only (no_sync for the others); the plain module otherwise."""
        if self.ddp is None:
            yield
            return
        live = self.backbone.module
        self.backbone.module = self.ddp
        try:
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                yield
        finally:
            self.backbone.module = live

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.backbone.module.named_parameters() if p.requires_grad}

    def update_ema(self) -> None:
        if self.ema is not None:
            d = self.cfg.optim.ema_decay
            for n, p in self.trainable().items():
                self.ema[n].lerp_(p.detach(), 1 - d)

    @contextlib.contextmanager
    def averaged_weights(self):
        """The module holds the EMA weights inside the block (no-op without EMA), its live weights after."""
        if self.ema is None:
            yield
            return
        params = self.trainable()
        live = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.ema[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(live[n])

    @contextlib.contextmanager
    def weights_to_save(self, full: dict | None):
        """backbone.module as backbone.save must see it: the EMA weights when kept; under fsdp a stand-in holding
        the full tensors gathered from the ranks (gather_full_state), so the file is the one a single process writes."""
        if full is None:
            with self.averaged_weights():
                yield
            return
        live = self.backbone.module
        self.backbone.module = GatheredWeights(full["weights"], live)
        try:
            yield
        finally:
            self.backbone.module = live

    def reference_logprobs(self, prompts, codes, visible):
        if self.cfg.loss.beta_kl <= 0:
            return None
        if self.reference is None:   # LoRA: the base model is the model with the adapter switched off
            with self.backbone.module.disable_adapter():
                return token_logprobs(self.backbone, prompts, codes, visible).logp
        live = self.backbone.module
        self.backbone.module = self.reference
        try:
            return token_logprobs(self.backbone, prompts, codes, visible).logp
        finally:
            self.backbone.module = live


class GatheredWeights:
    """Stands in for an FSDP-sharded module while backbone.save writes it: state_dict() and named_parameters() give
    the gathered full tensors under the module's names, with its trainable set (save_trainable keeps only those)."""

    def __init__(self, state: dict[str, torch.Tensor], module: torch.nn.Module):
        self._state = state
        self._trainable = {n: p.requires_grad for n, p in module.named_parameters()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self._state)

    def named_parameters(self):
        for n, trainable in self._trainable.items():
            yield n, torch.nn.Parameter(self._state[n], requires_grad=trainable)


def lr_factor(o, step: int, total_steps: int) -> float:
    """Multiplier of optim.lr at a training step (0-based): linear warm-up over warmup_steps, then constant or
    a cosine from 1 down to min_lr_ratio at the last step."""
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    span = max(1, total_steps - 1 - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def backbone_option_names(name: str) -> set[str]:
    """The backbone.options keys the backbone's loader accepts (the keyword-only settings of its signature; for the
    tiny backbone the fields of TinyConfig)."""
    load = registry.get("backbones", name)
    params = inspect.signature(load).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        from harness.backbones.tiny import TinyConfig   # load_tiny(**overrides) -> TinyConfig(**overrides)
        return {f.name for f in dataclasses.fields(TinyConfig)}
    # set by other config keys (backbone.checkpoint / device / dtype / lora / gradient_checkpointing)
    taken = {"path", "checkpoint", "device", "dtype", "lora", "gradient_checkpointing", "tokenizer"}
    return {n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL} - taken


def check_train_config(cfg: TrainConfig, for_training: bool = True) -> list[str]:
    """Every rule of a training config beyond its field ranges (TrainConfig has those): registry names (method,
    backbone, reward evaluators, sampler preset, checkpoint eval suite), backbone options, cross-field rules.
    The one validator of `harness validate` and `harness train`. for_training also needs what only this machine
    can tell (the device exists, model files are present) and raises; otherwise such problems come back as notes."""
    from evaluators.suites import load_suite
    from harness.backbones.base import check_device
    notes: list[str] = []
    registry.target("methods", cfg.method.name)
    registry.target("backbones", cfg.backbone.name)
    unknown = sorted(set(cfg.backbone.options) - backbone_option_names(cfg.backbone.name))
    if unknown:
        known = ", ".join(sorted(backbone_option_names(cfg.backbone.name)))
        raise ValueError(f"backbone.options: unknown key(s) {', '.join(unknown)} for backbone "
                         f"{cfg.backbone.name!r}; known: {known}")
    try:
        cfg.rollout.sampler.resolve(cfg.backbone.name)
    except ValueError as e:
        raise ValueError(f"rollout.{e}") from None
    if cfg.loss.object_credit > 1 and cfg.backbone.name != "tiny":
        raise ValueError(f"loss.object_credit reads objects with the shapes-world detector; backbone "
                         f"{cfg.backbone.name!r} draws no shapes-world images (set loss.object_credit: 0)")
    if 0 < cfg.loss.object_credit < 1:
        raise ValueError(f"loss.object_credit must be 0 (off) or >= 1 (the weight ratio), got {cfg.loss.object_credit}")
    m = cfg.method
    method = registry.get("methods", m.name)
    shared = {"name", "inner_iterations"}
    foreign = sorted(k for k in m.model_fields_set - shared - set(method.options)
                     if getattr(m, k) != type(m).model_fields[k].default)
    if foreign:    # set but never read: an error, not a silent no-op (a default value left in an old dump is fine)
        raise ValueError(f"method.{foreign[0]} does not apply to method {m.name!r}"
                         + (f" (nor {', '.join('method.' + k for k in foreign[1:])})" if foreign[1:] else "")
                         + f"; its options: {', '.join(sorted(shared | set(method.options)))}")
    if m.name == "ht-grpo" and m.n_global + m.n_struct >= m.inner_iterations:
        notes.append(f"method: with n_global + n_struct = {m.n_global + m.n_struct} >= inner_iterations = "
                     f"{m.inner_iterations}, the refinement stage never runs")

    def machine(check, what: str):   # a fact of this machine: an error when training, a note when validating
        try:
            check()
        except (OSError, ImportError, ValueError, RuntimeError) as e:
            if for_training:
                raise
            notes.append(f"{what} cannot run on this machine: {one_line_of(e)}")

    machine(lambda: check_device(cfg.backbone.device), "backbone.device")
    for name in cfg.reward:
        registry.target("evaluators", name)     # an unknown name is an error anywhere; a missing backend is local
        found: list = []
        machine(lambda: found.append(registry.get("evaluators", name)), f"reward {name!r}")
        if not found:
            continue
        ev = found[0]
        if ev.reward_field is None:
            raise ValueError(f"reward: evaluator {name!r} has no reward field and cannot be used as a reward")
        if ev.check_ready is not None:
            machine(ev.check_ready, f"reward {name!r}")
    distributed.resolve_strategy(cfg.distributed.strategy, cfg.backbone.lora is not None)   # fsdp + LoRA: an error
    if cfg.checkpoint.eval_suite:        # a wrong suite or a missing model file fails now, not at the first checkpoint
        from evaluators.run import resolve_evaluators
        suite = load_suite(cfg.checkpoint.eval_suite)
        if cfg.backbone.name not in suite.backbones:
            raise ValueError(f"checkpoint.eval_suite {suite.name!r} applies to backbones {suite.backbones}, "
                             f"not {cfg.backbone.name!r}")
        machine(lambda: resolve_evaluators(suite), f"checkpoint.eval_suite {suite.name!r}")
    return notes


def one_line_of(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def build_trainer(cfg: TrainConfig) -> Trainer:
    check_train_config(cfg, for_training=True)
    torch.manual_seed(cfg.seed)
    load = registry.get("backbones", cfg.backbone.name)
    backbone = load(cfg.backbone.checkpoint, device=cfg.backbone.device, **cfg.backbone.options) if cfg.backbone.name == "tiny" \
        else load(cfg.backbone.checkpoint, device=cfg.backbone.device, dtype=cfg.backbone.dtype, **cfg.backbone.options)
    reference = None
    if cfg.backbone.lora is not None:
        from harness.backbones.lora import apply_lora
        apply_lora(backbone, r=cfg.backbone.lora.r, alpha=cfg.backbone.lora.alpha, dropout=cfg.backbone.lora.dropout,
                   targets=cfg.backbone.lora.targets or list(backbone.lora_targets))
    elif cfg.loss.beta_kl > 0:
        reference = copy.deepcopy(backbone.module).eval().requires_grad_(False)
    if cfg.backbone.gradient_checkpointing and hasattr(backbone.module, "gradient_checkpointing_enable"):
        backbone.module.gradient_checkpointing_enable()
    strategy = distributed.resolve_strategy(cfg.distributed.strategy, cfg.backbone.lora is not None) \
        if distributed.active() else "single"
    if strategy == "fsdp":   # before the optimizer and the EMA are made: they hold this rank's shards
        distributed.wrap_fsdp(backbone.module)
        if reference is not None:
            distributed.wrap_fsdp(reference)
    params = [p for p in backbone.module.parameters() if p.requires_grad]
    o = cfg.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    # the scheduler ticks once per optimizer update (K per training step); its factor is a function of the step
    k = cfg.method.inner_iterations
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: lr_factor(o, u // k, cfg.steps))
    sampler = cfg.rollout.sampler.resolve(cfg.backbone.name)
    tr = Trainer(cfg, backbone, registry.get("methods", cfg.method.name), build_reward(cfg.reward),
                 optimizer, scheduler, reference, sampler)
    if o.ema_decay > 0:
        tr.ema = {n: p.detach().clone() for n, p in tr.trainable().items()}
    if distributed.active():   # under torchrun: whole prompt groups per rank, gradients summed by DDP or FSDP
        distributed.share(cfg.rollout.prompts_per_step, "rollout.prompts_per_step")
        tr.strategy = strategy
        if strategy == "ddp":
            tr.ddp = distributed.wrap_ddp(backbone.module)
    return tr


# --- one step -----------------------------------------------------------------------------------------

def step_prompts(cfg: TrainConfig, step: int) -> list[dict]:
    """The prompts of a step, a pure function of (seed, step): the data position is the step."""
    rng = np.random.default_rng([cfg.seed, step, 17])
    if cfg.rollout.prompt_file:
        from evaluators.geneval import load_metadata
        pool = load_metadata(cfg.rollout.prompt_file)
        return [pool[int(i)] for i in rng.integers(0, len(pool), cfg.rollout.prompts_per_step)]
    return [sample_metadata(rng, cfg.rollout.split, cfg.rollout.tag_weights) for _ in range(cfg.rollout.prompts_per_step)]


def to_samples(backbone, codes: torch.Tensor, metas: list[dict], step: int, first: int = 0) -> list[Sample]:
    """Samples of rollouts first, first + 1, ... of a step (their global indices: one rank's block under torchrun)."""
    images = images_from_codes(backbone, codes)
    return [Sample(key=f"{step}/{first + i}", metadata=m, image=im, prompt_index=first + i, codes=c)
            for i, (m, im, c) in enumerate(zip(metas, images, codes.detach().cpu().numpy()))]


def chunks(n: int, size: int) -> list[slice]:
    size = n if size <= 0 else size
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def view_prompts(prompts: PromptBatch, view: View, text_mask_id: int) -> PromptBatch:
    if view.prompt_mask_prob <= 0:
        return prompts
    return mask_prompt_tokens(prompts, view.prompt_mask_prob, text_mask_id, torch.Generator().manual_seed(view.prompt_mask_seed))


def train_step(tr: Trainer, step: int) -> dict:
    """One training step. Under torchrun each rank draws, scores and trains on its block of whole prompt groups
    (rollouts [lo, hi) of the step, drawn with their global sample indices); the rewards and the rollout trace
    are gathered so that every rank computes the step's advantages and views exactly as one process does, the
    loss of every rank is divided by the step's global token count, and DDP (or FSDP) sums the gradients."""
    cfg, bb = tr.cfg, tr.backbone
    g = cfg.rollout.group_size
    t0 = time.time()
    metas = step_prompts(cfg, step)
    group_metas = [m for m in metas for _ in range(g)]
    many = distributed.active()
    p_lo, p_hi = distributed.share(len(metas), "rollout.prompts_per_step")   # (0, P) in one process
    lo, hi = p_lo * g, p_hi * g
    mine = group_metas[lo:hi]
    bb.module.eval()
    with torch.autocast(bb.device.type, dtype=torch.bfloat16, enabled=cfg.rollout.dtype == "bfloat16"):
        rollout: Rollout = generate(bb, [m["prompt"] for m in mine], tr.sampler,
                                    seed=derived_seed("rollout", cfg.seed, step), batch_size=cfg.rollout.batch_size,
                                    start_index=lo)
    t_rollout = time.time() - t0
    samples = to_samples(bb, rollout.codes, mine, step, first=lo)
    local_rewards, local_parts = tr.reward(samples)     # scored where the images are
    rewards, parts = local_rewards, local_parts
    if many:   # every rank gets the step's rewards, in global order
        got = distributed.all_gather_objects((local_rewards, local_parts))
        rewards = np.concatenate([r for r, _ in got])
        parts = {name: np.concatenate([p[name] for _, p in got]) for name in local_parts}
    adv, zero_spread = group_advantages(rewards, g, cfg.loss.adv_eps)
    adv = adv[lo:hi] if many else adv
    # per-token credit: ones (an image's tokens share its advantage) or localised on its objects
    credit = object_credit(samples, adv, cfg.loss.object_credit, bb.grid) if cfg.loss.object_credit > 1 \
        else torch.ones(rollout.codes.shape, dtype=torch.float32)
    adv, credit = adv.to(rollout.codes.device), credit.to(rollout.codes.device)
    prompts = bb.tokenize([m["prompt"] for m in group_metas])   # the whole step's (views mask prompts batch-wide)

    def rank_prompts(p: PromptBatch) -> PromptBatch:
        return p.select(range(lo, hi)) if many else p

    codes = rollout.codes
    b = codes.shape[0]
    mb = chunks(b, cfg.loss.micro_batch)

    # the trace of the whole step on every rank: a method draws its views over all rollouts with one generator
    trace = RolloutTrace(codes=distributed.gather_tensors(codes), commit_step=distributed.gather_tensors(rollout.commit_step),
                         confidence=distributed.gather_tensors(rollout.confidence), steps=tr.sampler.steps)
    tr.last_codes = trace.codes
    # pi_old, pi_ref and pi run at one precision, so the first inner iteration's ratio is still exactly 1
    amp = lambda: torch.autocast(bb.device.type, dtype=torch.bfloat16, enabled=cfg.loss.dtype == "bfloat16")
    with torch.no_grad(), amp():
        if tr.method.needs_masked_entropy(cfg.method):
            none = torch.zeros_like(codes, dtype=torch.bool)
            own = rank_prompts(prompts)
            trace.masked_entropy = distributed.gather_tensors(torch.cat([
                token_logprobs(bb, own.select(range(s.start, s.stop)), codes[s], none[s], with_entropy=True).entropy
                for s in mb]))
        K = cfg.method.inner_iterations
        step_views = [tr.method.views(cfg.method, trace, k, torch.Generator().manual_seed(derived_seed("views", cfg.seed, step, k)))
                      for k in range(K)]
        # this rank's rows of each view (the views themselves in one process)
        views = [[dataclasses.replace(v, visible=v.visible[lo:hi], in_loss=v.in_loss[lo:hi], weight=v.weight[lo:hi])
                  for v in vs] for vs in step_views] if many else step_views
        # pi_old and pi_ref on exactly the inputs (and micro-batches) the updates will use
        old, ref = [], []
        for k in range(K):
            old.append([]), ref.append([])
            for v in views[k]:
                vp = rank_prompts(view_prompts(prompts, v, bb.text_mask_id))
                old[k].append([token_logprobs(bb, vp.select(range(s.start, s.stop)), codes[s], v.visible[s]).logp for s in mb])
                ref[k].append([tr.reference_logprobs(vp.select(range(s.start, s.stop)), codes[s], v.visible[s]) for s in mb])

    bb.module.train()
    stats = {"ratio": [], "clip": [], "grad_norm": [], "ratio_first": []}
    stage_loss: dict[str, list[float]] = {}
    stage_kl: dict[str, list[torch.Tensor]] = {}
    tokens_seen, t1 = 0, time.time()
    for k in range(K):
        tr.optimizer.zero_grad(set_to_none=True)
        # the step's token count (every rank holds the step's views): each rank's loss is its share of the mean
        n_tokens = sum(int(v.in_loss.sum()) for v in step_views[k])
        # the last pass of this rank's update sums the gradients over ranks (DDP); the others accumulate (no_sync)
        passes = [(j, c) for j, v in enumerate(views[k]) for c, s in enumerate(mb) if v.in_loss[s].any()]
        last = passes[-1] if passes else None
        total = 0.0
        for j, v in enumerate(views[k]):
            vp = rank_prompts(view_prompts(prompts, v, bb.text_mask_id))
            view_loss = 0.0
            for c, s in enumerate(mb):
                mask = v.in_loss[s]
                # FSDP all-gathers the weights in every forward, so each rank runs every pass (an empty one adds
                # zero gradients); FSDP reduce-scatters at each backward into sharded gradients (no no_sync: the
                # unsharded gradients of every micro-batch would stay in memory)
                if not mask.any() and tr.strategy != "fsdp":
                    continue
                with tr.update_forward(sync=(j, c) == last):
                    with amp():
                        logp = token_logprobs(bb, vp.select(range(s.start, s.stop)), codes[s], v.visible[s]).logp
                    adv_tok = adv[s, None] * v.weight[s] * credit[s]
                    per_tok, ratio, kl = clipped_token_loss(logp, old[k][j][c], ref[k][j][c], adv_tok, cfg.loss.clip_eps, cfg.loss.beta_kl,
                                                            cfg.loss.kl_max_log_ratio)
                    loss = per_tok[mask].sum() / max(n_tokens, 1)
                    loss.backward()
                view_loss += float(loss.detach())
                if not mask.any():
                    continue
                r = ratio[mask].detach()
                stats["ratio"].append(r)
                stats["clip"].append(((r < 1 - cfg.loss.clip_eps) | (r > 1 + cfg.loss.clip_eps)).float())
                stage_kl.setdefault(v.stage, []).append(kl[mask].detach())
                if k == 0:
                    stats["ratio_first"].append(r)
                tokens_seen += int((s.stop - s.start) * codes.shape[1])
            stage_loss.setdefault(v.stage, []).append(view_loss)
            total += view_loss
        if tr.ddp is not None and last is None:   # no token of this update here: join the gradient sum with zeros
            v, s = views[k][0], mb[0]
            with tr.update_forward(sync=True):
                with amp():
                    logp = token_logprobs(bb, rank_prompts(view_prompts(prompts, v, bb.text_mask_id)).select(range(s.start, s.stop)),
                                          codes[s], v.visible[s]).logp
                (logp.sum() * 0.0).backward()
        params = [p for p in bb.module.parameters() if p.requires_grad]
        gn = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf"))
        stats["grad_norm"].append(float(distributed.full_tensor(gn)))   # fsdp: the global norm, replicated
        tr.optimizer.step()
        tr.scheduler.step()
    tr.update_ema()
    t_train = time.time() - t1
    ratio = torch.cat(stats["ratio"]) if stats["ratio"] else torch.ones(1)
    first = torch.cat(stats["ratio_first"]) if stats["ratio_first"] else torch.ones(1)
    clip = torch.cat(stats["clip"]) if stats["clip"] else None
    kls = {stage: torch.cat(ts) for stage, ts in stage_kl.items()}
    n_rollouts = b
    if many:   # the log line of the whole step (rank order; equal to one process's up to float reduction order)
        mine_stats = {"ratio": ratio if stats["ratio"] else None, "first": first if stats["ratio_first"] else None,
                      "clip": clip, "kl": kls, "loss": stage_loss, "tokens": tokens_seen}
        every = distributed.all_gather_objects(_cpu(mine_stats))
        cat = lambda key: [x[key] for x in every if x[key] is not None]
        ratio = torch.cat(cat("ratio")) if cat("ratio") else torch.ones(1)
        first = torch.cat(cat("first")) if cat("first") else torch.ones(1)
        clip = torch.cat(cat("clip")) if cat("clip") else None
        kls = {stage: torch.cat([x["kl"][stage] for x in every if stage in x["kl"]])
               for stage in dict.fromkeys(st for x in every for st in x["kl"])}
        stage_loss = {stage: [float(sum(vals)) for vals in zip(*(x["loss"][stage] for x in every))] for stage in stage_loss}
        tokens_seen = sum(x["tokens"] for x in every)
        t_rollout, t_train = distributed.all_reduce_max([t_rollout, t_train])
        n_rollouts = len(group_metas)
    out = {
        "step": step + 1,
        "reward_mean": float(np.mean(rewards)), "reward_std": float(np.std(rewards)),
        "zero_spread_frac": float(zero_spread.float().mean()),
        "ratio_mean": float(ratio.mean()), "ratio_min": float(ratio.min()), "ratio_max": float(ratio.max()),
        "ratio_first_iter_max_dev": float((first - 1).abs().max()),
        "clip_frac": float(clip.mean()) if clip is not None else 0.0,
        "kl": float(torch.cat(list(kls.values())).mean()) if kls else 0.0,
        "grad_norm": float(np.mean(stats["grad_norm"])),
        "lr": tr.scheduler.get_last_lr()[0],
        "rollout_s": t_rollout, "train_s": t_train, "step_s": time.time() - t0,
        "rollouts_per_s": n_rollouts / max(t_rollout, 1e-9), "train_tokens_per_s": tokens_seen / max(t_train, 1e-9),
        "forward_passes_per_update": sum(len(v) for v in step_views) / K,
    }
    for name, v in parts.items():
        out[f"reward/{name}"] = float(np.mean(v))
    for tag in sorted({m.get("tag") for m in group_metas} - {None}):   # which kinds of prompt are learning
        out[f"reward_by_tag/{tag}"] = float(np.mean([r for r, m in zip(rewards, group_metas) if m.get("tag") == tag]))
    for stage, losses in stage_loss.items():
        out[f"loss/{stage}"] = float(np.mean(losses))
    if len(kls) > 1:
        for stage, t in kls.items():
            out[f"kl/{stage}"] = float(t.mean())
    out["loss"] = float(sum(np.sum(v) for v in stage_loss.values()) / K)
    return out


def _cpu(obj):
    """Tensors of a nested dict / list on the CPU (what is gathered between ranks)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu(v) for v in obj]
    return obj


# --- checkpoints -------------------------------------------------------------------------------------

def checkpoint_dirs(run_dir: Path) -> list[Path]:
    return [c.path for c in RunDir(run_dir).checkpoints()]


def gather_full_state(tr: Trainer) -> dict | None:
    """Under fsdp, on every rank (collectives): what a checkpoint holds with full tensors, on rank 0's CPU (empty
    elsewhere): the weights it saves (the EMA when kept), the live weights (with EMA) and the optimizer state in
    torch.optim's layout. None otherwise (save_checkpoint reads the module itself)."""
    if tr.strategy != "fsdp":
        return None
    module = tr.backbone.module
    with tr.averaged_weights():
        full = {"weights": distributed.full_state_dict(module)}
    full["optimizer"] = distributed.full_optimizer_state(module, tr.optimizer)
    if tr.ema is not None:
        live = distributed.full_state_dict(module)
        full["live_weights"] = {n: live[n] for n in tr.trainable()} if live else {}
    return full


def save_checkpoint(tr: Trainer, run_dir: Path, step: int, log_line: dict | None = None,
                    full: dict | None = None) -> Path:
    """Write checkpoints/step_XXXXXX/ atomically: build it in a temp dir, then rename. `log_line` (the step's
    metrics) is kept beside the weights, so a kill before it reaches metrics.jsonl loses nothing. Under fsdp,
    `full` is gather_full_state's result (gathered on every rank; rank 0 alone calls this)."""
    final = RunDir(run_dir).checkpoint_path(step)
    tmp = RunDir(run_dir).temporary_checkpoint_path(step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {"backbone": tr.cfg.backbone.name, "step": str(step), "method": tr.cfg.method.name, "run": str(run_dir)}
    with tr.weights_to_save(full):   # with EMA the saved model is the average; the live weights go in the state
        if tr.cfg.backbone.name == "tiny" and tr.cfg.backbone.lora is None:
            tr.backbone.save(tmp / MODEL_FILE, {"step": step, "method": tr.cfg.method.name,
                                                         **({"ema_decay": tr.cfg.optim.ema_decay} if tr.ema else {})})
        else:   # the adapter writes its LoRA settings beside the weights so load_mmada(dir, lora=file) can rebuild it
            tr.backbone.save(tmp / ADAPTER_FILE, meta)
    state = {"format": TRAINER_STATE_FORMAT, "step": step, "weights_sha256": sha256_file(weights_file(tmp)),
             "optimizer": tr.optimizer.state_dict() if full is None else full["optimizer"],
             "scheduler": tr.scheduler.state_dict(),
             "world_size": distributed.world_size(), "strategy": tr.strategy,   # provenance (resume at any world size)
             **rng_state()}
    if tr.ema is not None:
        state["live_weights"] = {n: p.detach().clone() for n, p in tr.trainable().items()} if full is None \
            else full["live_weights"]
    torch.save(state, tmp / TRAINER_STATE_FILE)   # plain containers of tensors and numbers: loads with weights_only
    atomic_write_text(tmp / CONFIG_FILE, dump_config(tr.cfg))
    if log_line is not None:
        atomic_write_text(tmp / LOG_LINE_FILE, json.dumps(log_line, sort_keys=True))
    for f in tmp.iterdir():   # flush file contents before the rename makes the directory visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


TRAINER_STATE_FORMAT = 2   # 2: RNG states as tensors / numbers and the weights' sha256 (1: pickled numpy RNG)


def rng_state() -> dict:
    """Every RNG state as tensors and plain numbers, so trainer_state.pt needs no pickled objects to load."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch_rng": torch.get_rng_state(),
            "numpy_rng": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python_rng": {"version": version, "state": list(internal), "gauss_next": gauss_next}}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch_rng"])
    n = state["numpy_rng"]
    if isinstance(n, dict):
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    else:   # format 1 (numpy's own tuple, allowed by the numpy allow-list in read_trainer_state)
        np.random.set_state(n)
    p = state["python_rng"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]) if isinstance(p, dict) else p)


def read_trainer_state(path: Path) -> dict:
    """trainer_state.pt without running code from it: torch's weights_only unpickler (tensors, containers, numbers)
    plus, for checkpoints of format 1, exactly the numpy types of an RNG state. Anything else, such as a pickled
    object with a __reduce__ payload, is refused with an error naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path.parent} has no trainer_state.pt; it cannot be resumed")
    numpy_rng_types = [np.dtype, type(np.dtype(np.uint32)), np.ndarray]
    reconstruct = getattr(getattr(np, "_core", np.core).multiarray, "_reconstruct", None)
    if reconstruct is not None:
        numpy_rng_types.append(reconstruct)
    try:
        with torch.serialization.safe_globals(numpy_rng_types):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported global" in line]
        if blocked:   # a pickled object (class, function) where only tensors and numbers belong
            raise ValueError(f"{path} holds objects that are not plain training state and was not loaded (loading it "
                             f"could run code from the file: {blocked[0][:200]}); only resume run folders you trust, "
                             f"or delete this checkpoint to resume from the one before") from None
        raise ValueError(f"{path} is unreadable (not a trainer state file); delete this checkpoint to resume from "
                         f"the one before") from None
    except Exception as e:
        raise ValueError(f"{path} is unreadable ({type(e).__name__}: {str(e)[:200]}); delete this checkpoint to "
                         f"resume from the one before") from None


def load_checkpoint(tr: Trainer, ckpt: Path) -> int:
    state = read_trainer_state(ckpt / TRAINER_STATE_FILE)
    weights_path = weights_file(ckpt)
    expected = state.get("weights_sha256")
    if expected is not None and sha256_file(weights_path) != expected:
        raise ValueError(f"{weights_path} is not the file this checkpoint's optimizer state was saved with (sha256 "
                         f"differs from {TRAINER_STATE_FILE}'s); restore the original file or resume from another "
                         f"checkpoint")
    weights, _ = load_weights(weights_path)
    fsdp = tr.strategy == "fsdp"   # the files hold full tensors (any world size wrote them); each rank keeps its shards
    if fsdp:
        distributed.load_full_state_dict(tr.backbone.module, weights, strict=weights_path.name == MODEL_FILE)
    elif weights_path.name == MODEL_FILE:
        tr.backbone.module.load_state_dict(weights)
    elif tr.cfg.backbone.lora is None:   # full fine-tuning of a LLaDA backbone: every trainable weight, no buffers
        unexpected = tr.backbone.module.load_state_dict(weights, strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"{weights_path}: keys not in the model, e.g. {unexpected[:4]}")
    else:
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(tr.backbone.module, weights)
    if tr.ema is not None:   # the weights file held the average; the live weights are in the state
        if "live_weights" not in state:
            raise ValueError(f"checkpoint {ckpt} was written without optim.ema_decay; resume it with the same setting")
        params = tr.trainable()
        tr.ema = {n: p.detach().clone() for n, p in params.items()}
        if fsdp:
            distributed.load_full_state_dict(tr.backbone.module, state["live_weights"], strict=False)
        else:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(state["live_weights"][n])
    elif "live_weights" in state:
        raise ValueError(f"checkpoint {ckpt} holds EMA weights (optim.ema_decay > 0); resume it with the same setting")
    if fsdp:
        distributed.load_full_optimizer_state(tr.backbone.module, tr.optimizer, state["optimizer"])
    else:
        tr.optimizer.load_state_dict(state["optimizer"])
    tr.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state)
    return int(state["step"])


def score_checkpoint(tr: Trainer, run_dir: Path, ckpt: Path) -> dict[str, float]:
    """Score a saved checkpoint with the configured suite into the results store."""
    suite = tr.cfg.checkpoint.eval_suite
    if not suite:
        return {}
    from evaluators.run import evaluate_checkpoints
    from harness.store import ResultsStore
    # under torchrun every rank draws and scores its share; rank 0 alone opens the store (one SQLite writer)
    opened = ResultsStore(tr.cfg.checkpoint.eval_store) if distributed.is_main() else contextlib.nullcontext()
    # fsdp: the ranks draw different numbers of batches, and a sharded forward is a collective, so every rank
    # scores an unsharded copy loaded from the checkpoint just written (as `harness eval` would)
    loaded = None if tr.strategy == "fsdp" else tr.backbone
    with opened as store, tr.averaged_weights() if loaded is not None else contextlib.nullcontext():   # the weights ckpt holds
        [scores] = evaluate_checkpoints(ckpt, suite, store, backbone=tr.backbone.name, loaded=loaded,
                                        device=tr.cfg.backbone.device, out_root=RunDir(run_dir).eval_images,
                                        batch_size=tr.cfg.rollout.batch_size)
    return {f"eval/{suite}/{k}": v for k, v in scores.metrics.items()}


# --- the run -------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, run_dir: str | Path, resume: bool = False, log=print) -> Path:
    run = RunDir(run_dir)
    run_dir, metrics_path = run.path, run.metrics_path
    start, restored = 0, None
    if resume:
        saved = run.config()
        saved["steps"] = cfg.steps
        cfg = validate(TrainConfig, saved, str(run.config_path))
    elif run.holds_a_run():
        # a run killed before its first checkpoint leaves only metrics.jsonl; a fresh start would append to it
        raise FileExistsError(f"{run_dir} already holds a run (checkpoints or metrics.jsonl); use "
                              f"`harness train --resume {run_dir}` or choose another --run-dir")
    tr = build_trainer(cfg)
    # under torchrun every rank trains; rank 0 alone writes the run folder (metrics, TensorBoard, checkpoints)
    main = distributed.is_main()
    if not main:
        log = lambda *args, **kwargs: None
    distributed.on_main(lambda: prepare_run_folder(run_dir))
    if resume:
        ckpts = checkpoint_dirs(run_dir)
        if ckpts:
            start = load_checkpoint(tr, ckpts[-1])
        # drop log lines of steps after the checkpoint (a kill -9 can leave them); they will be redone
        kept = [r for r in read_jsonl(metrics_path) if r.get("step", 0) <= start] if metrics_path.exists() else []
        rewrite = metrics_path.exists()
        distributed.barrier()    # every rank has read the folder before rank 0 rewrites it
        # a kill between the checkpoint and its log line: restore the line from the checkpoint, re-score it
        if ckpts and start and not any(r.get("step") == start for r in kept) and (ckpts[-1] / LOG_LINE_FILE).exists():
            line = json.loads((ckpts[-1] / LOG_LINE_FILE).read_text())
            line.update(score_checkpoint(tr, run_dir, ckpts[-1]))
            kept.append(line)
            restored = line
        if main and (rewrite or kept):
            atomic_write_text(metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        log(f"resuming {run_dir} at step {start}")
    if distributed.active():
        log(f"{distributed.world_size()} processes, strategy {tr.strategy}: rank r trains prompt groups "
            f"[r * {cfg.rollout.prompts_per_step // distributed.world_size()}, ...) of each step")
    config_text = dump_config(cfg)
    config_path = run.config_path
    if main and (not config_path.is_file() or config_path.read_text() != config_text):   # resume: only --steps changes it
        atomic_write_text(config_path, config_text)
    writer = None
    if cfg.tensorboard and main:
        from torch.utils.tensorboard import SummaryWriter
        # purge_step drops older events from that step on: steps after the checkpoint, and the checkpoint's own
        # step when its line is restored (rewritten just below)
        purge = start if restored is not None else start + 1
        writer = SummaryWriter(str(run.tensorboard_dir), purge_step=purge if start else None)
        if restored is not None:
            write_scalars(writer, restored, start)
    for step in range(start, cfg.steps):
        m = train_step(tr, step)
        done = step + 1
        if done % cfg.checkpoint.every == 0 or done == cfg.steps:
            full = gather_full_state(tr)   # fsdp: every rank takes part in gathering the full tensors
            ckpt = distributed.on_main(lambda: save_checkpoint(tr, run_dir, done, log_line=m, full=full))   # then every rank sees it
            m.update(score_checkpoint(tr, run_dir, ckpt))
        if main:
            append_jsonl(metrics_path, m)
        if writer is not None:
            write_scalars(writer, m, done)
        log(format_metrics(m))
    if writer is not None:
        writer.close()
    return run_dir


def prepare_run_folder(run_dir: Path) -> None:
    """Before the first step: the run folder (and checkpoints/ where it exists) are writable (a read-only folder fails now, not
    after a full step), and temporary folders of checkpoint saves killed midway are removed."""
    run = RunDir(run_dir)
    folder = run.checkpoints_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    for path in (run_dir, folder) if folder.is_dir() else (run_dir,):
        probe = path / f".write_probe_{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise PermissionError(f"cannot write in {path} ({e.strerror or e}); make it writable or choose "
                                  f"another --run-dir") from None
    for tmp, pid in run.temporary_checkpoints():
        if pid is not None and pid != os.getpid() and _process_alive(pid):
            continue    # another live process is writing it
        shutil.rmtree(tmp, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_scalars(writer, m: dict, step: int) -> None:
    for k, v in m.items():
        if k != "step" and isinstance(v, (int, float)):
            writer.add_scalar(k, v, step)
    writer.flush()


def format_metrics(m: dict) -> str:
    keys = ["reward_mean", "reward_std", "zero_spread_frac", "ratio_mean", "ratio_min", "ratio_max", "clip_frac", "kl",
            "grad_norm", "rollouts_per_s", "step_s"]
    parts = [f"step {m['step']:4d}"] + [f"{k} {m[k]:.3g}" for k in keys if k in m]
    parts += [f"{k} {v:.3g}" for k, v in m.items() if k.startswith(("loss/", "eval/")) and isinstance(v, float)]
    return "  ".join(parts)


def cli_train(config: str | None = None, run_dir: str | None = None, steps: int | None = None,
              resume: str | None = None, overrides: list[str] | None = None, log=print) -> Path:
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if not distributed.is_main():   # under torchrun rank 0 speaks for the job
        log = lambda *args, **kwargs: None
    if resume:
        return train(resumed_config(Path(resume), config, steps, overrides or [], log), resume, resume=True, log=log)
    if config is None:
        raise ValueError("give --config FILE for a new run, or --resume RUN_FOLDER to continue one")
    cfg = load_config(TrainConfig, config, overrides or [])
    if steps is not None:
        cfg.steps = steps
    return train(cfg, run_dir or Path("runs") / cfg.name, log=log)


def resumed_config(run_dir: Path, config: str | None, steps: int | None, overrides: list[str], log) -> TrainConfig:
    """A resumed run keeps its own config.yaml. Only --steps may change it (announced); a --config or overrides
    given anyway are compared with it and each differing key is reported as ignored."""
    saved_path = RunDir(run_dir).config_path
    if not saved_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.yaml); start it with --config instead")
    saved = validate(TrainConfig, read_yaml(saved_path), str(saved_path))
    if config is not None or overrides:
        asked = apply_overrides(read_yaml(config) if config else saved.model_dump(mode="json"), overrides)
        asked = validate(TrainConfig, asked, str(config) if config else "overrides").model_dump(mode="json")
        have = saved.model_dump(mode="json")
        for key in sorted(k for k in _flat(asked) if k != "steps" and _flat(asked)[k] != _flat(have).get(k)):
            log(f"resume keeps {key} = {_flat(have).get(key)!r} from {saved_path} (ignoring {_flat(asked)[key]!r}); "
                f"start a new run to change it")
        if steps is None and _flat(asked)["steps"] != saved.steps:
            log(f"resume keeps steps = {saved.steps}; pass --steps to change the run's length")
    if steps is not None and steps != saved.steps:
        log(f"steps: {saved.steps} -> {steps} (written to {saved_path})")
        saved.steps = steps
    return saved


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
