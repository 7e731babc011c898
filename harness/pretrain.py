"""Pretrain the tiny backbone on freshly sampled shapes scenes with the masked-token objective.

Per image: mask ratio cos(pi/2 * u), u ~ U(0, 1) (at least one slot), cross-entropy on the masked
slots only, no 1/t weight (as MMaDA and Lumina-DiMOO train images); the prompt is dropped to the
unconditional one with probability `cond_dropout` so classifier-free guidance works.

Runs on the CPU or a GPU: `python -m harness.pretrain --help` (the CLI's `harness pretrain` calls it).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from harness.backbones.tiny import TinyBackbone, TinyConfig
from harness.shapes import world
from harness.shapes.prompts import sample_metadata, scene_for


def make_batch(rng: np.random.Generator, batch_size: int, cond_dropout: float) -> tuple[list[str], np.ndarray]:
    """(prompts, codes [B, N]) of freshly sampled train-split scenes; dropped prompts are ""."""
    texts, cells = [], []
    for _ in range(batch_size):
        while True:
            meta = sample_metadata(rng, "train")
            try:
                scene = scene_for(meta, rng)
                break
            except RuntimeError:   # a placement that did not fit in its tries: draw another prompt
                continue
        cells.append(world.render_cells(scene))
        texts.append("" if rng.random() < cond_dropout else meta["prompt"])
    return texts, world.encode_cells(np.stack(cells))


class SceneStream(torch.utils.data.IterableDataset):
    """Endless batches; worker w of the loader draws from its own stream (seed, w)."""

    def __init__(self, seed: int, batch_size: int, cond_dropout: float):
        self.seed, self.batch_size, self.cond_dropout = seed, batch_size, cond_dropout

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, info.id if info else 0])
        while True:
            yield make_batch(rng, self.batch_size, self.cond_dropout)


def masked_token_loss(bb: TinyBackbone, texts: list[str], codes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    b, n = codes.shape
    u = torch.rand(b, generator=gen, device="cpu")
    n_masked = (torch.cos(math.pi / 2 * u) * n).round().clamp(1, n).long()
    ranks = torch.rand(b, n, generator=gen, device="cpu").argsort(1).argsort(1)
    mask = (ranks < n_masked[:, None]).to(codes.device)
    prompts = bb.tokenize(texts)
    logits = bb.module(prompts.ids, prompts.attn, codes.masked_fill(mask, -1))
    return F.cross_entropy(logits[mask].float(), codes[mask])


def pretrain(out: str, steps: int = 20000, batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 0.05,
             warmup: int = 500, seed: int = 0, device: str = "cpu", workers: int = 0, cond_dropout: float = 0.1,
             snapshot_every: int = 0, snapshot_at: tuple[int, ...] = (), max_minutes: float = 0.0,
             model: dict | None = None, progress: bool = True) -> Path:
    torch.manual_seed(seed)
    config = TinyConfig(**(model or {}))
    bb = TinyBackbone(config)
    bb.module.to(device)
    opt = torch.optim.AdamW(bb.module.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    loader = torch.utils.data.DataLoader(SceneStream(seed, batch_size, cond_dropout), batch_size=None,
                                         num_workers=workers, prefetch_factor=8 if workers else None)
    gen = torch.Generator().manual_seed(seed)
    out_dir = Path(out).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    log = []
    command = {"steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "warmup": warmup,
               "seed": seed, "cond_dropout": cond_dropout, "model": asdict(config)}
    t0, ema = time.time(), None
    use_amp = device.startswith("cuda")
    for step, (texts, codes) in enumerate(loader):
        if step >= steps or (max_minutes and time.time() - t0 > 60 * max_minutes):
            command["stopped_at_step"] = step
            break
        codes = torch.as_tensor(codes, device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            loss = masked_token_loss(bb, list(texts), codes, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(bb.module.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if progress and (step % 200 == 0 or step == steps - 1):
            print(f"step {step:6d}  loss {ema:.4f}  lr {sched.get_last_lr()[0]:.2e}  {time.time() - t0:7.1f}s", flush=True)
            log.append({"step": step, "loss": ema, "seconds": time.time() - t0})
        if ((snapshot_every and (step + 1) % snapshot_every == 0) or (step + 1) in snapshot_at) and step + 1 < steps:
            bb.save(out_dir / f"snapshot_{step + 1:06d}.safetensors", {"pretrain": json.dumps({**command, "at_step": step + 1})})
    bb.save(out, {"pretrain": json.dumps(command)})
    (out_dir / "pretrain_log.json").write_text(json.dumps({"command": command, "log": log}, indent=1))
    return Path(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/pretrain/tiny_base.safetensors")
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--snapshot-every", type=int, default=0)
    p.add_argument("--snapshot-at", default="", help="comma-separated steps at which to save snapshots")
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop early (and save) after this long")
    p.add_argument("--model", default="{}", help='JSON overrides of TinyConfig, e.g. \'{"d_model": 192}\'')
    a = p.parse_args(argv)
    pretrain(a.out, a.steps, a.batch_size, a.lr, seed=a.seed, device=a.device, workers=a.workers,
             snapshot_every=a.snapshot_every, snapshot_at=tuple(int(x) for x in a.snapshot_at.split(',') if x),
             max_minutes=a.max_minutes, model=json.loads(a.model))


if __name__ == "__main__":
    main()
