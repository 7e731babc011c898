"""GPU check of the MMaDA and Lumina-DiMOO adapters: generate a few images per preset, print time and memory.

    python benchmarks/gpu_check.py --mmada /path/to/MMaDA-8B-Base --magvit /path/to/magvitv2 \\
        --dimoo /path/to/Lumina-DiMOO --out results/gpu_check
    python benchmarks/gpu_check.py --replicas          # tiny random replicas: checks the code path only

For each model: load in bf16, sample `--n` images with its published preset (harness.sampling),
decode and save them as PNGs, then one LoRA RL-style step (token_logprobs forward + backward on
the generated codes, gradient checkpointing on) to measure training memory. Prints load time,
seconds per image, and peak GPU memory of each phase. Without weights it stops with the
loaders' error naming the expected files; without a GPU it refuses unless --device cpu is given.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = ["a photo of a red apple on a wooden table", "two cats sitting on a blue sofa",
           "a yellow bus in front of a brick building", "a bowl of green salad, top view"]
REPLICA_PROMPTS = ["a red cube", "two blue dogs", "a green sphere", "a cat"]


def gib(n_bytes: int) -> str:
    return f"{n_bytes / 2 ** 30:.2f} GiB"


def peak(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def check_one(name: str, load, preset: str, prompts: list[str], args, out: Path | None) -> dict:
    from harness.backbones.base import token_logprobs
    from harness.backbones.lora import apply_lora
    from harness.samples import images_from_codes
    from harness.sampling import generate, sampler_config

    dev = args.device
    reset_peak(dev)
    t0 = time.time()
    bb = load()
    sync(dev)
    load_s, load_mem = time.time() - t0, peak(dev)
    print(f"[{name}] loaded in {load_s:.1f} s; grid {bb.grid}, image {bb.image_size}; weights+VQ {gib(load_mem)}")

    cfg = sampler_config(preset, **({"steps": args.steps} if args.steps else {}))
    reset_peak(dev)
    t0 = time.time()
    rollout = generate(bb, prompts, cfg, seed=0, batch_size=args.batch)
    sync(dev)
    gen_s = time.time() - t0
    images = images_from_codes(bb, rollout.codes)   # decode time counts with the drawing
    sync(dev)
    gen_mem = peak(dev)
    print(f"[{name}] {len(prompts)} images, preset {preset!r} ({cfg.steps} steps, CFG {cfg.cfg}), batch {args.batch}: "
          f"{gen_s:.1f} s ({gen_s / len(prompts):.2f} s/image); peak {gib(gen_mem)}")
    if out is not None:
        from PIL import Image
        out.mkdir(parents=True, exist_ok=True)
        for i, pixels in enumerate(images):
            Image.fromarray(pixels).save(out / f"{name}_{i}.png")
        print(f"[{name}] images in {out}")

    # one LoRA RL-style step: the memory the trainer needs per micro-batch of `args.batch`
    apply_lora(bb, r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0)
    bb.module.gradient_checkpointing_enable()
    bb.module.train()
    reset_peak(dev)
    t0 = time.time()
    prompts_b = bb.tokenize(prompts[:args.batch])
    codes = rollout.codes[:args.batch].to(bb.device)
    visible = torch.rand(codes.shape, device=codes.device) < 0.5
    logp = token_logprobs(bb, prompts_b, codes, visible).logp
    with torch.no_grad(), bb.module.disable_adapter():
        ref = token_logprobs(bb, prompts_b, codes, visible).logp
    (-(logp - ref.detach()).pow(2).mean() - logp.mean()).backward()
    sync(dev)
    step_s, step_mem = time.time() - t0, peak(dev)
    n_lora = sum(p.numel() for p in bb.module.parameters() if p.requires_grad)
    print(f"[{name}] LoRA r={args.lora_r} ({n_lora / 1e6:.1f} M params), batch {len(prompts_b)}, grad checkpointing: "
          f"forward+ref+backward {step_s:.2f} s; peak {gib(step_mem)}")
    result = {"load_s": load_s, "gen_s_per_image": gen_s / len(prompts), "gen_peak": gen_mem,
              "lora_step_s": step_s, "lora_step_peak": step_mem}
    del bb
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mmada", help="MMaDA-8B directory or HF repo id in the local cache")
    ap.add_argument("--magvit", help="MAGVIT-v2 directory (default: <mmada>/magvitv2 or the HF cache of showlab/magvitv2)")
    ap.add_argument("--dimoo", help="Lumina-DiMOO directory or HF repo id in the local cache")
    ap.add_argument("--dimoo-size", type=int, nargs=2, default=(1024, 1024), metavar=("H", "W"))
    ap.add_argument("--replicas", action="store_true", help="run on tiny random replicas (no weights needed)")
    ap.add_argument("--n", type=int, default=4, help="images per model")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=0, help="override the preset's step count (0: keep)")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=None, help="write the generated images here")
    args = ap.parse_args(argv)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible; run it on a GPU machine (or pass --device cpu).", file=sys.stderr)
        return 2
    from harness.backbones.lumina_dimoo import load_lumina_dimoo
    from harness.backbones.mmada import load_mmada

    tmp = None
    if args.replicas:
        from harness.backbones.replicas import make_dimoo_replica, make_mmada_replica
        tmp = tempfile.TemporaryDirectory()
        args.mmada = str(make_mmada_replica(Path(tmp.name) / "mmada"))
        args.dimoo = str(make_dimoo_replica(Path(tmp.name) / "dimoo"))
        args.dimoo_size = (64, 96)
    if not args.mmada and not args.dimoo:
        print("gpu_check: pass --mmada DIR and/or --dimoo DIR (or --replicas); nothing to check.", file=sys.stderr)
        return 2
    prompts = (REPLICA_PROMPTS if args.replicas else PROMPTS)[:args.n]
    if args.device.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name()}, {gib(torch.cuda.get_device_properties(0).total_memory)}")
    try:
        if args.mmada:
            check_one("mmada", lambda: load_mmada(args.mmada, device=args.device, dtype="bfloat16", vq_path=args.magvit,
                                                  resolution=64 if args.replicas else 512),
                      "mmada", prompts, args, args.out)
        if args.dimoo:
            h, w = args.dimoo_size
            check_one("lumina-dimoo", lambda: load_lumina_dimoo(args.dimoo, device=args.device, dtype="bfloat16",
                                                                height=h, width=w),
                      "lumina-dimoo", prompts, args, args.out)
    except FileNotFoundError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
