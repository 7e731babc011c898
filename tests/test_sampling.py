"""Sampler invariants on a small random tiny model."""
import math

import pytest
import torch

from harness.backbones.base import MASKED, guided_logits, token_logprobs
from harness import sampling
from harness.backbones.tiny import WordTokenizer, load_tiny
from harness.sampling import PRESETS, SamplerConfig, masked_after, noise_scales, sample, sampler_config

TEXTS = ["a photo of two red circles", "a photo of a blue square left of a green triangle",
         "a photo of a square", "a photo of three crosses", "a photo of a pink diamond and a brown circle"]


@pytest.fixture(scope="module")
def bb():
    torch.manual_seed(0)
    return load_tiny("", d_model=32, n_layers=2, n_heads=2, mlp_hidden=64)


def test_every_slot_committed_once_and_counts_follow_schedule(bb):
    cfg = SamplerConfig(steps=7, cfg=1.5)
    r = sample(bb, bb.tokenize(TEXTS), cfg, seed=3)
    n = 64
    assert (r.codes >= 0).all() and (r.codes < bb.codebook_size).all()
    assert (r.commit_step >= 0).all() and (r.commit_step < 7).all()
    for s in range(7):
        committed_by_s = (r.commit_step <= s).sum(1)
        assert (committed_by_s == n - masked_after(s, 7, n)).all()


def test_masked_after_is_cosine_and_monotone():
    n, t = 64, 12
    counts = [masked_after(s, t, n) for s in range(t)]
    assert counts[-1] == 0 and all(a > b for a, b in zip(counts, counts[1:]))
    assert counts[0] == math.floor(n * math.cos(math.pi / 2 / t))


def test_results_independent_of_batch_size_and_position(bb):
    cfg = SamplerConfig(steps=5, cfg=2.0)
    full = sample(bb, bb.tokenize(TEXTS), cfg, seed=11)
    for i in range(len(TEXTS)):
        one = sample(bb, bb.tokenize([TEXTS[i]]), cfg, seed=11, indices=[i])
        assert torch.equal(one.codes[0], full.codes[i])
        assert torch.equal(one.commit_step[0], full.commit_step[i])
    other_seed = sample(bb, bb.tokenize(TEXTS), cfg, seed=12)
    assert not torch.equal(other_seed.codes, full.codes)


def test_cfg_zero_equals_conditional_pass(bb):
    p = bb.tokenize(TEXTS[:2])
    codes = torch.full((2, 64), MASKED)
    codes[:, :10] = 5
    assert torch.equal(guided_logits(bb, p, bb.uncond(2), codes, 0.0), bb.image_logits(p, codes))
    w = 1.5
    mixed = guided_logits(bb, p, bb.uncond(2), codes, w)
    expect = (1 + w) * bb.image_logits(p, codes) - w * bb.image_logits(bb.uncond(2), codes)
    torch.testing.assert_close(mixed, expect, rtol=1e-5, atol=1e-5)


def test_token_logprobs_matches_direct_computation(bb):
    p = bb.tokenize(TEXTS[:3])
    codes = torch.randint(0, bb.codebook_size, (3, 64), generator=torch.Generator().manual_seed(0))
    visible = torch.ones_like(codes, dtype=torch.bool)
    visible[:, 7] = False
    out = token_logprobs(bb, p, codes, visible, with_entropy=True)
    inp = codes.clone()
    inp[:, 7] = MASKED
    direct = torch.log_softmax(bb.module(p.ids, p.attn, inp), -1)[torch.arange(3), 7, codes[:, 7]]
    torch.testing.assert_close(out.logp[:, 7], direct)
    assert (out.entropy >= 0).all()


def test_presets_and_noise_schedules():
    assert sampler_config("mmada").steps == 15 and sampler_config("mmada").cfg == 3.5
    assert sampler_config("lumina-dimoo").steps == 64 and sampler_config("lumina-dimoo").cfg == 4.0
    cum = noise_scales(PRESETS["mmada"])
    t = 15
    expect, tau = [], 1.0
    for s in range(t):
        tau *= 1 - (s + 1) / t
        expect.append(tau)
    assert cum == pytest.approx(expect)
    assert noise_scales(PRESETS["lumina-dimoo"]) == [1.0] * 64
    lin = noise_scales(SamplerConfig(steps=4, choice_temperature=2.0))
    assert lin == pytest.approx([1.5, 1.0, 0.5, 0.0])
    with pytest.raises(KeyError, match="unknown sampler preset"):
        sampler_config("mmda")
    with pytest.raises(ValueError):
        SamplerConfig(noise_anneal="cosine")


def test_word_tokenizer_round_trip_and_errors():
    tok = WordTokenizer()
    for t in TEXTS + ["a photo of a big red square above the blue circle , and a small green cross"]:
        assert tok.decode(tok.encode(t)) == t.replace(" ,", ",")
    with pytest.raises(ValueError, match="does not know"):
        tok.encode("a photo of a giraffe")


def test_shipped_checkpoint_draws_recognisable_single_objects():
    """The shipped base checkpoint must draw 'a photo of a X' as one clean X most of the time."""
    from harness.shapes.detect import detect
    bb = load_tiny()
    prompts = [f"a photo of a {s}" for s in ("square", "circle", "triangle", "cross", "diamond")] * 4
    r = sample(bb, bb.tokenize(prompts), SamplerConfig(), seed=0)
    cells = bb.decode_cells(r.codes)
    good = 0
    for text, c in zip(prompts, cells):
        dets = [d for d in detect(c) if d["score"] > 0.3]
        good += len(dets) == 1 and dets[0]["class"] == text.split()[-1]
    assert good >= 14, f"only {good}/20 single-object images were one correct shape"


# --- the presets' per-step counts against the official arithmetic (issue 15 item 7) ---------------------------------
# Independent re-statements of how many image slots each official sampler commits at each step, written the way the
# official code computes them (torch float32 scalar tensors on the CPU, floor, then its clamps).

def official_mmada_commits(n: int, steps: int) -> list[int]:
    """Gen-Verse/MMaDA @ 3cdb8709635beb29f66e4e23cd66060872ac3996, models/modeling_mmada.py t2i_generate L186-204
    with models/sampling.py cosine_schedule (L39) and mask_by_random_topk (L31-36): ratio = (step + 1) / T in a
    Python float, mask_ratio = torch.cos(torch.tensor(ratio) * pi * 0.5) (float32, CPU), mask_len =
    (seq_len * mask_ratio).floor(), then max([1], min(unknown - 1, mask_len)); the slots whose confidence is below
    the mask_len-th smallest stay masked. The returned sampled_ids hold every slot's code after the last step."""
    unknown, commits = torch.tensor([[n]]), []
    for step in range(steps):
        ratio = 1.0 * (step + 1) / steps
        mask_ratio = torch.cos(torch.tensor(ratio) * math.pi * 0.5)
        mask_len = (n * mask_ratio).floor().unsqueeze(0)
        mask_len = torch.max(torch.tensor([1]), torch.min(unknown - 1, mask_len)).long()
        left = torch.zeros_like(unknown) if step == steps - 1 else mask_len      # sampled_ids is returned whole
        commits.append(int(unknown - left))
        unknown = left
    return commits


def official_dimoo_commits(n: int, steps: int) -> list[int]:
    """Alpha-VLLM/Lumina-DiMOO @ 81344e60545ae8d70f11039d3450717d974f831b, generators/image_generation_generator.py
    generate_image L87-96 and L133 with utils/generation_utils.py cosine_schedule (L26-28) and mask_by_random_topk
    (L48-61): break once nothing is masked; keep_n = (vq_len.float() * cos(0.5 * pi * tensor([(s+1)/T]))).floor()
    .clamp_min(1) before the last step and 0 at it; mask_by_random_topk clamps it to [0, #masked - 1]."""
    vq_len = torch.tensor([[n]])
    unknown, commits = vq_len.clone(), []
    for step in range(steps):
        if unknown.item() == 0:
            commits.append(0)                       # the official loop has stopped: no more steps
            continue
        if step < steps - 1:
            frac = torch.cos(0.5 * math.pi * torch.tensor([(step + 1) / steps]))
            keep_n = (vq_len.float() * frac).floor().clamp_min(1).long()
        else:
            keep_n = torch.zeros_like(unknown)
        k = keep_n.squeeze(1).long().unsqueeze(1).clamp_(0, int(unknown) - 1)
        commits.append(int(unknown - k))
        unknown = k
    return commits


def our_commits(preset: str, n: int, steps: int) -> list[int]:
    schedule = PRESETS[preset].schedule
    whole = getattr(sampling, "mask_schedule", None)          # (masked_after step by step before it existed)
    left = whole(steps, n, schedule) if whole else [masked_after(s, steps, n, schedule) for s in range(steps)]
    return [before - after for before, after in zip([n] + left[:-1], left)]


OFFICIAL = {"mmada": official_mmada_commits, "lumina-dimoo": official_dimoo_commits}
# square grids 4x4 .. 64x64 and DiMOO's non-square ones (256x512, 512x1024, 768x1024, 768x1536 px at 16 px / code)
TOKEN_COUNTS = [16, 64, 256, 1024, 4096, 16 * 32, 32 * 64, 48 * 64, 48 * 96]


@pytest.mark.parametrize("preset", ["mmada", "lumina-dimoo"])
def test_preset_counts_equal_the_official_arithmetic_on_the_grid(preset):
    bad = [(n, t) for n in TOKEN_COUNTS for t in range(1, 65) if our_commits(preset, n, t) != OFFICIAL[preset](n, t)]
    assert not bad, f"{len(bad)} (tokens, steps) cases differ from the official counts, e.g. {bad[:6]}"


@pytest.mark.parametrize("preset, n, steps", [
    ("mmada", 1024, t) for t in (12, 15, 18, 20, 30, 32, 50, 100)] + [
    ("lumina-dimoo", n, t) for n in (1024, 4096, 48 * 96) for t in (32, 64, 100, 128)])
def test_published_and_configured_step_counts(preset, n, steps):
    """The presets' own step counts (MMaDA 15, DiMOO 64), the shipped configs' (12, 32) and the ones the issue found
    off (MMaDA 1024 tokens, 15 steps: step 9 commits 90, the old float64 rule 89)."""
    assert our_commits(preset, n, steps) == OFFICIAL[preset](n, steps)
    if (preset, n, steps) == ("mmada", 1024, 15):
        assert OFFICIAL[preset](n, steps)[9] == 90


@pytest.mark.parametrize("n", [2, 16])
def test_few_tokens_many_steps_edge_cases(n):
    """MMaDA keeps one slot masked until the last step (late steps commit nothing); DiMOO commits at least one slot
    per step and stops when none is left."""
    for steps in (1, 2, 3, 5, 17, 40, 64, 200):
        mm, dm = our_commits("mmada", n, steps), our_commits("lumina-dimoo", n, steps)
        assert mm == official_mmada_commits(n, steps) and dm == official_dimoo_commits(n, steps), (n, steps)
        assert sum(mm) == n and sum(dm) == n
        first_zero = dm.index(0) if 0 in dm else steps
        assert all(c >= 1 for c in dm[:first_zero]) and not any(dm[first_zero:])
    assert official_mmada_commits(2, 5) == [1, 0, 0, 0, 1] and official_dimoo_commits(2, 5) == [1, 1, 0, 0, 0]


@pytest.mark.parametrize("preset, steps", [("mmada", 9), ("mmada", 40), ("lumina-dimoo", 9), ("lumina-dimoo", 40)])
def test_the_sampler_commits_the_preset_counts(bb, preset, steps):
    """sample() with a preset commits the official number of slots at each step (64 slots; 40 steps reach the
    edge: MMaDA steps that commit nothing, DiMOO stopping early)."""
    cfg = sampler_config(preset, steps=steps, cfg=1.0)
    r = sample(bb, bb.tokenize(TEXTS[:2]), cfg, seed=5)
    per_step = [(r.commit_step == s).sum(1).tolist() for s in range(steps)]
    expected = OFFICIAL[preset](64, steps)
    assert per_step == [[c, c] for c in expected]
