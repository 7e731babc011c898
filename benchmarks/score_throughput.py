"""Images scored per second by each shapes suite's evaluators (scoring only: images are pre-rendered
ground-truth scenes of the suite's prompts, so the number excludes generation).

    python benchmarks/score_throughput.py [--images 512]
"""
import argparse
import time

import numpy as np

from evaluators.base import Sample
from harness import registry
from harness.shapes import world
from harness.shapes.prompts import GENEVAL_TAGS, dense_metadata, eval_prompts, scene_for


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=512)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    geneval_metas = [m for t in GENEVAL_TAGS for m in eval_prompts(t)]
    sets = {"shapes-geneval": [geneval_metas[i % len(geneval_metas)] for i in range(a.images)],
            "shapes-geneval-partial": [geneval_metas[i % len(geneval_metas)] for i in range(a.images)],
            "shapes-quality": [geneval_metas[(i // 8) % len(geneval_metas)] for i in range(a.images)],
            "shapes-dpg": [m for m in (dense_metadata(rng) for _ in range(a.images // 4)) for _ in range(4)]}
    print("| evaluator | images | images/s |\n|---|---:|---:|")
    for name, metas in sets.items():
        samples = [Sample(key=f"{i // 4:05d}/{i % 4}", metadata=m,
                          image=world.cells_to_rgb(world.render_cells(scene_for(m, rng))), prompt_index=i // 4)
                   for i, m in enumerate(metas)]
        ev = registry.get("evaluators", name)
        t = time.time()
        ev.evaluate(samples)
        print(f"| {name} | {len(samples)} | {len(samples) / (time.time() - t):.0f} |")


if __name__ == "__main__":
    main()
