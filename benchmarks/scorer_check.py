"""Real-weights check of the preference / quality scorers: values, seconds per image and peak memory.

    python benchmarks/scorer_check.py --images some_pngs/ --prompt "a photo of a cat"
    python benchmarks/scorer_check.py --random 8 --prompt "a photo of a cat" --only imagereward,hpsv21

Scores every image with every scorer whose model files are present (each scorer's environment variables, see
README "Preference scorers"); the others are listed with the reason they are skipped. Run the official scorer on
the same images to compare values (the parity check none of these scorers has had yet), and keep the
seconds-per-image line for the notes. Without a GPU it runs on the CPU (slow for the 7-8B VLM scorers).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SCORERS = ("deqa", "imagereward", "hpsv21", "pickscore", "clipscore", "clipscore-eot", "clipscore-hessel", "laion-aesthetic", "hpsv3",
           "unipercept-aesthetics", "unipercept-quality", "unipercept-structure")


def load_images(args) -> list[tuple[str, np.ndarray]]:
    if args.images is not None:
        files = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not files:
            raise SystemExit(f"no .png / .jpg images in {args.images}")
        return [(p.name, np.asarray(Image.open(p).convert("RGB"))) for p in files]
    rng = np.random.default_rng(0)
    return [(f"random_{i}", rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)) for i in range(args.random)]


def main(argv: list[str] | None = None) -> int:
    from evaluators.base import Sample
    from harness import registry

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, help="folder of images to score")
    ap.add_argument("--random", type=int, default=4, help="without --images: this many random 512 px images")
    ap.add_argument("--prompt", default="a photo of a cat", help="the prompt every image is scored against")
    ap.add_argument("--only", default="", help="comma-separated scorer names (default: all)")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(SCORERS)
    images = load_images(args)
    samples = [Sample(key=name, metadata={"tag": "dense", "prompt": args.prompt}, image=image) for name, image in images]
    print(f"{len(samples)} images, prompt {args.prompt!r}, device {'cuda' if torch.cuda.is_available() else 'cpu'}")
    for name in names:
        evaluator = registry.get("evaluators", name)
        try:
            evaluator.check_ready()
        except (FileNotFoundError, ValueError) as e:
            print(f"{name}: skipped ({e})")
            continue
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        evaluator.score(samples[:1])                     # load the model (timed apart from scoring)
        t1 = time.time()
        result = evaluator.evaluate(samples)
        t2 = time.time()
        memory = f", peak {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB" if torch.cuda.is_available() else ""
        print(f"{name}: load {t1 - t0:.1f} s, {(t2 - t1) / len(samples):.3f} s/image{memory}; "
              + ", ".join(f"{m.name} {m.value:.4f}" for m in result.metrics))
        for key in sorted(result.records):
            print(f"  {key}: {result.records[key]['score']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
