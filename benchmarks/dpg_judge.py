"""Questions per second of DPG's mPLUG judge: the official per-question path vs ours, same random weights.

reference: MPlugJudge.reference_answer, the official pipeline's computation (modelscope's
MPlugForVisualQuestionAnswering + TextGenerator): the tile is preprocessed and encoded again for every question
and every beam-search step recomputes the whole answer prefix and the memory's keys/values for every beam.
Its answers and scores are bit-equal to modelscope's (tests/test_mplug.py::test_answers_equal_modelscope).
ours: MPlugJudge.answer_many on the same tiles and questions, exact mode (bit-equal answers and scores) and
batched mode (all tiles in one ViT call, all questions in one beam search, KV cache).

Default: full-size shapes (ViT-L/14 at 504 px, BERT-base text 6 / fusion 6 of 12 with stride 3 / decoder 12 layers),
1 tile, 2 reference questions, 10 questions for ours (a DPG item has about 10), fp32 on the CPU: a few minutes on 2
cores. --small: a 224 px, 2-layer model (seconds). Random weights give long answers (max_length steps), so the
reference's per-question cost is near its worst case; the yes/no answers of the real model stop after 2 steps.

usage: python benchmarks/dpg_judge.py [--small] [--tiles N] [--questions N] [--reference-questions N] [--device cpu]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from evaluators import mplug as M

QUESTIONS = ["is there a cat?", "is the cat red?", "is there a dog?", "are there two dogs?", "is the dog on the left?",
             "is the sky blue?", "is there a table?", "is the table wooden?", "is it sunny?", "is there a person?",
             "is the person smiling?", "is there a tree?"]


def bert_config(small: bool) -> dict:
    layers = (2, 2, 4, 2) if small else (6, 6, 12, 12)           # text, fusion run, of, decoder
    return {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072, "vocab_size": 30522,
            "max_position_embeddings": 512, "num_hidden_layers": layers[2], "text_encoder_layers": layers[0],
            "fusion_layers": layers[1], "text_decode_layers": layers[3], "stride_layer": 3 if not small else 1,
            "encoder_width": 768, "layer_norm_eps": 1e-12, "hidden_act": "gelu", "type_vocab_size": 2}


def vocab() -> list[str]:
    words = sorted({w for q in QUESTIONS for w in q.replace("?", " ?").split()} | {"yes", "no"})
    base = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    return base + [f"w{i}" for i in range(30522 - len(base))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--tiles", type=int, default=1)
    ap.add_argument("--questions", type=int, default=10, help="questions per tile for ours")
    ap.add_argument("--reference-questions", type=int, default=2, help="questions the reference answers (slow)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    res, layers = (224, 2) if a.small else (504, 24)
    t0 = time.perf_counter()
    model = M.random_model(bert_config(a.small), image_res=res, patch=14, width=1024, layers=layers, vision_width=1024,
                           seed=a.seed, std=0.02).to(a.device)
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.txt").write_text("".join(t + "\n" for t in vocab()))
        judge = M.MPlugJudge(model, M.Tokenizer(Path(tmp) / "vocab.txt"))
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, {res} px, built in "
          f"{time.perf_counter() - t0:.1f} s; device {a.device}, {torch.get_num_threads()} threads", flush=True)
    rng = np.random.default_rng(a.seed)
    tiles = [Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)) for _ in range(a.tiles)]
    questions = [[QUESTIONS[(i + k) % len(QUESTIONS)] for i in range(a.questions)] for k in range(a.tiles)]

    def timed(fn):
        start = time.perf_counter()
        out = fn()
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    ref_pairs = [(tiles[0], q) for q in questions[0][:a.reference_questions]]
    ref, t_ref = timed(lambda: [judge.reference_answer(t, q) for t, q in ref_pairs])
    n = sum(map(len, questions))
    exact, t_exact = timed(lambda: judge.answer_many(tiles, questions))
    fast, t_fast = timed(lambda: judge.answer_many(tiles, questions, exact=False, kv_cache=True))
    same = all(r.ids == e.ids and r.score == e.score for r, e in zip(ref, exact[0]))
    diff = max(abs(r.score - f.score) for r, f in zip(ref, fast[0]))
    same_fast = all(r.ids == f.ids for r, f in zip(ref, fast[0]))
    q_ref, q_exact, q_fast = len(ref_pairs) / t_ref, n / t_exact, n / t_fast
    steps = [len(r.ids) - 1 for r in ref]
    print(f"reference (official per-question): {q_ref:.3f} questions/s ({t_ref / len(ref_pairs):.2f} s each, "
          f"{steps} decode steps)")
    print(f"ours, exact (bit-equal {same}):    {q_exact:.3f} questions/s ({n} questions on {a.tiles} tile(s)), "
          f"{q_exact / q_ref:.1f}x")
    print(f"ours, batched + KV cache (same answers {same_fast}, max |score diff| {diff:.2e}): {q_fast:.3f} "
          f"questions/s, {q_fast / q_ref:.1f}x")


if __name__ == "__main__":
    main()
