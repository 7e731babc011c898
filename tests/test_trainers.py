"""The GRPO trainers: the clipped per-token loss against a hand derivation, the five methods' views
(HT-GRPO partition / stages / credit, TraceGRPO replay, MaskGRPO / GRPO / d1 masking), group advantages,
reward failures, gradient accumulation, resume equivalence, a pinned short run and config errors.

Every model here is a random tiny dMLLM (d_model 32, one layer) built through `backbone.options`,
so the whole file runs in seconds on one CPU thread.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from evaluators.base import Evaluator, Sample
from harness import registry
from harness.backbones.tiny import load_tiny
from harness.checkpoint import load_weights
from harness.config import ConfigError, load_config
from harness.io import read_jsonl
from harness.sampling import sample, sampler_config
from harness.shapes.prompts import geneval_metadata
from trainers.config import MethodConfig, TrainConfig
from trainers.loop import (build_trainer, clipped_token_loss, cli_train, load_checkpoint, save_checkpoint, train, train_step,
                           view_prompts)
from trainers.methods import (RolloutTrace, credit_weights, diffu_grpo_views, grpo_views, ht_grpo_views, ht_stage,
                              maskgrpo_ratio, maskgrpo_views, structure_set, trace_groups, tracegrpo_views)
from trainers.rewards import build_reward, group_advantages, object_credit

TINY = {"d_model": 32, "n_layers": 1, "n_heads": 2, "mlp_hidden": 64}

# The random tiny model never draws a strictly correct GenEval image, so with the strict reward every
# advantage would be 0 and no gradient would flow; the partial-credit reward gives groups a spread.
BASE = ["seed=0", "steps=2",
        "backbone.checkpoint=",                 # "" = random init through load_tiny("", **options)
        "backbone.options={d_model: 32, n_layers: 1, n_heads: 2, mlp_hidden: 64}",
        "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.sampler.steps=4",
        "reward={shapes-geneval-partial: 1.0}",
        "checkpoint.eval_suite=null", "tensorboard=false"]


def tiny_config(*overrides: str) -> TrainConfig:
    return load_config(TrainConfig, None, BASE + list(overrides))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)    # tiny models on busy shared cores: one thread is much faster
    yield
    torch.set_num_threads(before)


def fake_trace(b: int = 3, n: int = 64, steps: int = 6, seed: int = 0) -> RolloutTrace:
    """A rollout trace with distinct confidences and entropies (no ties), commit steps with ties."""
    g = torch.Generator().manual_seed(seed)
    return RolloutTrace(codes=torch.randint(0, 513, (b, n), generator=g),
                        commit_step=torch.randint(0, steps, (b, n), generator=g),
                        confidence=torch.rand(b, n, generator=g), steps=steps,
                        masked_entropy=torch.rand(b, n, generator=g) * 5)


# --- the tiny random backbone through build_trainer ----------------------------------------------------------

def test_build_trainer_makes_tiny_random_model_from_options():
    tr = build_trainer(tiny_config())
    c = tr.backbone.config
    assert (c.d_model, c.n_layers, c.n_heads, c.mlp_hidden) == (32, 1, 2, 64)
    assert len(tr.backbone.module.blocks) == 1
    assert sum(p.numel() for p in tr.backbone.module.parameters()) < 100_000   # not the shipped 2.9M model
    # the same seed gives the same random init; the reference starts equal to the policy
    again = build_trainer(tiny_config())
    for (k, a), b in zip(tr.backbone.module.state_dict().items(), again.backbone.module.state_dict().values()):
        assert torch.equal(a, b), k
    for a, b in zip(tr.backbone.module.parameters(), tr.reference.parameters()):
        assert torch.equal(a, b) and not b.requires_grad


# --- 1. the ratio is exactly 1 in the first inner iteration, for every method -------------------------------

@pytest.mark.parametrize("method", [
    ["method.name=grpo"], ["method.name=maskgrpo"], ["method.name=tracegrpo"], ["method.name=diffu-grpo"],
    ["method.name=ht-grpo"],
    ["method.name=ht-grpo", "method.estimator=fully_masked"],
    ["method.name=ht-grpo", "method.estimator=trajectory"],
    ["method.name=ht-grpo", "method.partition=entropy_low", "method.credit=soft_entropy"],
], ids=lambda m: ",".join(s.split("=")[1] for s in m))
def test_ratio_is_one_in_first_inner_iteration(method):
    tr = build_trainer(tiny_config(*method))
    out = train_step(tr, 0)
    assert out["ratio_first_iter_max_dev"] == 0.0
    assert math.isfinite(out["loss"]) and out["grad_norm"] > 0   # the step did train


def test_bfloat16_rollouts_keep_the_update_exact_and_reproducible():
    """Only the sampler runs under autocast: pi_old / pi_ref / pi are float32 recomputations, so the
    first-iteration ratio is still exactly 1, and the same seed gives the same step."""
    a = train_step(build_trainer(tiny_config("rollout.dtype=bfloat16")), 0)
    b = train_step(build_trainer(tiny_config("rollout.dtype=bfloat16")), 0)
    assert a["ratio_first_iter_max_dev"] == 0.0
    assert a["loss"] == b["loss"] and a["reward_mean"] == b["reward_mean"]
    tr = build_trainer(tiny_config("rollout.dtype=bfloat16"))
    train_step(tr, 0)
    assert all(p.dtype == torch.float32 for p in tr.backbone.module.parameters())
    assert torch.get_autocast_dtype("cpu") is not None and not torch.is_autocast_enabled("cpu")   # autocast closed


@pytest.mark.parametrize("method", ["grpo", "ht-grpo", "tracegrpo"])
def test_bfloat16_updates_keep_ratio_one_and_float32_weights(method):
    """loss.dtype=bfloat16 runs pi, pi_old and pi_ref under autocast: the first-iteration ratio is still exactly
    1, the weights and optimizer state stay float32, and the step is close to the float32 step."""
    tr = build_trainer(tiny_config(f"method.name={method}", "loss.dtype=bfloat16"))
    half = train_step(tr, 0)
    full = train_step(build_trainer(tiny_config(f"method.name={method}")), 0)
    assert half["ratio_first_iter_max_dev"] == 0.0 and half["grad_norm"] > 0
    assert half["reward_mean"] == full["reward_mean"]                  # same rollouts (the sampler is float32 here)
    assert half["loss"] == pytest.approx(full["loss"], rel=0.1, abs=1e-3) and half["loss"] != full["loss"]
    assert all(p.dtype == torch.float32 for p in tr.backbone.module.parameters())
    assert all(v.dtype == torch.float32 for st in tr.optimizer.state.values() for v in st.values() if v.dim() > 0)
    assert not torch.is_autocast_enabled("cpu")


def test_warmup_counts_training_steps_not_updates():
    tr = build_trainer(tiny_config("optim.warmup_steps=3", "optim.lr=0.3", "method.inner_iterations=2"))
    lrs = []
    for step in range(4):
        lrs.append([])
        for _ in range(2):    # the K updates of one step share one learning rate
            lrs[-1].append(tr.scheduler.get_last_lr()[0])
            tr.optimizer.step()
            tr.scheduler.step()
    assert lrs == [[pytest.approx(0.1)] * 2, [pytest.approx(0.2)] * 2, [pytest.approx(0.3)] * 2, [pytest.approx(0.3)] * 2]


def test_cosine_schedule_after_warmup_ends_at_min_ratio():
    tr = build_trainer(tiny_config("steps=5", "optim.warmup_steps=1", "optim.lr=0.2", "optim.schedule=cosine",
                                   "optim.min_lr_ratio=0.1", "method.inner_iterations=2"))
    lrs = []
    for _ in range(5):
        lrs.append(tr.scheduler.get_last_lr()[0])
        for _ in range(2):
            tr.optimizer.step()
            tr.scheduler.step()
    # warm-up step 0: 0.2 * 1/1; then cos from 1 at step 1 to 0.1 at step 4 (the last), midpoint 0.55 halfway
    mid = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 3))
    assert lrs == [pytest.approx(0.2), pytest.approx(0.2), pytest.approx(0.2 * mid), pytest.approx(0.2 * (1.1 - mid)),
                   pytest.approx(0.02)]


def test_reward_by_tag_splits_the_mean():
    cfg = tiny_config("rollout.prompts_per_step=4")
    out = train_step(build_trainer(cfg), 0)
    from trainers.loop import step_prompts
    tags = [m["tag"] for m in step_prompts(cfg, 0)]
    by_tag = {k.split("/", 1)[1]: v for k, v in out.items() if k.startswith("reward_by_tag/")}
    assert set(by_tag) == set(tags)
    assert sum(by_tag[t] for t in tags) / len(tags) == pytest.approx(out["reward_mean"])


# --- 2. the clipped per-token loss and its gradient, by hand ---------------------------------------------------

def test_clipped_token_loss_matches_hand_derivation():
    eps, beta = 0.2, 0.1
    # (logp, old_logp, ref_logp, advantage, clipped?) -- clipped decided by hand from rho = exp(logp - old):
    # A > 0 clips above 1 + eps, A < 0 clips below 1 - eps; the other side stays unclipped (pessimistic bound).
    cases = [
        (-1.0, -1.1, -0.8, 2.0, False),    # rho 1.105, inside
        (-0.5, -1.0, -0.7, 1.5, True),     # rho 1.649 > 1.2, A > 0 -> clipped at 1.2
        (-2.0, -1.0, -1.5, 1.0, False),    # rho 0.368 < 0.8, A > 0 -> unclipped
        (-1.7, -1.0, -1.9, -0.7, True),    # rho 0.497 < 0.8, A < 0 -> clipped at 0.8
        (-0.6, -1.0, -0.6, -1.2, False),   # rho 1.492 > 1.2, A < 0 -> unclipped
        (-1.0, -0.95, -1.3, -0.5, False),  # rho 0.951, inside
        (-0.3, -0.9, -0.4, 0.0, False),    # A = 0: only the KL term
    ]
    logp = torch.tensor([c[0] for c in cases], dtype=torch.float64, requires_grad=True)
    old, ref, adv = (torch.tensor([c[i] for c in cases], dtype=torch.float64) for i in (1, 2, 3))
    loss, ratio, kl = clipped_token_loss(logp, old, ref, adv, eps, beta)
    loss.sum().backward()

    for i, (lp, o, r, a, clipped) in enumerate(cases):
        rho = math.exp(lp - o)
        d = r - lp
        k3 = math.exp(d) - d - 1
        bound = 1 + eps if rho > 1 else 1 - eps
        want_loss = -a * (bound if clipped else rho) + beta * k3
        # d(rho)/d(logp) = rho; the clipped branch is constant in logp; d k3 / d logp = 1 - exp(d)
        want_grad = -(0.0 if clipped else a * rho) + beta * (1 - math.exp(d))
        assert loss[i].item() == pytest.approx(want_loss, abs=1e-12), i
        assert logp.grad[i].item() == pytest.approx(want_grad, abs=1e-12), i
        assert ratio[i].item() == pytest.approx(rho, abs=1e-12)
        assert kl[i].item() == pytest.approx(k3, abs=1e-12) and kl[i].item() >= 0


def test_kl_max_log_ratio_continues_k3_linearly():
    """Below c the loss is plain k3; above, k3(c) + (e^c - 1)(d - c): continuous, pull capped at e^c - 1."""
    c, beta = 2.0, 0.5
    ref = torch.zeros(5, dtype=torch.float64)
    logp = torch.tensor([0.5, -1.0, -2.0, -3.0, -8.0], dtype=torch.float64, requires_grad=True)   # d = -logp
    zero = torch.zeros(5, dtype=torch.float64)
    loss, _, kl = clipped_token_loss(logp, logp.detach(), ref, zero, 0.2, beta, kl_max_log_ratio=c)
    loss.sum().backward()
    plain, _, plain_kl = clipped_token_loss(logp.detach(), logp.detach(), ref, zero, 0.2, beta)
    for i, lp in enumerate(logp.tolist()):
        d = -lp
        if d <= c:
            assert kl[i].item() == pytest.approx(plain_kl[i].item(), abs=1e-12)
            assert logp.grad[i].item() == pytest.approx(beta * (1 - math.exp(d)), abs=1e-12)
        else:
            assert kl[i].item() == pytest.approx(math.exp(c) - c - 1 + (math.exp(c) - 1) * (d - c), abs=1e-12)
            assert kl[i].item() < plain_kl[i].item()
            assert logp.grad[i].item() == pytest.approx(-beta * (math.exp(c) - 1), abs=1e-12)


def test_clipped_token_loss_without_kl():
    logp = torch.tensor([-1.0, -0.5], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    for beta, ref in ((0.0, torch.zeros(2, dtype=torch.float64)), (0.5, None)):
        loss, _, kl = clipped_token_loss(logp, old, ref, adv, 0.2, beta)
        assert torch.equal(kl, torch.zeros(2, dtype=torch.float64))
        assert loss.tolist() == pytest.approx([-1.0, math.exp(0.5)])


# --- 3. HT-GRPO: partition, stages, candidate sets, credit ------------------------------------------------------

@pytest.mark.parametrize("fraction, size", [(0.25, 16), (0.3, 20), (0.1, 7), (0.001, 1), (1.0, 64)])
@pytest.mark.parametrize("partition", ["commit_order", "entropy_low", "entropy_high"])
def test_structure_set_size_is_ceil_fraction_n_per_image(partition, fraction, size):
    cfg = MethodConfig(partition=partition, structure_fraction=fraction)
    s = structure_set(cfg, fake_trace())
    assert s.sum(1).tolist() == [size] * 3


def test_commit_order_picks_earliest_committed_then_most_confident():
    tr = fake_trace()
    s = structure_set(MethodConfig(partition="commit_order", structure_fraction=0.25), tr)
    for b in range(3):
        steps, conf = tr.commit_step[b].tolist(), tr.confidence[b].tolist()
        want = set(sorted(range(64), key=lambda i: (steps[i], -conf[i]))[:16])
        assert set(s[b].nonzero().flatten().tolist()) == want
        assert tr.commit_step[b][s[b]].max() <= tr.commit_step[b][~s[b]].min()


@pytest.mark.parametrize("partition, lowest", [("entropy_low", True), ("entropy_high", False)])
def test_entropy_partitions_pick_lowest_or_highest_entropy(partition, lowest):
    tr = fake_trace()
    s = structure_set(MethodConfig(partition=partition, structure_fraction=0.25), tr)
    for b in range(3):
        h = tr.masked_entropy[b].tolist()
        want = set(sorted(range(64), key=lambda i: h[i] if lowest else -h[i])[:16])
        assert set(s[b].nonzero().flatten().tolist()) == want


def test_entropy_partition_without_entropy_is_a_clear_error():
    tr = fake_trace()
    tr.masked_entropy = None
    with pytest.raises(ValueError, match="entropy"):
        structure_set(MethodConfig(partition="entropy_low"), tr)


def test_ht_stage_schedule():
    cfg = MethodConfig(n_global=2, n_struct=3, inner_iterations=7)
    assert [ht_stage(cfg, k) for k in range(7)] == ["global"] * 2 + ["structure"] * 3 + ["refinement"] * 2
    assert [ht_stage(MethodConfig(n_global=0, n_struct=1), k) for k in range(3)] == ["structure", "refinement", "refinement"]


@pytest.mark.parametrize("estimator", ["hierarchical", "fully_masked"])
@pytest.mark.parametrize("sample_fraction", [0.5, 1.0])
def test_ht_grpo_candidate_sets_and_visibility(estimator, sample_fraction):
    cfg = MethodConfig(n_global=1, n_struct=2, inner_iterations=5, estimator=estimator, sample_fraction=sample_fraction)
    tr = fake_trace()
    s = structure_set(cfg, tr)
    for k in range(5):
        (v,) = ht_grpo_views(cfg, tr, k, torch.Generator().manual_seed(k))
        candidates = {"global": torch.ones_like(s), "structure": s, "refinement": ~s}[v.stage]
        assert v.stage == ht_stage(cfg, k)
        assert not (v.in_loss & ~candidates).any()            # in_loss is a subset of the stage's candidates
        assert v.in_loss.any()
        if sample_fraction == 1.0:
            assert torch.equal(v.in_loss, candidates)
        if estimator == "hierarchical" and v.stage == "refinement":
            assert torch.equal(v.visible, s)                     # paint given the sketch
        else:
            assert not v.visible.any()                           # from the fully masked state


def test_ht_grpo_trajectory_estimator_replays_the_rollout_within_the_stage():
    cfg = MethodConfig(n_global=1, n_struct=1, inner_iterations=3, estimator="trajectory", sample_fraction=1.0,
                       trace_groups=3)
    tr = fake_trace()
    s = structure_set(cfg, tr)
    for k in range(3):
        views = ht_grpo_views(cfg, tr, k, torch.Generator().manual_seed(k))
        candidates = {"global": torch.ones_like(s), "structure": s, "refinement": ~s}[ht_stage(cfg, k)]
        union = torch.zeros_like(s)
        for v, (start, end) in zip(views, trace_groups(tr.steps, 3)):
            assert torch.equal(v.visible, tr.commit_step < start)      # the rollout's state before this group
            assert not (v.in_loss & ((tr.commit_step < start) | (tr.commit_step >= end))).any()
            assert not (union & v.in_loss).any()
            union |= v.in_loss
        assert torch.equal(union, candidates)                           # every candidate scored exactly once


def test_two_level_credit_by_hand():
    cfg = MethodConfig(credit="two_level", structure_weight=2.0, structure_fraction=0.25)
    tr = fake_trace()
    s = structure_set(cfg, tr)
    w = credit_weights(cfg, tr, s)
    # 16 of 64 slots at 2, 48 at 1: mean 1.25, so S gets 2 / 1.25 = 1.6 and R gets 1 / 1.25 = 0.8
    assert torch.allclose(w[s], torch.tensor(1.6)) and torch.allclose(w[~s], torch.tensor(0.8))


@pytest.mark.parametrize("credit", ["two_level", "soft_entropy", "uniform"])
@pytest.mark.parametrize("w_s", [1.5, 3.0])
def test_credit_weights_mean_one_and_structure_ratio(credit, w_s):
    cfg = MethodConfig(credit=credit, structure_weight=w_s, partition="entropy_low", structure_fraction=0.3)
    tr = fake_trace()
    s = structure_set(cfg, tr)
    w = credit_weights(cfg, tr, s)
    assert torch.allclose(w.mean(1), torch.ones(3), atol=1e-6)
    if credit == "two_level":
        for b in range(3):
            assert torch.allclose(w[b][s[b]], w[b][s[b]][0]) and torch.allclose(w[b][~s[b]], w[b][~s[b]][0])
            assert (w[b][s[b]][0] / w[b][~s[b]][0]).item() == pytest.approx(w_s, rel=1e-6)
    elif credit == "soft_entropy":
        for b in range(3):   # lowest entropy gets w_s times the highest, monotone in between
            order = tr.masked_entropy[b].argsort()
            assert (w[b][order].diff() <= 1e-7).all()
            assert (w[b][order[0]] / w[b][order[-1]]).item() == pytest.approx(w_s, rel=1e-5)
    else:
        assert torch.equal(w, torch.ones_like(w))


# --- 4. TraceGRPO replays the recorded rollout --------------------------------------------------------------

@pytest.mark.parametrize("steps, groups", [(6, 4), (4, 4), (5, 2), (3, 8)])
def test_tracegrpo_views_replay_the_recorded_rollout(steps, groups):
    bb = load_tiny("", **TINY)
    rollout = sample(bb, bb.tokenize(["a red circle", "two blue squares"]), sampler_config(steps=steps, cfg=1.0), seed=3)
    tr = RolloutTrace(codes=rollout.codes, commit_step=rollout.commit_step, confidence=rollout.confidence, steps=steps)
    assert rollout.commit_step.min() >= 0 and rollout.commit_step.max() == steps - 1
    ranges = trace_groups(steps, groups)
    assert ranges[0][0] == 0 and ranges[-1][1] == steps and len(ranges) == min(groups, steps)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))   # contiguous
    views = tracegrpo_views(MethodConfig(trace_groups=groups), tr, 0, torch.Generator().manual_seed(0))
    assert len(views) == len(ranges)
    covered = torch.zeros_like(rollout.codes)
    for v, (start, end) in zip(views, ranges):
        assert torch.equal(v.visible, rollout.commit_step < start)
        assert torch.equal(v.in_loss, torch.isin(rollout.commit_step, torch.arange(start, end)))
        assert not (v.visible & v.in_loss).any()
        covered += v.in_loss.long()
    assert torch.equal(covered, torch.ones_like(covered))      # every slot in exactly one view's loss


# --- 5. MaskGRPO, GRPO and d1 masking -------------------------------------------------------------------------

@pytest.mark.parametrize("k_total, min_rate", [(4, 0.6), (10, 0.2), (2, 0.9)])
def test_maskgrpo_ratio_rises_and_is_capped(k_total, min_rate):
    cfg = MethodConfig(inner_iterations=k_total, min_mask_rate=min_rate)
    ratios = [maskgrpo_ratio(cfg, k) for k in range(k_total)]
    assert ratios[0] > min_rate
    assert all(a < b for a, b in zip(ratios, ratios[1:]))
    assert max(ratios) <= 0.999 and ratios[-1] == 0.999
    # the views mask about that fraction
    tr = fake_trace(b=8, n=256)
    for k in (0, k_total - 1):
        (v,) = maskgrpo_views(cfg, tr, k, torch.Generator().manual_seed(k))
        assert torch.equal(v.in_loss, ~v.visible)
        assert v.in_loss.float().mean().item() == pytest.approx(ratios[k], abs=0.03)


@pytest.mark.parametrize("mask_ratio", ["uniform", "cosine"])
def test_grpo_masks_at_least_one_slot_per_image(mask_ratio):
    cfg = MethodConfig(min_mask_ratio=0.0, mask_ratio=mask_ratio)
    tr = fake_trace(b=300, n=4)       # with 4 slots many draws round to 0 masked before the floor of 1
    for k in range(3):
        (v,) = grpo_views(cfg, tr, k, torch.Generator().manual_seed(k))
        assert (v.in_loss.sum(1) >= 1).all()
        assert torch.equal(v.in_loss, ~v.visible)


def test_diffu_grpo_masks_all_codes_and_only_maskable_prompt_tokens():
    bb = load_tiny("", **TINY)
    prompts = bb.tokenize(["a red circle", "two blue squares and a green triangle"])
    tr = fake_trace(b=2, n=64)
    t2i = bb.tokenizer.t2i_id
    assert (prompts.ids[:, 0] == t2i).all() and not prompts.maskable[:, 0].any()
    for prob in (0.5, 1.0):
        (v,) = diffu_grpo_views(MethodConfig(prompt_mask_prob=prob), tr, 0, torch.Generator().manual_seed(1))
        assert not v.visible.any() and v.in_loss.all() and v.prompt_mask_prob == prob
        masked = view_prompts(prompts, v, bb.text_mask_id)
        changed = masked.ids != prompts.ids
        assert not (changed & ~prompts.maskable).any()                 # [T2I] and padding never masked
        assert (masked.ids[:, 0] == t2i).all()
        assert (masked.ids[changed] == bb.text_mask_id).all()
        assert torch.equal(view_prompts(prompts, v, bb.text_mask_id).ids, masked.ids)   # same view, same masking
        if prob == 1.0:
            assert torch.equal(changed, prompts.maskable)
        else:
            assert changed.any()


# --- 6. group advantages ---------------------------------------------------------------------------------------

def test_group_advantages():
    rewards = [1.0, 2.0, 3.0, 4.0,   5.0, 5.0, 5.0, 5.0,   0.0, 0.0, 1.0, 1.0]
    adv, zero = group_advantages(rewards, 4, eps=0.0)
    std = math.sqrt(1.25)    # population std of 1, 2, 3, 4
    assert adv[:4].tolist() == pytest.approx([-1.5 / std, -0.5 / std, 0.5 / std, 1.5 / std], abs=1e-6)
    assert adv[4:8].tolist() == [0.0] * 4
    assert adv[8:].tolist() == pytest.approx([-1, -1, 1, 1], abs=1e-6)
    assert zero.tolist() == [False, True, False]
    groups = adv.view(3, 4)
    assert torch.allclose(groups.mean(1), torch.zeros(3), atol=1e-6)
    assert torch.allclose(groups[[0, 2]].std(1, unbiased=False), torch.ones(2), atol=1e-6)
    # the default eps only shrinks the scale slightly and keeps the zero-spread group at zero
    adv_eps, zero_eps = group_advantages(rewards, 4)
    assert torch.equal(zero_eps, zero) and adv_eps[4:8].tolist() == [0.0] * 4
    assert torch.allclose(adv_eps, adv, rtol=1e-3)


def test_object_credit_moves_blame_onto_uncountable_objects():
    from harness.shapes.world import Obj, cells_to_rgb, render_cells
    meta = geneval_metadata("colors", a="square", color_a="red")
    # a countable red square on cells 0..4 (tokens 0..2) and an uncountable blue one on tokens (4..6, 4..6)
    im = cells_to_rgb(render_cells([Obj("square", "red", 0, 0, 5), Obj("square", "blue", 8, 8, 6)]))
    samples = [Sample(key=str(i), metadata=meta, image=im) for i in range(4)]
    w = object_credit(samples, torch.tensor([-1.0, 1.0, 0.0, -0.5]), 3.0, (8, 8)).view(4, 8, 8)
    good, bad, background, edge = (0, 0), (5, 5), (7, 0), (2, 0)       # edge: 2 cells of the red square, 2 empty
    assert (w[0][bad].item(), w[0][good].item(), w[0][background].item()) == pytest.approx((3.0, 1 / 3, 1.0))
    assert w[0][edge].item() == pytest.approx((2 / 3 + 2) / 4)        # a token weighs the mean of its cells
    # A > 0: the wrong object is not reinforced at full weight; the right one and the background are untouched
    assert (w[1][bad].item(), w[1][good].item(), w[1][background].item()) == pytest.approx((1 / 3, 1.0, 1.0))
    assert torch.equal(w[2], torch.ones(8, 8))                         # no advantage: nothing to move
    assert torch.allclose(w[3], w[0])                                  # only the sign matters
    assert torch.equal(object_credit(samples, torch.ones(4), 1.0, (8, 8)), torch.ones(4, 64))
    with pytest.raises(ValueError, match="token grid"):
        object_credit(samples, torch.ones(4), 3.0, (5, 5))
    dense = [Sample(key="d", metadata={"tag": "dense", "prompt": "a red square"}, image=im)]
    with pytest.raises(ValueError, match="GenEval clauses"):
        object_credit(dense, torch.ones(1), 3.0, (8, 8))


def test_object_credit_weights_the_policy_gradient(monkeypatch):
    """Zero credit on every token leaves only the KL term: with beta 0 the step must not move the weights."""
    import trainers.loop as loop
    tr = build_trainer(tiny_config("loss.object_credit=3", "loss.beta_kl=0", "method.name=grpo"))
    before = {k: v.clone() for k, v in tr.backbone.module.state_dict().items()}
    monkeypatch.setattr(loop, "object_credit", lambda samples, adv, focus, grid: torch.zeros(len(samples), 64))
    out = train_step(tr, 0)
    assert out["reward_std"] > 0
    assert all(torch.equal(v, before[k]) for k, v in tr.backbone.module.state_dict().items())
    with pytest.raises(ValueError, match="object_credit"):
        build_trainer(tiny_config("loss.object_credit=0.5"))


# --- 7. reward failures ---------------------------------------------------------------------------------------

def _nan_score(samples):
    return {s.key: {"score": float("nan")} for s in samples}


NAN_REWARD = Evaluator(name="test-nan-reward", version="1", description="test evaluator: always NaN",
                       score=_nan_score, aggregate=lambda records: [], reward_field="score")


@pytest.fixture
def nan_reward():
    registry.register("evaluators", "test-nan-reward", f"{__name__}:NAN_REWARD")
    yield "test-nan-reward"
    registry._ENTRIES["evaluators"].pop("test-nan-reward", None)
    registry._LOADED.pop(("evaluators", "test-nan-reward"), None)


def test_nan_reward_stops_the_run(nan_reward, tmp_path):
    cfg = tiny_config("reward={test-nan-reward: 1.0}")
    with pytest.raises(RuntimeError, match=r"reward 'test-nan-reward' is nan .*stopping"):
        train(cfg, tmp_path / "run", log=lambda s: None)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_reward_name_gets_did_you_mean():
    with pytest.raises(KeyError, match="Did you mean 'shapes-geneval'"):
        build_reward({"shapes-genevl": 1.0})
    with pytest.raises(KeyError, match="Did you mean 'shapes-geneval-partial'"):
        build_trainer(tiny_config("reward={shapes-geneval-partal: 1.0}"))
    with pytest.raises(ValueError, match="no reward field"):
        build_reward({"shapes-quality": 1.0})


def test_checkpoint_suite_is_checked_before_training():
    """A misspelt suite, or one made for another backbone, fails when the trainer is built, not at the
    first checkpoint after minutes of training."""
    with pytest.raises(KeyError, match="Did you mean 'shapes-geneval'"):
        build_trainer(tiny_config("checkpoint.eval_suite=shapes-genevl"))
    with pytest.raises(ValueError, match=r"checkpoint.eval_suite 'geneval' applies to backbones .*not 'tiny'"):
        build_trainer(tiny_config("checkpoint.eval_suite=geneval"))
    assert build_trainer(tiny_config("checkpoint.eval_suite=shapes-quality")).cfg.checkpoint.eval_suite == "shapes-quality"


# --- 8. gradient accumulation ----------------------------------------------------------------------------------

def test_micro_batches_give_the_same_update():
    whole = build_trainer(tiny_config("loss.micro_batch=0"))
    chunked = build_trainer(tiny_config("loss.micro_batch=2"))
    before = {k: v.clone() for k, v in whole.backbone.module.state_dict().items()}
    out_whole, out_chunked = train_step(whole, 0), train_step(chunked, 0)
    assert out_whole["reward_std"] > 0 and out_chunked["loss"] == pytest.approx(out_whole["loss"], rel=1e-5, abs=1e-7)
    moved = 0
    for k, w in whole.backbone.module.state_dict().items():
        c = chunked.backbone.module.state_dict()[k]
        assert torch.allclose(w, c, atol=1e-6, rtol=0), k
        moved += int(not torch.equal(w, before[k]))
    assert moved > 0     # the step did change the weights, so the comparison means something


# --- 9. resume -------------------------------------------------------------------------------------------------

COMPARED = ("loss", "reward_mean", "reward_std", "ratio_mean", "ratio_max", "kl", "grad_norm", "lr")


def final_weights(run_dir, step):
    return load_weights(run_dir / "checkpoints" / f"step_{step:06d}" / "model.safetensors")[0]


def test_resume_equals_straight_run_and_drops_lines_after_the_checkpoint(tmp_path):
    quiet = lambda s: None
    warmup = "optim.warmup_steps=20"    # lr still rising at the resume point, so the scheduler state matters
    straight = train(tiny_config("steps=4", "checkpoint.every=2", warmup), tmp_path / "straight", log=quiet)

    resumed = train(tiny_config("steps=2", "checkpoint.every=2", warmup), tmp_path / "resumed", log=quiet)
    # a run killed after logging step 3 but before its checkpoint leaves a line that must be redone
    with open(resumed / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 123.0, "reward_mean": -1.0}) + "\n")
    train(tiny_config("steps=4"), resumed, resume=True, log=quiet)

    a, b = read_jsonl(straight / "metrics.jsonl"), read_jsonl(resumed / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    assert a[1]["lr"] < a[2]["lr"] < a[3]["lr"]
    for ra, rb in zip(a, b):
        for key in COMPARED + tuple(k for k in ra if k.startswith(("loss/", "reward/"))):
            assert ra[key] == rb[key], (ra["step"], key)
    wa, wb = final_weights(straight, 4), final_weights(resumed, 4)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["head.weight"], final_weights(straight, 2)["head.weight"])


def test_ema_is_the_average_saved_and_scored_and_resume_stays_exact(tmp_path):
    """optim.ema_decay=d: after each step ema = d * ema + (1 - d) * live; the checkpoint's weights file is the
    average, the module keeps training its live weights, and a resumed run equals the straight one."""
    tr = build_trainer(tiny_config("optim.ema_decay=0.5"))
    start = {n: p.detach().clone() for n, p in tr.trainable().items()}
    train_step(tr, 0)
    live = {n: p.detach().clone() for n, p in tr.trainable().items()}
    assert not torch.equal(live["head.weight"], start["head.weight"])
    for n in live:
        assert torch.allclose(tr.ema[n], 0.5 * start[n] + 0.5 * live[n], atol=1e-7), n
    ckpt = save_checkpoint(tr, tmp_path / "one", 1)
    saved = load_weights(ckpt / "model.safetensors")[0]
    assert torch.equal(saved["head.weight"], tr.ema["head.weight"])
    assert all(torch.equal(p, live[n]) for n, p in tr.trainable().items())       # live weights back in place

    quiet = lambda s: None
    ema = "optim.ema_decay=0.7"
    straight = train(tiny_config("steps=4", "checkpoint.every=2", ema), tmp_path / "straight", log=quiet)
    resumed = train(tiny_config("steps=2", "checkpoint.every=2", ema), tmp_path / "resumed", log=quiet)
    train(tiny_config("steps=4"), resumed, resume=True, log=quiet)
    a, b = read_jsonl(straight / "metrics.jsonl"), read_jsonl(resumed / "metrics.jsonl")
    assert [[r[k] for k in COMPARED] for r in a] == [[r[k] for k in COMPARED] for r in b]
    wa, wb = final_weights(straight, 4), final_weights(resumed, 4)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # a checkpoint written with EMA cannot be resumed as if it held live weights
    with pytest.raises(ValueError, match="ema_decay"):
        load_checkpoint(build_trainer(tiny_config()), straight / "checkpoints" / "step_000002")


def test_kill_between_checkpoint_and_log_line_loses_nothing(tmp_path):
    run = train(tiny_config("steps=2", "checkpoint.every=1"), tmp_path / "run", log=lambda s: None)
    lines = read_jsonl(run / "metrics.jsonl")
    # as if killed after checkpoints/step_000002 was renamed into place, before its line was appended
    (run / "metrics.jsonl").write_text(json.dumps(lines[0], sort_keys=True) + "\n")
    train(tiny_config("steps=2"), run, resume=True, log=lambda s: None)
    assert read_jsonl(run / "metrics.jsonl") == lines


def test_restored_line_reaches_tensorboard_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    quiet = lambda s: None
    run = train(tiny_config("steps=2", "checkpoint.every=1", "tensorboard=true"), tmp_path / "run", log=quiet)
    lines = read_jsonl(run / "metrics.jsonl")
    # as if killed after step 2's checkpoint, before its line reached metrics.jsonl and TensorBoard
    (run / "metrics.jsonl").write_text(json.dumps(lines[0], sort_keys=True) + "\n")
    one = train(tiny_config("steps=1", "tensorboard=true"), tmp_path / "one", log=quiet)
    shutil.rmtree(run / "tb")
    shutil.copytree(one / "tb", run / "tb")
    train(tiny_config("steps=3"), run, resume=True, log=lambda s: None)
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss[:2]] == [pytest.approx(r["loss"]) for r in lines]


def test_corrupt_trainer_state_is_a_clear_error(tmp_path):
    run = train(tiny_config("steps=1", "method.inner_iterations=1"), tmp_path / "run", log=lambda s: None)
    state = run / "checkpoints" / "step_000001" / "trainer_state.pt"
    state.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"step_000001/trainer_state.pt is unreadable.*delete this checkpoint"):
        train(tiny_config("steps=2"), run, resume=True, log=lambda s: None)
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_config("steps=2"), run, log=lambda s: None)



def test_run_killed_before_its_first_checkpoint_is_not_appended_to(tmp_path):
    cfg = tiny_config("steps=1", "checkpoint.every=10", "method.inner_iterations=1")
    run = train(cfg, tmp_path / "run", log=lambda s: None)
    shutil.rmtree(run / "checkpoints")     # as if killed after logging step 1 but before any checkpoint
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, run, log=lambda s: None)
    train(cfg, run, resume=True, log=lambda s: None)   # resuming with no checkpoint restarts at step 0
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1]

# --- 10. a pinned short run --------------------------------------------------------------------------------------

# Values printed by the code when this test was written (ht-grpo, seed 0, the tiny random config above). They
# change only if the rollout, reward, view, loss or optimizer code changes; rel 1e-4 absorbs float differences
# between CPUs. If a change is intended, regenerate with
#   .venv/bin/python -c "from tests.test_trainers import golden_run; print(golden_run())"
# (from the repo root) and paste the output here.
GOLDEN = [
    {"loss": 0.008740114513784647, "loss/global": 0.01891205459833145, "loss/structure": 0.02968144230544567,
     "loss/refinement": -0.006816519424319267, "reward_mean": 0.03125, "reward_std": 0.08267972847076846,
     "kl": 6.800925348215969e-06, "grad_norm": 0.4974271133542061,
     "ratio_min": 0.9856904745101929, "ratio_max": 1.0117915868759155},
    {"loss": -0.08111087737779599, "loss/global": 0.002945169573649764, "loss/structure": -0.2576776444911957,
     "loss/refinement": -0.034855517296819016, "reward_mean": -1.5208333333333333, "reward_std": 0.9590124405403253,
     "kl": 1.7725413272273727e-05, "grad_norm": 0.6816272288560867,
     "ratio_min": 0.9926249384880066, "ratio_max": 1.0093339681625366},
]


def golden_run() -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        run = train(tiny_config("method.name=ht-grpo", "seed=0", "steps=2"), Path(tmp) / "golden", log=lambda s: None)
        rows = read_jsonl(run / "metrics.jsonl")
    keys = ("loss", "loss/global", "loss/structure", "loss/refinement", "reward_mean", "reward_std", "kl", "grad_norm",
            "ratio_min", "ratio_max")
    return [{k: r[k] for k in keys} for r in rows]


def test_golden_short_run_is_unchanged():
    got = golden_run()
    assert len(got) == len(GOLDEN) == 2
    for g, want in zip(got, GOLDEN):
        for k, v in want.items():
            assert g[k] == pytest.approx(v, rel=1e-4, abs=1e-8), k


# --- 11. config errors and overrides -----------------------------------------------------------------------------

def test_unknown_config_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"method\.n_globl: unknown key"):
        load_config(TrainConfig, None, ["method.n_globl=2"])
    path = tmp_path / "train.yaml"
    path.write_text("method:\n  name: grpo\n  n_globl: 2\n")
    with pytest.raises(ConfigError, match=r"train\.yaml is invalid:\n\s+method\.n_globl: unknown key"):
        load_config(TrainConfig, path)
    with pytest.raises(ConfigError, match=r"method\.n_globl"):      # before any model is built
        cli_train(str(path), run_dir=str(tmp_path / "run"), log=lambda s: None)
    assert not (tmp_path / "run").exists()


def test_override_changes_value(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("method:\n  name: grpo\n  n_global: 2\nloss:\n  clip_eps: 0.3\n")
    cfg = load_config(TrainConfig, path, ["method.n_global=3", "optim.lr=5e-5", "method.name=maskgrpo"])
    assert (cfg.method.n_global, cfg.method.name, cfg.optim.lr, cfg.loss.clip_eps) == (3, "maskgrpo", 5e-5, 0.3)
    assert TrainConfig().method.n_global == 1
    with pytest.raises(ConfigError, match=r"method\.n_global"):
        load_config(TrainConfig, None, ["method.n_global=many"])
