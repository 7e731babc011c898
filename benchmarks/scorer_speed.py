"""Images/s and memory of the scorers at their real widths on random weights, batched against one image at a time
(issue 18 item 3). No weight files are read: each model is built with the project's evaluator classes (or the
transformers / mmdet classes the evaluators load) at the official shapes and random weights, so the numbers are
the cost of the real arithmetic, not of real scores. Each row also checks that the batched path computes what the
one-image path computes (max |batched - one| of the scores, within float tolerance; the script fails otherwise).

    python benchmarks/scorer_speed.py                  # CPU; Qwen2-VL's LLM at 2 of 28 blocks, ~10 min on 2 cores
    python benchmarks/scorer_speed.py --smoke          # tests: tiny widths, same code path, seconds
    python benchmarks/scorer_speed.py --device cuda --llm-layers 0 --out DIR    # GPU, full depth (0 = official)

Rows (the official shapes, cited beside each builder; "batched" = the evaluator's own batch constant):
- geneval-detector: GenEval's Mask2Former Swin-S (mmdet's official config, evaluators.mmdet_backend), the
  project's one-image path `mmdet_backend.detect` (what the official evaluate_images.py does, one image per
  inference_detector call) against one test_step over a batch through the same test pipeline; only where mmdet
  and mmcv's compiled ops are installed (`make mmdet`);
- clip-colors: GenEval's colour classifier, CLIP ViT-L/14 image tower (evaluators.clip_colors.image_embeddings on
  object crops, 224 px); the official evaluate_images.py (and our classify_colors) embeds the crops of one image
  (per class) at a time; batched = 16 crops of different images in one call;
- imagereward: ImageReward v1.0 (evaluators.imagereward.ImageRewardModel: BLIP ViT-L/16 at 224 px, BERT-base
  cross-attention text tower, 35 tokens, MLP head); the official `score` takes one image at a time, ours BATCH = 16;
- hpsv3: Qwen2-VL-7B-Instruct (vision tower at full depth, the LLM at --llm-layers of its 28 blocks, full width)
  on HPSv3's input (448x448 px = 256 image tokens + ~60 prompt tokens); batched = evaluators.hpsv3.BATCH (8).
  At reduced depth the rate is not the real scorer's (the 26 missing blocks cost about 13x the 2 measured; the
  vision tower is measured whole); its batched / one ratio is the part that carries over.
  DeQA (mPLUG-Owl2) and UniPercept (InternVL3-8B) are 7-8B VLMs of the same kind, not measured here.
CPU times are float32; on CUDA the scorers' own dtypes (fp16 autocast for CLIP under GenEval's amp, bf16 for the
VLM, float32 for ImageReward and the detector as their evaluators run them).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_reset(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak(device) -> float | None:
    return float(torch.cuda.max_memory_allocated()) if torch.device(device).type == "cuda" else None


def params_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Vectors (norm weights / biases) 1 / 0, every matrix N(0, 0.02), drawn in place on the module's device."""
    gens: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if "weight" in name else 0.0)
            else:
                g = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
                p.normal_(0.0, 0.02, generator=g)
    return module.eval()


class FixedTokens:
    """A stand-in tokenizer: `length` ids per text, fixed by the text (tokenising costs nothing next to the towers;
    the same text gives the same ids in any batch, so batched and one-at-a-time scores can be compared)."""

    def __init__(self, vocab: int, length: int):
        self.vocab, self.length = vocab, length

    def __call__(self, texts, **_):
        from transformers import BatchEncoding
        rows = [torch.randint(1000, self.vocab, (self.length,), generator=torch.Generator().manual_seed(
            sum(map(ord, t)))) for t in texts]
        ids = torch.stack(rows)
        return BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})


def image_seed(image: np.ndarray) -> int:
    return int(np.asarray(image[:8, :8], dtype=np.int64).sum())


# --- builders: (callable scoring a list of uint8 images -> [B, ...] tensor, the module, a note, batch) ----------

def build_clip_colors(smoke: bool, device: str, **_):
    """CLIP ViT-L/14 (openai/clip-vit-large-patch14 config.json: vision 1024 wide, 24 layers, 16 heads, MLP 4096,
    patch 14, 224 px; text 768 wide, 12 layers, 12 heads; projection 768); the colour head is a [768, 10] matrix
    (cached per class name, evaluators.clip_colors.color_classifier)."""
    from PIL import Image
    from transformers import CLIPConfig, CLIPModel
    from evaluators import clip_colors
    vision = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4) if smoke else
              dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16))
    text = (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2) if smoke else
            dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12))
    config = CLIPConfig(vision_config={**vision, "patch_size": 14, "image_size": 224}, text_config=text,
                        projection_dim=64 if smoke else 768)
    model = randomise(CLIPModel(config)).to(device)
    clf = clip_colors.ColorClassifier(model=model, tokenizer=None, device=device)
    weights = torch.nn.functional.normalize(torch.randn(config.projection_dim, len(clip_colors.COLORS)), dim=0).to(device)

    def score(images):
        crops = [Image.fromarray(im[: im.shape[0] // 2, : im.shape[1] // 2]) for im in images]   # an object's crop
        return clip_colors.LOGIT_SCALE * clip_colors.image_embeddings(clf, crops) @ weights
    return score, model, "CLIP ViT-L/14 image tower, one crop per image", 16


def build_imagereward(smoke: bool, device: str, **_):
    """ImageReward.pt: BLIP ViT-L/16 (1024 wide, 24 layers, 16 heads, MLP 4096) at 224 px; med_config.json
    BERT-base (768, 12 layers, 12 heads, MLP 3072, 30524 words) with cross-attention to the image; MLP head
    768 -> 1024 -> 128 -> 64 -> 16 -> 1 (evaluators.imagereward.load_imagereward builds the same from the file)."""
    from transformers import BlipTextConfig, BlipVisionConfig
    from transformers.models.blip.modeling_blip import BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel
    from PIL import Image
    from evaluators import clip_colors, imagereward as ir
    from evaluators.preference import AestheticHead
    w, d, t, td = (64, 2, 32, 1) if smoke else (1024, 24, 768, 12)
    vision = BlipVisionModel(BlipVisionConfig(hidden_size=w, intermediate_size=4 * w, num_hidden_layers=d,
                                              num_attention_heads=max(1, w // 64), image_size=ir.IMAGE_SIZE,
                                              patch_size=16, layer_norm_eps=ir.VIT_EPS))
    text = BlipTextModel(BlipTextConfig(vocab_size=30524, hidden_size=t, encoder_hidden_size=w, intermediate_size=4 * t,
                                        num_hidden_layers=td, num_attention_heads=max(1, t // 64),
                                        max_position_embeddings=512, bos_token_id=None, sep_token_id=None,
                                        eos_token_id=None), add_pooling_layer=False)
    model = ir.ImageRewardModel(randomise(vision), randomise(text), randomise(AestheticHead(t)),
                                FixedTokens(30524, ir.MAX_TEXT_TOKENS)).eval().to(device)

    def score(images):
        pixels = torch.stack([clip_colors.preprocess(Image.fromarray(im), ir.IMAGE_SIZE) for im in images]).to(device)
        return model(["a prompt"] * len(images), pixels)
    return score, model, "BLIP ViT-L/16 + BERT-base cross-attention", ir.BATCH


def build_qwen2vl(smoke: bool, device: str, layers: int = 2, **_):
    """HPSv3 = Qwen2-VL-7B-Instruct (config.json: hidden 3584, 28 layers, 28 heads / 4 KV, MLP 18944, vocab 152064,
    M-RoPE sections 16/24/24; vision depth 32, embed 1280, 16 heads, patch 14, temporal patch 2, merge 2) + a
    reward head on one hidden state; HPSv3's inferencer resizes to min = max = 256 x 28 x 28 pixels (448 x 448 for
    a square, evaluators.hpsv3.PIXELS), i.e. (448/14)^2 / 4 = 256 image tokens, plus ~60 prompt tokens."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from evaluators import hpsv3
    if smoke:
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
        vis = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14, spatial_merge_size=2)
        sections = [2, 3, 3]
    else:
        text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=layers or 28, num_attention_heads=28,
                    num_key_value_heads=4)
        vis = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, patch_size=14, spatial_merge_size=2)
        sections = [16, 24, 24]
    config = Qwen2VLConfig(text_config={**text, "vocab_size": 152064,
                                        "rope_scaling": {"type": "mrope", "mrope_section": sections}},
                           vision_config=vis, image_token_id=151655, vocab_size=152064)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(config)
    model.lm_head = torch.nn.Identity()          # HPSv3 reads a hidden state; the 545M-row LM head is never run
    model = randomise(model.to(dtype).to_empty(device=device))     # built in place: no float32 CPU copy of 8B
    for m in model.modules():                    # rotary inverse frequencies: buffers to_empty left uninitialised
        if "inv_freq" in m._buffers:
            fresh = type(m)(m.config)
            for key, value in fresh._buffers.items():
                m._buffers[key] = value.to(device)
    assert [k for k, _ in model.named_buffers() if not k.endswith("inv_freq")] == []
    side = 56 if smoke else int(hpsv3.PIXELS ** 0.5)       # 448
    grid = side // 14

    def score(images):
        b = len(images)
        n_img = grid * grid // 4
        gens = [torch.Generator().manual_seed(image_seed(im)) for im in images]
        ids = torch.stack([torch.randint(1000, 150000, (60 + n_img,), generator=g) for g in gens])
        ids[:, 10:10 + n_img] = 151655
        pixels = torch.cat([torch.randn(grid * grid, 3 * 2 * 14 * 14, generator=g) for g in gens])
        thw = torch.tensor([[1, grid, grid]] * b)
        # sequential positions on the three M-RoPE axes, as HPSv3's forward (evaluators/hpsv3.py hpsv3_scores)
        positions = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, b, -1)
        with torch.no_grad():
            out = model.model(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                              position_ids=positions.to(device), pixel_values=pixels.to(device, dtype),
                              image_grid_thw=thw.to(device))
        return out.last_hidden_state[:, -1].float()
    note = ("Qwen2-VL, shrunk" if smoke else
            f"Qwen2-VL-7B, vision 32 blocks, LLM {text['num_hidden_layers']} of 28 blocks") + f", {side} px"
    return score, model, note, hpsv3.BATCH


def detector_config(smoke: bool):
    """The official Mask2Former Swin-S config (inside the mmdet wheel, evaluators.mmdet_backend.official_config_path:
    Swin-S embed 96, depths 2/2/18/2, heads 3/6/12/24, window 7; pixel decoder 6 deformable layers at 256; 9
    decoder layers, 100 queries; test resize keep-ratio to (1333, 800)); smoke: tests/test_mmdet_backend.py's shrunk one."""
    from mmengine.config import Config
    from evaluators.mmdet_backend import official_config_path
    cfg = Config.fromfile(str(official_config_path()))
    cfg.model.backbone.init_cfg = None
    if smoke:
        width = 32
        attn = dict(embed_dims=width, num_heads=2)
        ffn = dict(embed_dims=width, feedforward_channels=2 * width)
        cfg.merge_from_dict({
            "model.backbone.embed_dims": width, "model.backbone.depths": [1, 1, 1, 1],
            "model.backbone.num_heads": [1, 2, 4, 8],
            "model.panoptic_head.in_channels": [width, 2 * width, 4 * width, 8 * width],
            "model.panoptic_head.feat_channels": width, "model.panoptic_head.out_channels": width,
            "model.panoptic_head.num_queries": 10,
            "model.panoptic_head.positional_encoding.num_feats": width // 2,
            "model.panoptic_head.pixel_decoder.encoder.num_layers": 1,
            "model.panoptic_head.pixel_decoder.encoder.layer_cfg.self_attn_cfg": attn,
            "model.panoptic_head.pixel_decoder.encoder.layer_cfg.ffn_cfg": ffn,
            "model.panoptic_head.pixel_decoder.positional_encoding.num_feats": width // 2,
            "model.panoptic_head.transformer_decoder.num_layers": 1,
            "model.panoptic_head.transformer_decoder.layer_cfg.self_attn_cfg": attn,
            "model.panoptic_head.transformer_decoder.layer_cfg.cross_attn_cfg": attn,
            "model.panoptic_head.transformer_decoder.layer_cfg.ffn_cfg": ffn,
        })
        for step in cfg.test_dataloader.dataset.pipeline:
            if step["type"] == "Resize":
                step["scale"] = (256, 192)
    return cfg


def build_detector(smoke: bool, device: str, **_):
    """GenEval's detector with random weights (mmdet's default init). One image: evaluators.mmdet_backend.detect
    (the project's and the official path). Batched: the same test pipeline per image, one test_step on the batch
    (mmdet's data preprocessor pads the batch to one shape; same-size images need no extra padding)."""
    import copy
    from mmcv.transforms import Compose
    from mmdet.registry import MODELS
    from mmdet.utils import get_test_pipeline_cfg, register_all_modules
    from evaluators import mmdet_backend
    register_all_modules()
    cfg = detector_config(smoke)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.cfg = cfg
    model = model.to(device).eval()
    steps = copy.deepcopy(get_test_pipeline_cfg(cfg))
    steps[0]["type"] = "mmdet.LoadImageFromNDArray"
    pipeline = Compose(steps)

    def as_tensor(dets: list[dict]) -> torch.Tensor:
        # [instances, 1 + 4 + 1]: label, box, score (sorted by score, the order GenEval uses)
        from evaluators.coco_prompts import COCO_CLASSES
        rows = [[COCO_CLASSES.index(d["class"]), *d["bbox"], d["score"]] for d in dets]
        t = torch.tensor(rows, dtype=torch.float64).reshape(-1, 6)
        return t[t[:, 5].argsort(descending=True, stable=True)]

    def one(images):
        return torch.stack([as_tensor(mmdet_backend.detect(model, im)) for im in images])

    def batched(images):
        data = [pipeline(dict(img=np.ascontiguousarray(im[:, :, ::-1]), img_id=i)) for i, im in enumerate(images)]
        batch = {"inputs": [d["inputs"] for d in data], "data_samples": [d["data_samples"] for d in data]}
        with torch.no_grad():
            results = model.test_step(batch)
        out = []
        for res in results:
            inst = res.pred_instances
            labels, scores = inst.labels.cpu().numpy(), inst.scores.float().cpu().numpy()
            boxes, masks = inst.bboxes.float().cpu().numpy(), inst.masks.cpu().numpy().astype(bool)
            out.append(as_tensor([{"class": mmdet_backend.COCO_CLASSES[int(labels[k])], "bbox": [float(v) for v in boxes[k]],
                                   "score": float(scores[k]), "mask": masks[k]} for k in range(len(labels))]))
        return torch.stack(out)

    def score(images):
        return one(images) if len(images) == 1 else batched(images)
    note = "Mask2Former Swin-S (mmdet official config), 512 px -> 800 px test resize" if not smoke else \
        "Mask2Former, shrunk (tests' config)"
    return score, model, note, 8


BUILDERS = {"geneval-detector": build_detector, "clip-colors": build_clip_colors, "imagereward": build_imagereward,
            "hpsv3": build_qwen2vl}


SLOW_ON_CPU = ("geneval-detector", "hpsv3")      # at most 8 images each on the CPU (seconds per image)


def detector_missing() -> str | None:
    from evaluators.mmdet_backend import missing_dependencies
    return missing_dependencies()


def measure(score, images, batch: int, device: str, repeats: int = 1) -> tuple[float, float | None, torch.Tensor]:
    """(images/s, peak GPU bytes, the scores of every image in order) at `batch` images per call, after a warm-up."""
    with torch.no_grad():
        score(images[:batch])                       # warm-up
        peak_reset(device)
        t = time.perf_counter()
        for _ in range(repeats):
            outs = [score(images[i:i + batch]) for i in range(0, len(images), batch)]
        sync(device)
    rate = repeats * len(images) / (time.perf_counter() - t)
    return rate, peak(device), torch.cat([o.detach().float().cpu() for o in outs])


def agreement(one: torch.Tensor, batched: torch.Tensor) -> tuple[float, float]:
    """(max |batched - one|, max |one|) over every score; shapes must match (same instances per image)."""
    if one.shape != batched.shape:
        return float("inf"), float(one.abs().max()) if one.numel() else 0.0
    return float((batched - one).abs().max()) if one.numel() else 0.0, float(one.abs().max()) if one.numel() else 0.0


def load_average() -> str:
    import os
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=16, help="images per row (the detector and hpsv3 use at most 8 on the CPU)")
    ap.add_argument("--llm-layers", type=int, default=2, help="LLM blocks of the VLM scorers (0 = the official depth)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(BUILDERS)}")
    ap.add_argument("--rtol", type=float, default=None, help="allowed max |batched - one| / max |one| (default 1e-4 "
                    "in float32, 3e-2 with the GPU's half types)")
    ap.add_argument("--out", type=Path, default=Path("results/scorer_speed"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cuda = torch.device(args.device).type == "cuda"
    rtol = args.rtol if args.rtol is not None else (3e-2 if cuda else 1e-4)
    n = 4 if args.smoke else args.images
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (512, 512, 3), dtype=np.uint8) for _ in range(n)]
    only = [x for x in args.only.split(",") if x] or list(BUILDERS)
    unknown = [x for x in only if x not in BUILDERS]
    if unknown:
        ap.error(f"unknown scorer(s) {', '.join(unknown)}; known: {', '.join(BUILDERS)}")
    load_before = load_average()
    rows, notes = [], []
    for name in only:
        if name == "geneval-detector" and (why := detector_missing()):
            notes.append(f"GenEval's detector (Mask2Former Swin-S) not measured: {why} (`make mmdet`)")
            continue
        score, model, note, batch = BUILDERS[name](args.smoke, args.device, layers=args.llm_layers)
        these = images[: min(n, 8)] if name in SLOW_ON_CPU and not cuda else images
        batch = min(batch, len(these))
        row = {"scorer": name, "model": note, "params": sum(p.numel() for p in model.parameters()),
               "weights_bytes": params_bytes(model), "batch": batch, "images": len(these)}
        rate1, mem1, s1 = measure(score, these, 1, args.device)
        rateb, memb, sb = measure(score, these, batch, args.device)
        diff, scale = agreement(s1, sb)
        row.update(one={"images_per_s": rate1, "peak_bytes": mem1}, batched={"images_per_s": rateb, "peak_bytes": memb},
                   max_abs_diff=diff, max_abs_score=scale, agree=bool(diff <= rtol * max(scale, 1e-12)))
        rows.append(row)
        print(name, {k: row[k] for k in ("one", "batched", "max_abs_diff", "agree")}, flush=True)
        del model, score
    device_name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    head = (f"device: {device_name}; torch {torch.__version__}; random weights, "
            f"{'smoke widths' if args.smoke else 'official widths'}; {n} images of 512x512 ("
            f"{', '.join(SLOW_ON_CPU)}: {min(n, 8) if not cuda else n}); load average (1/5/15 min) {load_before} before, {load_average()} after")
    lines = [head, "", "| scorer | model | params | weights | images/s one at a time | images/s batched (batch) | "
                       "batched / one | max abs diff batched vs one (max abs score) | peak GPU mem one / batched |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mems = (r["one"]["peak_bytes"], r["batched"]["peak_bytes"])
        mem = " / ".join(f"{m / 2**30:.1f} GiB" for m in mems) if all(mems) else "–"
        one, bat = r["one"]["images_per_s"], r["batched"]["images_per_s"]
        lines.append(f"| {r['scorer']} | {r['model']} | {r['params'] / 1e6:.0f}M | {r['weights_bytes'] / 2**30:.2f} GiB | "
                     f"{one:.3f} | {bat:.3f} ({r['batch']}) | {bat / one:.2f}x | {r['max_abs_diff']:.1e} "
                     f"({r['max_abs_score']:.1e}){'' if r['agree'] else ' DIFFER'} | {mem} |")
    lines += [""] + notes
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scorer_speed.md").write_text(text)
    (args.out / "scorer_speed.json").write_text(json.dumps({"header": head, "rows": rows, "notes": notes,
                                                            "rtol": rtol}, indent=1))
    if not all(r["agree"] for r in rows):
        print("scorer_speed.py: batched and one-at-a-time scores differ beyond the tolerance", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
