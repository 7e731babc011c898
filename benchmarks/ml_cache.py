"""Lumina-DiMOO's ML-Cache (sampler cache: ml-cache) against the uncached sampler on a random Lumina-DiMOO: speed-up
and image difference, measured side by side in one process (issue 18 item 4).

    python benchmarks/ml_cache.py                      # CPU: 4 of 32 blocks at d 1024, 256x256 px, 64 steps, ~3 min
    python benchmarks/ml_cache.py --size smoke         # tests: the same code path at toy size
    python benchmarks/ml_cache.py --size full --device cuda --out DIR    # official shapes (8B, bf16, 1536x768)

The backbone is our LuminaDiMOOBackbone (official token layout, CFG batched, head sliced to the codebook) around
a LLaDA with random weights (std 1/sqrt(d), so that logits depend on the inputs), the real 134548-row head, the
sampler preset lumina-dimoo (64 steps, CFG 4, dimoo-cosine); a small random diffusers VQ decodes the codes to
pixels (random: the pixel difference is only a scale for the code difference). Rows: the uncached sampler, the
ML-Cache at upstream's defaults (cache_ratio 0.9, warmup 0.3, refresh every 5 steps) and at other settings; for
scale, the uncached sampler under another seed (a different image). With random weights the max logits that pick
the recomputed rows are random too, so the image difference here says nothing about real weights' quality; the
speed-up is a property of the arithmetic and carries over (upstream: 58.2 s -> 32.2 s, 1.81x, A800, 1536x768).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))   # benchmarks/real_size.py

from harness.backbones.base import concat_prompts  # noqa: E402
from harness.sampling import refresh_steps, sample, sampler_config  # noqa: E402


@dataclass(frozen=True)
class Size:
    d_model: int
    n_heads: int
    mlp_hidden: int
    layers: int
    hw: tuple[int, int]
    steps: int
    prompts: int
    dtype: str
    settings: tuple[tuple[float, float, int], ...]      # (cache_ratio, warmup_ratio, refresh_interval)


DEFAULTS = (0.9, 0.3, 5)
SIZES = {
    "smoke": Size(64, 4, 192, 1, (64, 64), 12, 1, "float32", (DEFAULTS,)),
    "cpu": Size(1024, 16, 3072, 4, (256, 256), 64, 1, "float32", (DEFAULTS, (0.9, 0.2, 10))),
    # full: the upstream anchor (1536x768, 64 steps); one cached setting, so that it fits real_size_gpu.sh's budget
    "full": Size(4096, 32, 12288, 32, (768, 1536), 64, 1, "bfloat16", (DEFAULTS,)),
}
PROMPTS = ["a photo of two red cube and a blue sphere", "a dog on the left of a cat", "a green sphere above a cube",
           "two dogs and a cat"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(size: Size, device: torch.device, tmp: Path, seed: int = 0):
    from diffusers import VQModel
    from transformers import AutoTokenizer
    from harness.backbones import lumina_dimoo
    from harness.backbones.llada import LLaDAConfig
    from harness.backbones.replicas import write_word_tokenizer
    from real_size import random_llada
    config = LLaDAConfig(d_model=size.d_model, n_layers=size.layers, n_heads=size.n_heads,
                         mlp_hidden_size=size.mlp_hidden, embedding_size=lumina_dimoo.LOGIT_WIDTH, rope_theta=500000.0)
    # std 1/sqrt(d) rather than real_size's 0.02, so that the logits depend on the inputs
    module = random_llada(config, device, getattr(torch, size.dtype), seed=seed, std=size.d_model ** -0.5)
    module.eval()
    write_word_tokenizer(tmp / "tok", {"<system>": 2001, "</system>": 2002, "<user>": 2003, "</user>": 2004,
                                       "<uncondition>": lumina_dimoo.UNCONDITION})
    tok = AutoTokenizer.from_pretrained(str(tmp / "tok"))
    torch.manual_seed(seed)
    vq = VQModel(down_block_types=("DownEncoderBlock2D",) * 5, up_block_types=("UpDecoderBlock2D",) * 5,
                 block_out_channels=(8,) * 5, layers_per_block=1, latent_channels=4, vq_embed_dim=4,
                 num_vq_embeddings=lumina_dimoo.CODEBOOK_SIZE, norm_num_groups=4, lookup_from_codebook=True).to(device).eval()
    return lumina_dimoo.LuminaDiMOOBackbone(module, tok, vq, height=size.hw[0], width=size.hw[1])


def predicted_speedup(bb, cfg, prompts) -> float:
    """Steps x L over what the cache computes (refreshes x L + cached steps x C), per sequence of the CFG batch:
    L = the padded length every full forward runs, C = the rows a cached step runs (the widest row's
    ml_cache_count, LLaDAMLCache.rows_to_compute pads every row to it). Linear layers scale with the rows and
    attention (C queries against L keys) too, so this is the share of block FLOPs left; the head, the cache's own
    gathers / scatters and the sampler's per-step work (top-k, noise, decode) are not counted."""
    from harness.backbones.base import concat_prompts
    from harness.backbones.llada import ml_cache_count
    both = concat_prompts(prompts, bb.uncond(len(prompts)))
    n = bb.grid[0] * bb.grid[1]
    _, key_mask, _ = bb.build_inputs(both, torch.full((len(both), n), -1))
    padded = key_mask.shape[1]
    part = max(ml_cache_count(int(x), 1 - cfg.cache_ratio) for x in key_mask.sum(1).tolist())
    plan = refresh_steps(cfg)
    return len(plan) * padded / (sum(plan) * padded + (len(plan) - sum(plan)) * part)


def agreement_checks(bb, prompts, steps: int, seed: int) -> list[dict]:
    """The cache's code path against the uncached sampler where they must agree: (a) cache none = the preset;
    (b) ML-Cache with every step a refresh (warm-up over all steps: ml_cache_refresh each step); (c) ML-Cache whose
    cached steps recompute every position (cache_ratio ~ 0: ml_cache_step over all rows, cached K/V overwritten).
    Codes must be identical in float32 on the CPU (tests/test_ml_cache.py); in bf16 on a GPU (c) may differ by
    kernel choice for the gathered rows, so the share of differing codes is reported."""
    plain = sample(bb, prompts, sampler_config("lumina-dimoo", steps=steps), seed=seed).codes
    cases = [("cache none", sampler_config("lumina-dimoo", steps=steps, cache="none")),
             ("ml-cache, every step a refresh", sampler_config("lumina-dimoo", steps=steps, cache="ml-cache",
                                                               cache_warmup_ratio=0.99)),
             ("ml-cache, cached steps recompute every position",
              sampler_config("lumina-dimoo", steps=steps, cache="ml-cache", cache_ratio=1e-9))]
    out = []
    for what, cfg in cases:
        codes = sample(bb, prompts, cfg, seed=seed).codes
        out.append({"what": what, "steps": steps, "identical": bool(torch.equal(codes, plain)),
                    "codes_differ": float((codes != plain).float().mean())})
    return out


def timed_sample(bb, prompts, cfg, seed, device, repeats: int = 1):
    """(result, best seconds of `repeats` runs, peak GPU bytes); every run must give the same codes."""
    best, first, peak = float("inf"), None, None
    for _ in range(repeats):
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        r = sample(bb, prompts, cfg, seed=seed)
        sync(device)
        best = min(best, time.perf_counter() - t)
        peak = float(torch.cuda.max_memory_allocated()) if device.type == "cuda" else None
        if first is None:
            first = r
        elif not torch.equal(first.codes, r.codes):
            raise RuntimeError(f"{cfg}: two runs with seed {seed} gave different codes")
    return first, best, peak


def load_average() -> str:
    try:
        import os
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("results/ml_cache"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per row, best kept (default: 1 at full "
                    "size, 2 otherwise)")
    ap.add_argument("--check-steps", type=int, default=8, help="steps of the agreement checks (0: skip them)")
    ap.add_argument("--no-other-seed", action="store_true", help="skip the 'another seed' scale row")
    args = ap.parse_args(argv)
    size, device = SIZES[args.size], torch.device(args.device)
    repeats = args.repeats or (1 if args.size == "full" else 2)
    torch.manual_seed(0)
    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        bb = build(size, device, Path(tmp))
    prompts = bb.tokenize(PROMPTS[:size.prompts])
    checks = agreement_checks(bb, prompts, args.check_steps, args.seed) if args.check_steps else []
    print("checks:", checks, flush=True)
    base_cfg = sampler_config("lumina-dimoo", steps=size.steps)
    sample(bb, prompts, sampler_config("lumina-dimoo", steps=2), seed=99)     # warm-up (allocator, kernels)
    sample(bb, prompts, sampler_config("lumina-dimoo", steps=8, cache="ml-cache", cache_warmup_ratio=0.0), seed=99)
    # rows timed in turn (uncached, each setting, uncached, ...) and the best of `repeats` kept, so that a load
    # change on a shared machine hits every row alike
    cfgs = [base_cfg] + [sampler_config("lumina-dimoo", steps=size.steps, cache="ml-cache", cache_ratio=ratio,
                                        cache_warmup_ratio=warmup, cache_refresh_interval=interval)
                         for ratio, warmup, interval in size.settings]
    results, best, peaks = [None] * len(cfgs), [float("inf")] * len(cfgs), [None] * len(cfgs)
    for _ in range(repeats):
        for i, cfg in enumerate(cfgs):
            r, s, peaks[i] = timed_sample(bb, prompts, cfg, args.seed, device, 1)
            if results[i] is not None and not torch.equal(results[i].codes, r.codes):
                raise RuntimeError(f"{cfg}: two runs with seed {args.seed} gave different codes")
            results[i], best[i] = r, min(best[i], s)
            print(f"row {i}: {s:.2f} s", flush=True)
    base, base_s, base_peak = results[0], best[0], peaks[0]
    base_px = bb.decode(base.codes)
    rows = [{"what": "uncached (preset lumina-dimoo)", "seconds": base_s, "speedup": 1.0, "predicted": 1.0,
             "codes_differ": 0.0, "pixel_mae": 0.0, "peak_bytes": base_peak}]
    for (ratio, warmup, interval), cfg, r, s, peak in zip(size.settings, cfgs[1:], results[1:], best[1:], peaks[1:]):
        rows.append({"what": f"ml-cache ratio {ratio}, warmup {warmup}, refresh every {interval}"
                             + (" (upstream defaults)" if (ratio, warmup, interval) == DEFAULTS else ""),
                     "seconds": s, "speedup": base_s / s, "predicted": predicted_speedup(bb, cfg, prompts),
                     "refreshes": sum(refresh_steps(cfg)),
                     "codes_differ": float((r.codes != base.codes).float().mean()),
                     "pixel_mae": float((bb.decode(r.codes) - base_px).abs().mean()), "peak_bytes": peak})
    if not args.no_other_seed:
        other, s, peak = timed_sample(bb, prompts, base_cfg, args.seed + 1, device, 1)
        rows.append({"what": "for scale: uncached, another seed", "seconds": s, "speedup": base_s / s,
                     "predicted": 1.0, "codes_differ": float((other.codes != base.codes).float().mean()),
                     "pixel_mae": float((bb.decode(other.codes) - base_px).abs().mean()), "peak_bytes": peak})
    n = bb.grid[0] * bb.grid[1]
    _, key_mask, _ = bb.build_inputs(concat_prompts(prompts, bb.uncond(len(prompts))),
                                     torch.full((2 * len(prompts), n), -1))
    head = (f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'}; "
            f"torch {torch.__version__}; size {args.size}: random Lumina-DiMOO, {size.layers} blocks of d {size.d_model} "
            f"({size.n_heads} heads, MLP {size.mlp_hidden}, head {bb.llada.config.embedding_size} rows), {size.dtype}, "
            f"{size.hw[0]}x{size.hw[1]} px ({n} slots, sequence length {key_mask.shape[1]} padded), {size.steps} steps, "
            f"CFG 4, {size.prompts} prompt(s) (batch {2 * size.prompts} with CFG), seed {args.seed}; best of {repeats} "
            f"timed run(s) per row, rows timed in turn; load average (1/5/15 min) {load_before} before, {load_average()} after")
    lines = [head, "",
             "| sampler | s / batch | speed-up | predicted (FLOP share) | codes differing | pixel MAE (0-1) | "
             "pixel MAE / another seed's | peak GPU mem |",
             "|---|---|---|---|---|---|---|---|"]
    scale = rows[-1]["pixel_mae"] if not args.no_other_seed else float("nan")
    for r in rows:
        mem = f"{r['peak_bytes'] / 2**30:.1f} GiB" if r["peak_bytes"] else "–"
        lines.append(f"| {r['what']} | {r['seconds']:.2f} | {r['speedup']:.2f}x | {r['predicted']:.2f}x | "
                     f"{100 * r['codes_differ']:.1f}% | {r['pixel_mae']:.2e} | {r['pixel_mae'] / scale:.2f} | {mem} |")
    if checks:
        lines += ["", f"Agreement checks ({args.check_steps} steps, same seed, against the uncached sampler):", ""]
        lines += [f"- {c['what']}: {'codes identical' if c['identical'] else 'codes DIFFER'} "
                  f"({100 * c['codes_differ']:.2f}% differing)" for c in checks]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ml_cache.md").write_text(text)
    (args.out / "ml_cache.json").write_text(json.dumps({"size": args.size, "header": head, "rows": rows,
                                                        "checks": checks}, indent=1))
    if size.dtype == "float32" and not all(c["identical"] for c in checks):
        print("ml_cache.py: an agreement check failed in float32 (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
