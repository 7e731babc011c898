"""Sampler throughput (images/s against batch size) and pretraining speed of the tiny backbone (CPU).

    python benchmarks/sampler_throughput.py [--threads 2]
"""
import argparse
import time

import numpy as np
import torch

from harness.backbones.tiny import load_tiny
from harness.pretrain import make_batch, masked_token_loss
from harness.sampling import SamplerConfig, generate


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", type=int, default=128)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    bb = load_tiny()
    texts = ["a photo of two red circles"] * a.images
    print(f"torch {torch.__version__}, {a.threads} threads, tiny backbone {sum(x.numel() for x in bb.module.parameters()) / 1e6:.1f}M params")
    print("| batch | steps | cfg | images/s |\n|---:|---:|---:|---:|")
    for bs in (1, 8, 32, 128):
        n = min(a.images, max(bs * 2, 8))
        generate(bb, texts[:bs], SamplerConfig(steps=2), seed=0, batch_size=bs)   # warm-up
        t = time.time()
        generate(bb, texts[:n], SamplerConfig(steps=12, cfg=2.0), seed=0, batch_size=bs)
        print(f"| {bs} | 12 | 2.0 | {n / (time.time() - t):.1f} |")
    rng = np.random.default_rng(0)
    t = time.time()
    for _ in range(20):
        make_batch(rng, 64, 0.1)
    data_s = (time.time() - t) / 20
    opt = torch.optim.AdamW(bb.module.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    texts_b, codes = make_batch(rng, 64, 0.1)
    codes = torch.as_tensor(codes)
    t = time.time()
    for _ in range(5):
        loss = masked_token_loss(bb, texts_b, codes, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    step_s = (time.time() - t) / 5
    print(f"\npretraining, batch 64: data {data_s * 1000:.0f} ms/batch, model step {step_s * 1000:.0f} ms "
          f"-> {64 / (data_s + step_s):.0f} scenes/s on this CPU")


if __name__ == "__main__":
    main()
