"""torch.compile of the backbone module against eager, for the tiny default's rollout sampler (issue 18 item 4:
"optional torch.compile (measured, off when it does not pay)"), measured side by side in one process after
warm-up, with the images (codes) of both compared bit for bit.

    python benchmarks/compile_speed.py                 # CPU: configs/tiny/ht_grpo.yaml's sampler, batch 32, ~2 min
    python benchmarks/compile_speed.py --smoke         # tests: batch 4, 3 steps, seconds (plus compile time)
    python benchmarks/compile_speed.py --device cuda --out DIR

What runs: harness.sampling.sample on the shipped tiny base (harness/assets/tiny_base.safetensors) with the
sampler of configs/tiny/ht_grpo.yaml (12 steps, CFG 2, temperature 1, choice temperature 2), a rollout batch of
8 prompts x G=4 = 32, in float32 and under bfloat16 autocast (the config's rollout.dtype). "compiled" replaces
backbone.module with torch.compile(module) (inductor, default mode, dynamic=False: the sampler's shapes are the
same at every step); the first compiled call's time (compilation) is reported apart. Timed runs alternate
eager / compiled, the best of --repeats kept for each.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.backbones.tiny import load_tiny  # noqa: E402
from harness.sampling import SamplerSettings, sample  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a photo of two red circles", "a photo of a blue square", "a green triangle left of a yellow circle",
           "a photo of three purple diamonds", "a red square above a blue circle", "a photo of an orange cross",
           "two pink triangles", "a big brown circle below a small red square"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def config_sampler():
    raw = yaml.safe_load((ROOT / "configs/tiny/ht_grpo.yaml").read_text())
    return SamplerSettings(**raw["rollout"]["sampler"]).resolve(), raw["rollout"].get("dtype", "float32")


def run(bb, prompts, cfg, dtype: str, device: torch.device):
    sync(device)
    t = time.perf_counter()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        r = sample(bb, prompts, cfg, seed=0)
    sync(device)
    return r, time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=None, help="rollout batch (default 32 = 8 prompts x G=4; smoke 4)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs of each, best kept (default 3; smoke 1)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--mode", default="default", help="torch.compile mode")
    ap.add_argument("--out", type=Path, default=Path("results/compile_speed"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cfg, config_dtype = config_sampler()
    if args.smoke:
        from dataclasses import replace
        cfg = replace(cfg, steps=3)
    batch = args.batch or (4 if args.smoke else 32)
    repeats = args.repeats or (1 if args.smoke else 3)
    load_before = load_average()
    bb = load_tiny()
    bb.module.to(device).eval()
    eager = bb.module
    compiled = torch.compile(eager, mode=None if args.mode == "default" else args.mode, dynamic=False)
    prompts = bb.tokenize([PROMPTS[i % len(PROMPTS)] for i in range(batch)])
    rows = []
    for dtype in [d for d in args.dtypes.split(",") if d]:
        bb.module = eager
        run(bb, prompts, cfg, dtype, device)                 # eager warm-up
        bb.module = compiled
        t = time.perf_counter()
        run(bb, prompts, cfg, dtype, device)                 # compiles (and runs once)
        compile_s = time.perf_counter() - t
        best = {"eager": float("inf"), "compiled": float("inf")}
        codes = {}
        for _ in range(repeats):
            for name, module in (("eager", eager), ("compiled", compiled)):
                bb.module = module
                r, s = run(bb, prompts, cfg, dtype, device)
                best[name] = min(best[name], s)
                if name in codes and not torch.equal(codes[name], r.codes):
                    raise RuntimeError(f"{name} {dtype}: two runs with one seed gave different codes")
                codes[name] = r.codes
        bb.module = eager
        differ = float((codes["eager"] != codes["compiled"]).float().mean())
        rows.append({"dtype": dtype, "eager_s": best["eager"], "compiled_s": best["compiled"],
                     "speedup": best["eager"] / best["compiled"], "compile_s": compile_s,
                     "identical": bool(torch.equal(codes["eager"], codes["compiled"])), "codes_differ": differ,
                     "images_per_s_eager": batch / best["eager"], "images_per_s_compiled": batch / best["compiled"]})
        print(rows[-1], flush=True)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    head = (f"device: {device_name}; torch {torch.__version__}; tiny base, configs/tiny/ht_grpo.yaml sampler "
            f"({cfg.steps} steps, CFG {cfg.cfg}; the config's rollout dtype is {config_dtype}), batch {batch} "
            f"(CFG batch {2 * batch if cfg.cfg else batch}); torch.compile mode {args.mode}, dynamic=False; best of "
            f"{repeats} alternating runs; load average (1/5/15 min) {load_before} before, {load_average()} after")
    lines = [head, "", "| dtype | eager s / rollout | compiled s / rollout | speed-up | images/s eager / compiled | "
                       "first compiled call (compile + run) | codes |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['eager_s']:.3f} | {r['compiled_s']:.3f} | {r['speedup']:.2f}x | "
                     f"{r['images_per_s_eager']:.1f} / {r['images_per_s_compiled']:.1f} | {r['compile_s']:.1f} s | "
                     + ("bit-identical" if r["identical"] else f"{100 * r['codes_differ']:.1f}% differ") + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile_speed.md").write_text(text)
    (args.out / "compile_speed.json").write_text(json.dumps({"header": head, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
