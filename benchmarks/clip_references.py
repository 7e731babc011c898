"""Reference values from the official CLIP-family scorers, for tests/data/clip_reference.json and the parity notes.

Runs the official code itself, offline, on random weights and made-up images, next to ours:
  text        open_clip's and OpenAI CLIP's tokenizers (cleaning + BPE with the real bpe_simple_vocab_16e6)
  preprocess  torchvision's Resize(224, BICUBIC) + CenterCrop(224) on PIL (OpenAI CLIP / open_clip val transform,
              ImageReward, Hessel's CLIPScore, the aesthetic predictor), HPS v2's ResizeMaxSize transform,
              transformers' CLIPImageProcessor (PIL and torchvision backends)
  --parity    scores: hpsv2's img_score.score vs hpsv21, torchmetrics' clip_score vs clipscore / clipscore-eot,
              jmhessel/clipscore's get_clip_score vs clipscore-hessel, the PickScore README recipe vs pickscore,
              the aesthetic predictor's recipe vs laion-aesthetic (random weights of the real widths and head
              layouts; --layers N shortens every tower to N blocks, 0 = the real depth)

It needs a separate environment with torchvision, open_clip_torch, torchmetrics and the project's runtime
dependencies (the project's own venv has no torchvision), plus checkouts of tgxs002/HPSv2, openai/CLIP and
jmhessel/clipscore under --repos (folder names as `owner+name`):

    python -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch==2.13.0 numpy pillow==13.0.0 \\
        transformers==5.24.0 ftfy==6.3.1 regex open_clip_torch torchmetrics requests clint tqdm einops
    /tmp/refvenv/bin/pip install --no-deps torchvision==0.28.0
    /tmp/refvenv/bin/python benchmarks/clip_references.py --repos /tmp/ref_src --out tests/data/clip_reference.json
    /tmp/refvenv/bin/python benchmarks/clip_references.py --repos /tmp/ref_src --parity --layers 0

The JSON holds what the official code produced (cleaned texts, token ids, pixel fingerprints) and never our
values, so the tests compare the project against it, not against itself.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Prompts where the official cleaning (ftfy, html.unescape, whitespace, lower) and the HF tokenizer's
# normaliser (NFC, whitespace, lower) part ways, and some where they must not.
TEXTS = [
    "A photo of a cat",
    "“Curly” quotes and ‘single’ ones",
    "Salt &amp; pepper",
    "double &amp;amp; escaped",
    "a ﬁne ﬂower",
    "ＦＵＬＬ width ｔｅｘｔ",
    "mojibake: cafÃ©",
    "  leading\tand\ntrailing   spaces  ",
    "non-breaking\u00a0space and thin\u2009space",
    "cafe\u0301 with a combining accent",
    "cafe&#x301; escaped combining accent",
    "emoji 🐱 and CJK 猫",
    "control\x1cchar and &#28; escaped",
    "Über STRASSE straße İstanbul",
    "dash — and ellipsis …",
    "<b>html</b> tags &lt;b&gt;",
    "A DPG-length prompt: " + ", ".join(f"object number {i} in a red box" for i in range(14)),
]
# (width, height): square, odd, very wide / tall, up- and down-sampled, and sides with (side - 224) % 4 == 3 after
# the resize, where torchvision's round-half-even crop offset and transformers' floor part by one pixel
SIZES = [(512, 512), (224, 224), (225, 224), (224, 227), (512, 519), (519, 512), (256, 264), (200, 207), (640, 480),
         (480, 640), (1024, 768), (768, 1344), (333, 777), (1000, 300), (301, 1597), (2048, 256), (100, 1000),
         (37, 91), (45, 48), (96, 131), (97, 224), (300, 301), (1000, 1015), (63, 1999)]
PROBES = 48           # pixel positions per fingerprint
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)      # openai/CLIP clip/clip.py _transform
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def test_image(width: int, height: int) -> np.ndarray:
    """The uint8 RGB image the tests rebuild for a size: uniform noise from a fixed seed."""
    return np.random.default_rng(width * 100003 + height).integers(0, 256, (height, width, 3), dtype=np.uint8)


def probe_positions(size: int = 224) -> list[tuple[int, int, int]]:
    rng = np.random.default_rng(1234)
    return [(int(rng.integers(3)), int(rng.integers(size)), int(rng.integers(size))) for _ in range(PROBES)]


def fingerprint(pixels: torch.Tensor) -> dict:
    """Per-channel sums (float64) and the values at fixed positions of a [3, 224, 224] tensor."""
    pixels = pixels.detach().to(torch.float64)
    return {"shape": list(pixels.shape), "sums": [float(pixels[c].sum()) for c in range(3)],
            "probes": [float(pixels[c, y, x]) for c, y, x in probe_positions(pixels.shape[-1])]}


def hf_tokenizer_from_bpe(bpe_gz: Path, folder: Path):
    """transformers' CLIPTokenizer over the official bpe_simple_vocab_16e6 (the vocabulary SimpleTokenizer builds:
    256 byte symbols, the same with </w>, 48894 merges, then the two special tokens)."""
    from transformers import CLIPTokenizer

    from_bytes = _bytes_to_unicode()
    merges = gzip.open(bpe_gz).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(from_bytes.values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    tokenizer.save_pretrained(folder)
    return tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (as in every CLIP BPE)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, (chr(c) for c in chars)))


# --- reference tables -------------------------------------------------------------------------------------------

def text_table(repos: Path) -> tuple[list[dict], object]:
    import open_clip
    from open_clip import tokenizer as oc_tok

    sys.path.insert(0, str(repos / "openai+CLIP"))
    from clip import simple_tokenizer as openai_tok
    import clip as openai_clip

    bpe = Path(oc_tok.default_bpe())
    hf = hf_tokenizer_from_bpe(bpe, Path(tempfile.mkdtemp()) / "clip_bpe")
    oc = open_clip.get_tokenizer("ViT-H-14")
    rows = []
    for text in TEXTS:
        oc_ids = oc([text])[0]
        oa_ids = openai_clip.tokenize([text], truncate=True)[0]
        rows.append({"text": text,
                     "open_clip_clean": oc_tok.whitespace_clean(oc_tok.basic_clean(text)).lower(),
                     "openai_clean": openai_tok.whitespace_clean(openai_tok.basic_clean(text)).lower(),
                     "open_clip_ids": [int(i) for i in oc_ids[oc_ids.nonzero()].flatten()],
                     "openai_ids": [int(i) for i in oa_ids[oa_ids.nonzero()].flatten()]})
    return rows, hf


def preprocess_table(repos: Path) -> list[dict]:
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
    from transformers import CLIPImageProcessor, CLIPImageProcessorPil

    sys.path.insert(0, str(repos / "tgxs002+HPSv2"))
    from hpsv2.src.open_clip.transform import image_transform as hps_transform

    torchvision_val = Compose([Resize(224, interpolation=InterpolationMode.BICUBIC), CenterCrop(224),
                               lambda im: im.convert("RGB"), ToTensor(), Normalize(OPENAI_MEAN, OPENAI_STD)])
    hps_val = hps_transform(224, is_train=False, resize_longest_max=True)
    hf_pil, hf_torchvision = CLIPImageProcessorPil(), CLIPImageProcessor()
    assert type(hf_torchvision).__name__ == "CLIPImageProcessor", "transformers picked its PIL backend: no torchvision?"
    rows = []
    for width, height in SIZES:
        array = test_image(width, height)
        picture = Image.fromarray(array)
        rows.append({"size": [width, height],
                     "torchvision": fingerprint(torchvision_val(picture)),
                     "hps": fingerprint(hps_val(picture)),
                     "hf_pil": fingerprint(torch.from_numpy(hf_pil(images=[picture], return_tensors="np")["pixel_values"][0])),
                     "hf_torchvision": fingerprint(hf_torchvision(images=[torch.from_numpy(array).permute(2, 0, 1)],
                                                                  return_tensors="pt")["pixel_values"][0])})
    return rows


def compare_ours(text_rows: list[dict], hf, pre_rows: list[dict]) -> None:
    """Print how far the project is from the tables (0 expected except where noted)."""
    from evaluators import clip_colors, hps

    bad = [r["text"] for r in text_rows if clip_colors.openai_clean(r["text"]) != r["open_clip_clean"]]
    print(f"text cleaning: {len(text_rows) - len(bad)}/{len(text_rows)} equal to open_clip's", bad or "")
    for row in text_rows:
        ours = clip_colors.tokenize(hf, [row["text"]], clean=True, truncation="eot", padding=False)["input_ids"][0].tolist()
        plain = hf([row["text"]], truncation=True, max_length=77)["input_ids"][0]
        print(f"  ids {'==' if ours == row['open_clip_ids'] else '!='} open_clip"
              f"{'' if plain == row['open_clip_ids'] else ' (plain HF tokenizer differs)'}: {row['text'][:50]!r}")
    worst: dict[str, float] = {}
    for row in pre_rows:
        picture = Image.fromarray(test_image(*row["size"]))
        for name, ours in (("torchvision", clip_colors.preprocess(picture, 224)),
                           ("hf_pil", clip_colors.preprocess(picture, 224, clip_colors.HF_PROCESSOR)),
                           ("hf_torchvision", clip_colors.preprocess(picture, 224, clip_colors.HF_PROCESSOR)),
                           ("hps", hps.preprocess(test_image(*row["size"])))):
            if row[name]["shape"] != list(ours.shape):
                continue          # hpsv2 leaves an image whose longest side is 224 unpadded; ours pads it
            got = fingerprint(ours)
            gap = max(abs(a - b) for a, b in zip(got["probes"], row[name]["probes"]))
            worst[name] = max(worst.get(name, 0.0), gap)
    print("preprocessing, worst probe difference over", len(pre_rows), "sizes:",
          ", ".join(f"{k} {v:.3g}" for k, v in worst.items()), "(hf_torchvision: PIL vs torch bicubic, expected > 0)")


# --- score parity on random weights -------------------------------------------------------------------------------

def _stub_hessel_imports() -> None:
    """clipscore.py imports its caption-metrics helpers (pycocoevalcap, java) and sklearn at the top; neither is
    used by get_clip_score with numpy >= 1.21."""
    for name in ("generation_eval_utils", "sklearn", "sklearn.preprocessing"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["sklearn"].preprocessing = sys.modules["sklearn.preprocessing"]
    sys.modules["sklearn.preprocessing"].normalize = None       # only used with numpy < 1.21


def openai_to_hf(model, quick_gelu: bool, eos_token_id: int):
    """An OpenAI / open_clip CLIP's weights in a transformers CLIPModel (the project's key mapping)."""
    from transformers import CLIPConfig, CLIPModel

    from evaluators import hps

    state = hps.open_clip_to_transformers({k: v for k, v in model.state_dict().items()})
    head_width, hps.VISION_HEAD_WIDTH = hps.VISION_HEAD_WIDTH, 64        # OpenAI build_model: heads = width // 64
    try:
        config = hps.hps_config(state, types.SimpleNamespace(eos_token_id=eos_token_id, bos_token_id=49406, pad_token_id=1))
    finally:
        hps.VISION_HEAD_WIDTH = head_width
    if quick_gelu:
        config.vision_config.hidden_act = config.text_config.hidden_act = "quick_gelu"
    hf = CLIPModel(CLIPConfig(text_config=config.text_config.to_dict(), vision_config=config.vision_config.to_dict(),
                              projection_dim=config.projection_dim))
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
    return hf.eval()


def parity(repos: Path, hf_tok, layers: int, work: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    from evaluators import clip_colors, hps, preference
    from evaluators.base import Sample
    from harness import registry

    torch.manual_seed(0)
    tok_dir = work / "tokenizer"
    hf_tok.save_pretrained(tok_dir)
    images = [test_image(w, h) for w, h in ((512, 512), (512, 519), (256, 264), (640, 480), (301, 1597))]
    prompts = ["a photo of a cat", "“Curly” quotes &amp; a ﬁne ﬂower", "ＦＵＬＬ width ｔｅｘｔ", TEXTS[-1],
               "two dogs on a red sofa"]
    samples = [Sample(key=f"{i:05d}", metadata={"prompt": p}, image=a) for i, (p, a) in enumerate(zip(prompts, images))]
    os.environ["HPS_ROOT"] = str(work / "hps_root")
    sys.path.insert(0, str(repos / "tgxs002+HPSv2"))
    sys.path.insert(0, str(repos / "openai+CLIP"))
    sys.path.insert(0, str(repos / "jmhessel+clipscore"))

    def depth(n: int) -> int:
        return n if layers <= 0 else layers

    def report(name: str, ours, official) -> None:
        ours, official = np.asarray(ours, dtype=np.float64), np.asarray(official, dtype=np.float64)
        print(f"{name}: max |ours - official| = {np.abs(ours - official).max():.3g}  (official {np.round(official, 4)})")

    # HPS v2.1: the official img_score.score with the vendored open_clip ViT-H-14 (random weights) vs hpsv21
    from hpsv2 import img_score
    from hpsv2.src.open_clip import factory, image_transform

    cfg = json.loads(json.dumps(factory._MODEL_CONFIGS["ViT-H-14"]))
    cfg["vision_cfg"]["layers"], cfg["text_cfg"]["layers"] = depth(32), depth(24)
    factory._MODEL_CONFIGS["ViT-H-14-ref"] = cfg
    model = factory.create_model("ViT-H-14-ref", None, precision="fp32", device="cpu", output_dict=True).eval()
    img_score.model_dict["model"] = model
    img_score.model_dict["preprocess_val"] = image_transform(224, is_train=False, resize_longest_max=True)
    torch.save({"state_dict": model.state_dict()}, work / "hps.pt")
    official = [img_score.score(Image.fromarray(s.image), s.metadata["prompt"], cp=str(work / "hps.pt"))[0]
                for s in samples]
    os.environ.update({hps.CHECKPOINT_ENV: str(work / "hps.pt"), hps.TOKENIZER_ENV: str(tok_dir)})
    hps._LOADED.clear()
    ours = [r["score"] / 100 for r in registry.get("evaluators", "hpsv21").score(samples).values()]
    report("hpsv21 vs hpsv2.img_score.score (cos)", ours, official)
    hps._LOADED.clear()
    old_width, hps.VISION_HEAD_WIDTH = hps.VISION_HEAD_WIDTH, 64
    report("  old: 20 vision heads of 64", [r["score"] / 100 for r in registry.get("evaluators", "hpsv21").score(samples).values()], official)
    hps.VISION_HEAD_WIDTH = old_width
    hps._LOADED.clear()
    del model, img_score.model_dict["model"]

    # OpenAI CLIP ViT-L/14 and ViT-B/32 (clip/model.py CLIP, random init) as the HF ports the project reads
    import clip as openai_clip
    from clip.model import CLIP

    def openai_model(vision_width, vision_layers, patch, text_width, text_layers, embed):
        m = CLIP(embed, 224, depth(vision_layers), vision_width, patch, 77, 49408, text_width, text_width // 64,
                 depth(text_layers)).eval()
        return m

    l14 = openai_model(1024, 24, 14, 768, 12, 768)
    hf_l14 = openai_to_hf(l14, quick_gelu=True, eos_token_id=2)     # the HF hub config's legacy eos id: argmax pooling
    hf_l14.save_pretrained(work / "clip_l14")
    hf_tok.save_pretrained(work / "clip_l14")
    os.environ[preference.CLIP_L14_WEIGHTS.env] = str(work / "clip_l14")

    # torchmetrics' clip_score with the same model and a CLIPProcessor (PIL image backend) vs clipscore
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update

    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(), tokenizer=hf_tok)

    class Tensors(torch.nn.Module):
        """get_*_features as tensors: torchmetrics' main branch reads transformers 5's pooler_output, the 1.9.0
        release does not yet."""
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def get_image_features(self, *a, **k):
            return clip_colors.projected_features(self.inner.get_image_features(*a, **k))

        def get_text_features(self, *a, **k):
            return clip_colors.projected_features(self.inner.get_text_features(*a, **k))

    with torch.no_grad():
        official = [float(_clip_score_update([torch.from_numpy(s.image).permute(2, 0, 1)], [s.metadata["prompt"]],
                                             Tensors(hf_l14), processor)[0][0]) for s in samples]
    preference._LOADED.clear()
    report("clipscore vs torchmetrics _clip_score_update", [r["score"] for r in registry.get("evaluators", "clipscore").score(samples).values()], official)
    report("  clipscore-eot (= the old clipscore) vs torchmetrics", [r["score"] for r in registry.get("evaluators", "clipscore-eot").score(samples).values()], official)

    # the aesthetic predictor's recipe: clip.load preprocess, encode_image, normalise, MLP
    head = preference.AestheticHead(768).eval()
    torch.save(head.state_dict(), work / "aesthetic.pth")
    os.environ[preference.AESTHETIC_HEAD_ENV] = str(work / "aesthetic.pth")
    preprocess_l14 = openai_clip.clip._transform(224)
    with torch.no_grad():
        features = l14.encode_image(torch.stack([preprocess_l14(Image.fromarray(s.image)) for s in samples])).numpy()
        features = features / np.linalg.norm(features, axis=-1, keepdims=True)
        official = head(torch.from_numpy(features)).numpy()
    report("laion-aesthetic vs simple_inference.py recipe", [r["score"] for r in registry.get("evaluators", "laion-aesthetic").score(samples).values()], official)
    del l14, hf_l14

    # Hessel's CLIPScore: clipscore.py get_clip_score with clip.model (ViT-B/32) on image files vs clipscore-hessel
    _stub_hessel_imports()
    import clipscore

    b32 = openai_model(768, 12, 32, 512, 12, 512)
    openai_to_hf(b32, quick_gelu=True, eos_token_id=2).save_pretrained(work / "clip_b32")
    hf_tok.save_pretrained(work / "clip_b32")
    os.environ[preference.CLIP_B32_WEIGHTS.env] = str(work / "clip_b32")
    paths = []
    for s in samples:
        paths.append(str(work / f"{s.key}.png"))
        Image.fromarray(s.image).save(paths[-1])
    _, per, _ = clipscore.get_clip_score(b32, paths, [s.metadata["prompt"] for s in samples], "cpu")
    preference._LOADED.clear()
    report("clipscore-hessel vs clipscore.get_clip_score", [r["score"] for r in registry.get("evaluators", "clipscore-hessel").score(samples).values()], per)
    # random weights give cos < 0, clamped to 0 above: compare the cosines before the clamp too
    feats = [clipscore.extract_all_images(paths, b32, "cpu", num_workers=0),
             clipscore.extract_all_captions([s.metadata["prompt"] for s in samples], b32, "cpu", num_workers=0)]
    feats = [f / np.linalg.norm(f, axis=1, keepdims=True) for f in feats]
    official = (feats[0] * feats[1]).sum(1)
    clip_b32 = preference.clip_model(preference.CLIP_B32_WEIGHTS)
    report("  Hessel cos before the clamp", preference.cosines(clip_b32, samples, preference.HESSEL_PROTOCOL), official)
    old = preference.ClipProtocol(clip_colors.TORCHVISION, clean_text=False, prefix="A photo depicts ")
    report("  old: no OpenAI text cleaning", preference.cosines(clip_b32, samples, old), official)
    del b32

    # PickScore README: AutoProcessor (CLIPProcessor) + CLIPModel of CLIP-H shape, logit_scale.exp() * cos
    config = CLIPConfig(
        vision_config=dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=depth(32),
                           patch_size=14, image_size=224, hidden_act="gelu"),
        text_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=depth(24),
                         vocab_size=49408, max_position_embeddings=77, hidden_act="gelu", eos_token_id=2),
        projection_dim=1024)
    pick = CLIPModel(config).eval()
    with torch.no_grad():
        pick.logit_scale.fill_(4.6052)
    pick.save_pretrained(work / "pickscore")
    hf_tok.save_pretrained(work / "pickscore")
    os.environ[preference.PICKSCORE_WEIGHTS.env] = str(work / "pickscore")
    official = []
    for s in samples:
        with torch.no_grad():
            image_inputs = processor(images=[Image.fromarray(s.image)], padding=True, truncation=True, max_length=77,
                                     return_tensors="pt")
            text_inputs = processor(text=s.metadata["prompt"], padding=True, truncation=True, max_length=77,
                                    return_tensors="pt")
            image_embs = clip_colors.projected_features(pick.get_image_features(**image_inputs))
            text_embs = clip_colors.projected_features(pick.get_text_features(**text_inputs))
            image_embs = image_embs / image_embs.norm(dim=-1, keepdim=True)
            text_embs = text_embs / text_embs.norm(dim=-1, keepdim=True)
            official.append(float((pick.logit_scale.exp() * (text_embs @ image_embs.T))[0, 0]))
    preference._LOADED.clear()
    report("pickscore vs the PickScore README recipe", [r["score"] for r in registry.get("evaluators", "pickscore").score(samples).values()], official)
    clip_pick = preference.clip_model(preference.PICKSCORE_WEIGHTS)
    old = preference.ClipProtocol(clip_colors.TORCHVISION, clean_text=False)
    report("  old: torchvision's crop offset", clip_pick.model.logit_scale.exp().item() * preference.cosines(clip_pick, samples, old), official)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repos", type=Path, required=True, help="folder with tgxs002+HPSv2, openai+CLIP, jmhessel+clipscore")
    ap.add_argument("--out", type=Path, help="write the reference tables here (JSON)")
    ap.add_argument("--parity", action="store_true", help="also score with the official code on random weights")
    ap.add_argument("--layers", type=int, default=2, help="blocks per tower in --parity (0: the real depth)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    text_rows, hf = text_table(args.repos)
    pre_rows = preprocess_table(args.repos)
    compare_ours(text_rows, hf, pre_rows)
    if args.out:
        import open_clip
        import torchvision
        import transformers

        meta = {"made_by": "benchmarks/clip_references.py", "open_clip_torch": open_clip.__version__,
                "torchvision": torchvision.__version__, "transformers": transformers.__version__,
                "pillow": Image.__version__, "ftfy": __import__("ftfy").__version__,
                "image": "numpy default_rng(width * 100003 + height).integers(0, 256, (h, w, 3), uint8)",
                "probes": "default_rng(1234): 48 x (channel, y, x)"}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "text": text_rows, "preprocess": pre_rows}, indent=1,
                                       ensure_ascii=False) + "\n")
        print("wrote", args.out)
    if args.parity:
        with tempfile.TemporaryDirectory() as work:
            parity(args.repos, hf, args.layers, Path(work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
