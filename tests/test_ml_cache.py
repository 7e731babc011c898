"""Lumina-DiMOO's ML-Cache as a sampler option (harness.sampling.MLCacheSamplerConfig) and the LLaDA speed options
of issue 18 item 4, on tiny random replicas of MMaDA and Lumina-DiMOO in float32 on the CPU.

Off (the default) the sampler must give the images it gave before the option existed: GOLDEN are the codes and
commit steps of commit 236b112's sampler (before the option) on these replicas, float32 CPU."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dataclasses import asdict

import pytest
import torch

from harness.backbones.base import guided_logits
from harness.backbones.llada import ml_cache_count
from harness.backbones.lumina_dimoo import load_lumina_dimoo
from harness.backbones.mmada import load_mmada
from harness.backbones.replicas import make_dimoo_replica, make_mmada_replica
from harness.backbones.tiny import load_tiny
from harness.sampling import (PRESETS, MLCacheSamplerConfig, SamplerConfig, SamplerSettings, _MLCache, refresh_steps,
                              sample, sampler_config)

TEXTS = ["a red cube", "two dogs on the left of a cat", "a blue sphere"]
PRESET = {"lumina-dimoo": "lumina-dimoo", "mmada": "mmada"}
GOLDEN = {
    "lumina-dimoo": (
        [[3700, 6738, 6303, 6253, 4939, 331, 3057, 5299, 274, 7734, 5346, 2559, 7071, 7797, 4199, 4368, 1179, 5510, 5241, 5686],
         [2347, 5765, 1350, 5448, 4203, 5299, 4857, 771, 800, 798, 1645, 3700, 1350, 4166, 6623, 6648, 1136, 6464, 6297, 4777],
         [2128, 1938, 7842, 7842, 4155, 6335, 7615, 714, 5159, 1558, 6025, 1189, 3146, 7276, 5621, 5621, 7285, 5843, 3762, 5621]],
        [[9, 2, 0, 8, 4, 6, 8, 5, 7, 6, 9, 5, 7, 9, 4, 7, 8, 5, 1, 3], [8, 7, 4, 0, 3, 4, 8, 7, 5, 5, 6, 7, 8, 5, 2, 9, 1, 6, 9, 9],
         [5, 5, 4, 3, 8, 7, 6, 7, 7, 8, 9, 4, 9, 2, 0, 5, 6, 8, 9, 1]]),
    "mmada": (
        [[296, 560, 1430, 416, 3128, 4553, 2983, 6790, 7067, 1682, 1652, 5916, 311, 434, 6260, 1132],
         [5132, 7166, 4616, 5994, 3560, 5471, 937, 425, 5919, 229, 1162, 796, 227, 5777, 5830, 7824],
         [4483, 5304, 3574, 78, 78, 78, 5052, 147, 2983, 1092, 48, 4803, 4076, 4449, 6100, 3397]],
        [[8, 9, 5, 5, 0, 7, 7, 7, 9, 4, 2, 6, 8, 3, 1, 6], [6, 5, 1, 3, 2, 9, 5, 9, 7, 8, 7, 7, 6, 8, 0, 4],
         [6, 8, 7, 3, 0, 1, 7, 2, 9, 8, 6, 5, 5, 7, 4, 9]]),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlc")
    dm = load_lumina_dimoo(make_dimoo_replica(root / "d", seed=3, d_model=32, n_layers=2), dtype="float32",
                           height=64, width=80)
    mm = load_mmada(make_mmada_replica(root / "m", seed=4, d_model=32, n_layers=2), dtype="float32", resolution=64)
    return {"lumina-dimoo": dm, "mmada": mm}


@pytest.fixture(params=["lumina-dimoo", "mmada"])
def bb(request, models):
    return models[request.param]


def test_cache_off_images_are_the_ones_before_the_option(bb):
    r = sample(bb, bb.tokenize(TEXTS), sampler_config(PRESET[bb.name], steps=10), seed=7)
    codes, commit = GOLDEN[bb.name]
    assert r.codes.tolist() == codes and r.commit_step.tolist() == commit
    none = sample(bb, bb.tokenize(TEXTS), sampler_config(PRESET[bb.name], steps=10, cache="none"), seed=7)
    assert none.codes.tolist() == codes


def test_cache_off_leaves_the_config_and_its_protocol_unchanged():
    # evaluators record asdict(SamplerConfig) in every image protocol: off, it must not gain keys
    for name, preset in PRESETS.items():
        for settings in ({"preset": name}, {"preset": name, "cache": "none"}):
            cfg = SamplerSettings(**settings).resolve()
            assert type(cfg) is SamplerConfig and asdict(cfg) == asdict(preset)
    on = SamplerSettings(preset="lumina-dimoo", cache="ml-cache", cache_ratio=0.8).resolve()
    assert isinstance(on, MLCacheSamplerConfig) and on.steps == 64 and on.cache_ratio == 0.8
    assert asdict(on) == {**asdict(PRESETS["lumina-dimoo"]), "cache": "ml-cache", "cache_ratio": 0.8,
                          "cache_warmup_ratio": 0.3, "cache_refresh_interval": 5}
    with pytest.raises(ValueError, match="cache is none"):
        sampler_config("lumina-dimoo", cache_ratio=0.5)
    for bad in ({"cache_ratio": 1.0}, {"cache_warmup_ratio": 1.0}, {"cache_refresh_interval": 1}):
        with pytest.raises(ValueError):
            SamplerSettings(preset="lumina-dimoo", cache="ml-cache", **bad)


def test_refresh_schedule_is_upstreams():
    # image_generation_generator.py L74-78 at the defaults (64 steps, warmup 0.3 -> warmup_step 19, interval 5)
    plan = refresh_steps(sampler_config("lumina-dimoo", cache="ml-cache"))
    assert [s for s, r in enumerate(plan) if r] == list(range(20)) + [24, 29, 34, 39, 44, 49, 54, 59]
    assert refresh_steps(PRESETS["lumina-dimoo"]) == [True] * 64


def test_count_is_what_upstreams_quantile_selects():
    g = torch.Generator().manual_seed(0)
    for length in (7, 40, 101, 367, 1100):
        for ratio in (1 - 0.9, 0.25, 0.5):
            conf = torch.randn(length, generator=g)
            assert ml_cache_count(length, ratio) == int((conf <= torch.quantile(conf, ratio)).sum())


def test_cache_on_first_step_equals_the_uncached_one(bb):
    prompts, cfg = bb.tokenize(TEXTS), sampler_config(PRESET[bb.name], steps=10, cache="ml-cache")
    uncond = bb.uncond(len(TEXTS))
    codes = torch.full((len(TEXTS), bb.grid[0] * bb.grid[1]), -1)
    plain = guided_logits(bb, prompts, uncond, codes, cfg.cfg)
    cached = _MLCache(bb, prompts, uncond, cfg).guided_logits(0, codes)
    assert torch.equal(plain, cached)
    # a cache that refreshes at every step (warm-up over all steps) is the uncached sampler
    every = sample(bb, prompts, sampler_config(PRESET[bb.name], steps=10, cache="ml-cache", cache_warmup_ratio=0.95), seed=7)
    assert every.codes.tolist() == GOLDEN[bb.name][0]


def test_cached_steps_recomputing_every_position_equal_the_uncached_sampler(bb):
    # cache_ratio ~ 0: a cached step recomputes every position, so it is a full forward by another route
    r = sample(bb, bb.tokenize(TEXTS), sampler_config(PRESET[bb.name], steps=10, cache="ml-cache", cache_ratio=1e-9), seed=7)
    assert r.codes.tolist() == GOLDEN[bb.name][0]


def test_cache_on_runs_and_reuses(bb):
    prompts = bb.tokenize(TEXTS)
    cfg = sampler_config(PRESET[bb.name], steps=20, cache="ml-cache")
    a = sample(bb, prompts, cfg, seed=7)
    b = sample(bb, prompts, cfg, seed=7)
    n = bb.grid[0] * bb.grid[1]
    assert torch.equal(a.codes, b.codes) and a.codes.shape == (3, n) and (a.codes >= 0).all()
    assert (a.commit_step >= 0).all()
    # a cached step keeps the logits of the positions it did not recompute
    run = _MLCache(bb, prompts, bb.uncond(3), cfg)
    codes = torch.full((3, n), -1)
    run.guided_logits(0, codes)
    before = run.state.logits.clone()
    codes[:, :2] = 5
    _, key_mask, _ = bb.build_inputs(run.prompts, torch.cat([codes, codes]))
    index = run.state.rows_to_compute(key_mask, run.state.counts)
    step = next(s for s, refresh in enumerate(run.refresh) if not refresh)
    run.guided_logits(step, codes)
    kept = torch.ones_like(before[..., 0], dtype=torch.bool)
    kept.scatter_(1, index, False)
    assert torch.equal(run.state.logits[kept], before[kept])
    # per row: its count of real positions, then pads up to the widest row
    assert [int(key_mask[i, index[i]].sum()) for i in range(len(index))] == run.state.counts


def test_cache_needs_a_llada_backbone():
    torch.manual_seed(0)
    tiny = load_tiny("", d_model=32, n_layers=2, n_heads=2, mlp_hidden=64)
    with pytest.raises(ValueError, match="LLaDA backbone"):
        sample(tiny, tiny.tokenize(["a photo of a square"]), sampler_config(steps=3, cache="ml-cache"), seed=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_check_off_is_bit_identical_on_cpu(bb, dtype):
    llada = bb.llada
    prompts = bb.tokenize(TEXTS[:1])              # one prompt, no CFG: nothing padded, the check's fast path
    cfg = sampler_config(PRESET[bb.name], steps=6, cfg=0.0)
    padded = bb.tokenize(TEXTS)                    # and a padded batch
    try:
        llada.to(dtype)
        with_check = [sample(bb, p, c, seed=1).codes for p, c in ((prompts, cfg), (padded, sampler_config(PRESET[bb.name], steps=6)))]
        llada.mask_check = False
        without = [sample(bb, p, c, seed=1).codes for p, c in ((prompts, cfg), (padded, sampler_config(PRESET[bb.name], steps=6)))]
    finally:
        llada.mask_check = True
        llada.to(torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(with_check, without))
