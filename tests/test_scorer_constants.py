"""The official architecture and protocol constants of the CLIP-family scorers, as a table read from the official
code and configs (each row names its source), checked against what the project builds or uses. Full-size models
are built on the meta device, so no weights and no time are needed.

Sources (public GitHub):
  OC   mlfoundations/open_clip       src/open_clip/model_configs/<name>.json, src/open_clip/tokenizer.py
  HPS  tgxs002/HPSv2                 hpsv2/img_score.py, hpsv2/src/open_clip/{model_configs/ViT-H-14.json,
                                     transform.py (ResizeMaxSize), tokenizer.py, constants.py}
  OA   openai/CLIP                   clip/model.py (build_model: heads = width // 64, QuickGELU), clip/clip.py
                                     (_transform, tokenize(truncate=True)), clip/simple_tokenizer.py
  PS   yuvalkirstain/PickScore       README.md (inference recipe)
  TM   Lightning-AI/torchmetrics     src/torchmetrics/functional/multimodal/clip_score.py, multimodal/clip_score.py
  JH   jmhessel/clipscore            clipscore.py
  GE   djghosh13/geneval             evaluation/evaluate_images.py
  AP   christophschuhmann/improved-aesthetic-predictor  simple_inference.py
  IR   THUDM/ImageReward             ImageReward/ImageReward.py
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluators import clip_colors, hps, imagereward, preference
from evaluators.coco_prompts import COLORS

REFERENCE = json.loads((Path(__file__).parent / "data" / "clip_reference.json").read_text())

# --- architectures ------------------------------------------------------------------------------------------------
# (vision width, layers, heads, head width, patch, image size, mlp), (text width, layers, heads, context, vocab,
# mlp), embed dim, activation
ARCHITECTURES = {
    # OC ViT-H-14.json == HPS hpsv2/src/open_clip/model_configs/ViT-H-14.json: vision width 1280, layers 32,
    # head_width 80 (16 heads), patch 14, image 224, mlp_ratio 4 (CLIPVisionCfg default); text width 1024, heads 16,
    # layers 24, context 77, vocab 49408; embed_dim 1024; GELU (HPS img_score.py: force_quick_gelu=False)
    "hpsv21": dict(vision=(1280, 32, 16, 80, 14, 224, 5120), text=(1024, 24, 16, 77, 49408, 4096), embed=1024, act="gelu"),
    # PickScore_v1 is CLIP-H (PS README: processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K), the OC ViT-H-14 shape
    "pickscore": dict(vision=(1280, 32, 16, 80, 14, 224, 5120), text=(1024, 24, 16, 77, 49408, 4096), embed=1024, act="gelu"),
    # OA build_model for ViT-L/14 (== OC ViT-L-14.json): vision width 1024, 24 layers, 1024 // 64 = 16 heads, patch
    # 14; text width 768, 12 heads, 12 layers; embed 768; QuickGELU. TM default model, AP clip.load("ViT-L/14"),
    # GE open_clip "ViT-L-14" pretrained="openai"
    "clip-l14": dict(vision=(1024, 24, 16, 64, 14, 224, 4096), text=(768, 12, 12, 77, 49408, 3072), embed=768, act="quick_gelu"),
    # OA ViT-B/32 (== OC ViT-B-32.json): vision 768, 12 layers, 12 heads, patch 32; text 512, 8 heads, 12 layers;
    # embed 512 (JH clip.load("ViT-B/32"))
    "clip-b32": dict(vision=(768, 12, 12, 64, 32, 224, 3072), text=(512, 12, 8, 77, 49408, 2048), embed=512, act="quick_gelu"),
}


def open_clip_meta_state(arch: dict) -> dict[str, torch.Tensor]:
    """An open_clip CLIP state dict of the given shape, as meta tensors (open_clip's names and layouts)."""
    (vw, vl, _, _, patch, size, vmlp), (tw, tl, _, ctx, vocab, tmlp), embed = arch["vision"], arch["text"], arch["embed"]
    m = lambda *shape: torch.empty(*shape, device="meta")
    state = {"visual.conv1.weight": m(vw, 3, patch, patch), "visual.class_embedding": m(vw),
             "visual.positional_embedding": m((size // patch) ** 2 + 1, vw), "visual.proj": m(vw, embed),
             "token_embedding.weight": m(vocab, tw), "positional_embedding": m(ctx, tw), "text_projection": m(tw, embed),
             "logit_scale": m(()), "attn_mask": m(ctx, ctx)}
    for name, w in (("visual.ln_pre", vw), ("visual.ln_post", vw), ("ln_final", tw)):
        state.update({f"{name}.weight": m(w), f"{name}.bias": m(w)})
    for prefix, w, layers, mlp in (("visual.transformer", vw, vl, vmlp), ("transformer", tw, tl, tmlp)):
        for i in range(layers):
            p = f"{prefix}.resblocks.{i}."
            state.update({p + "ln_1.weight": m(w), p + "ln_1.bias": m(w), p + "ln_2.weight": m(w), p + "ln_2.bias": m(w),
                          p + "attn.in_proj_weight": m(3 * w, w), p + "attn.in_proj_bias": m(3 * w),
                          p + "attn.out_proj.weight": m(w, w), p + "attn.out_proj.bias": m(w),
                          p + "mlp.c_fc.weight": m(mlp, w), p + "mlp.c_fc.bias": m(mlp),
                          p + "mlp.c_proj.weight": m(w, mlp), p + "mlp.c_proj.bias": m(w)})
    return state


class _Ids:   # the real CLIP vocabulary's special ids (see SPECIAL_IDS)
    bos_token_id, eos_token_id, pad_token_id = 49406, 49407, 49407


def check_architecture(config, arch: dict) -> None:
    v, t = config.vision_config, config.text_config
    vw, vl, vh, vhw, patch, size, vmlp = arch["vision"]
    tw, tl, th, ctx, vocab, tmlp = arch["text"]
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.hidden_size // v.num_attention_heads,
            v.patch_size, v.image_size, v.intermediate_size) == (vw, vl, vh, vhw, patch, size, vmlp)
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.max_position_embeddings, t.vocab_size,
            t.intermediate_size) == (tw, tl, th, ctx, vocab, tmlp)
    assert config.projection_dim == arch["embed"]


def test_hps_builds_open_clips_vit_h_14_from_a_checkpoint_of_that_shape():
    """hps.hps_config on an HPS-shaped checkpoint (meta tensors): 16 vision heads of 80, not 1280 // 64 = 20."""
    from transformers import CLIPModel

    arch = ARCHITECTURES["hpsv21"]
    state = hps.open_clip_to_transformers(open_clip_meta_state(arch))
    config = hps.hps_config(state, _Ids())
    check_architecture(config, arch)
    assert config.vision_config.hidden_act == config.text_config.hidden_act == arch["act"]
    assert config.text_config.eos_token_id == 49407           # pool at the end-of-text token
    with torch.device("meta"):
        model = CLIPModel(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    attention = model.vision_model.encoder.layers[0].self_attn
    assert (attention.num_heads, attention.head_dim) == (16, 80)
    assert model.text_model.encoder.layers[0].self_attn.head_dim == 64


@pytest.mark.parametrize("name", ["pickscore", "clip-l14", "clip-b32"])
def test_hf_ported_scorers_at_their_official_shape(name):
    """PickScore / CLIPScore / Hessel / aesthetic / GenEval read transformers' config.json of their HF ports; the
    project uses its image size and context length: at the official shape those are 224 and 77."""
    from transformers import CLIPConfig, CLIPModel

    arch = ARCHITECTURES[name]
    (vw, vl, vh, _, patch, size, vmlp), (tw, tl, th, ctx, vocab, tmlp) = arch["vision"], arch["text"]
    config = CLIPConfig(
        vision_config=dict(hidden_size=vw, num_hidden_layers=vl, num_attention_heads=vh, patch_size=patch,
                           image_size=size, intermediate_size=vmlp, hidden_act=arch["act"]),
        text_config=dict(hidden_size=tw, num_hidden_layers=tl, num_attention_heads=th, max_position_embeddings=ctx,
                         vocab_size=vocab, intermediate_size=tmlp, hidden_act=arch["act"]),
        projection_dim=arch["embed"])
    with torch.device("meta"):
        model = CLIPModel(config)
    check_architecture(model.config, arch)
    clf = clip_colors.ColorClassifier(model=model, tokenizer=None)
    assert clf.image_size == 224 and model.config.text_config.max_position_embeddings == clip_colors.CONTEXT_LENGTH
    assert model.vision_model.embeddings.position_embedding.weight.shape[0] == (224 // patch) ** 2 + 1


# --- preprocessing and protocol -----------------------------------------------------------------------------------

def test_normalisation_constants():
    # OA clip.py _transform / HPS constants.py OPENAI_DATASET_MEAN / STD / JH / IR: the OpenAI CLIP statistics
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    assert clip_colors.OPENAI_MEAN == mean and clip_colors.OPENAI_STD == std
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD    # CLIPImageProcessor's defaults
    assert tuple(OPENAI_CLIP_MEAN) == mean and tuple(OPENAI_CLIP_STD) == std


# (scorer, protocol, image rule, OpenAI text cleaning, truncation, prefix, fp16 on CUDA)
PROTOCOLS = [
    # PS README: processor(images=...), processor(text=..., padding=True, truncation=True, max_length=77); HF
    # tokenizer only (no ftfy / html); float32
    ("pickscore", preference.PICKSCORE_PROTOCOL, clip_colors.HF_PROCESSOR, False, "eot", "", False),
    # TM _get_features: processor(text=data, padding=True), then input_ids[..., :max_position_embeddings]
    ("clipscore", preference.CLIPSCORE_PROTOCOL, clip_colors.HF_PROCESSOR, False, "slice", "", False),
    ("clipscore-eot", preference.CLIPSCORE_EOT_PROTOCOL, clip_colors.HF_PROCESSOR, False, "eot", "", False),
    # JH CLIPCapDataset: prefix 'A photo depicts' (+ ' ' when missing), clip.tokenize(truncate=True) (OA cleaning,
    # eot kept); CLIPImageDataset: Resize(224, BICUBIC), CenterCrop(224); images fp16 on CUDA
    ("clipscore-hessel", preference.HESSEL_PROTOCOL, clip_colors.TORCHVISION, True, "eot", "A photo depicts ", True),
    # AP: clip.load("ViT-L/14") preprocess, on CUDA an fp16 model
    ("laion-aesthetic", preference.AESTHETIC_PROTOCOL, clip_colors.TORCHVISION, False, "eot", "", True),
]


@pytest.mark.parametrize("row", PROTOCOLS, ids=lambda r: r[0])
def test_protocols(row):
    _, protocol, rule, clean, truncation, prefix, fp16 = row
    assert (protocol.image_rule, protocol.clean_text, protocol.truncation, protocol.prefix, protocol.fp16_on_cuda) == \
        (rule, clean, truncation, prefix, fp16)


def test_resize_and_crop_rules():
    # torchvision functional._compute_resized_output_size: long side int(size * long / short); CenterCrop:
    # int(round((h - size) / 2.0)). transformers image_transforms.get_resize_output_image_size: the same int();
    # center_crop: (h - size) // 2
    assert clip_colors.resized_size(300, 1000, 224) == (224, int(224 * 1000 / 300)) == (224, 746)
    assert clip_colors.resized_size(1000, 300, 224) == (746, 224)
    assert [clip_colors.crop_offset(s, 224) for s in (224, 225, 226, 227, 229, 231)] == [0, 0, 1, 2, 2, 4]
    assert [clip_colors.crop_offset(s, 224, clip_colors.HF_PROCESSOR) for s in (224, 225, 226, 227, 229, 231)] == [0, 0, 1, 1, 2, 3]
    # HPS transform.py ResizeMaxSize: longest side to 224, new side round(side * scale), pad [w//2, h//2, rest], 0
    pixels = hps.preprocess(np.full((100, 300, 3), 255, dtype=np.uint8))
    black = -torch.tensor(clip_colors.OPENAI_MEAN) / torch.tensor(clip_colors.OPENAI_STD)
    rows = (pixels[0] != black[0]).any(dim=1).nonzero().flatten()
    new_h = round(100 * 224 / 300)                          # 75
    assert (int(rows[0]), int(rows[-1]) + 1) == ((224 - new_h) // 2, (224 - new_h) // 2 + new_h)


def test_geneval_colour_protocol():
    # GE evaluate_images.py: COLORS, the three templates, bgcolor "#999", crop box[:4]; clip_benchmark
    # zeroshot_classification run_classification: logits = 100. * image_features @ classifier
    assert list(COLORS) == ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
    assert clip_colors.COLOR_TEMPLATES == ("a photo of a {c} {classname}", "a photo of a {c}-colored {classname}",
                                           "a photo of a {c} object")
    assert clip_colors.BACKGROUND_RGB == (0x99, 0x99, 0x99) and clip_colors.LOGIT_SCALE == 100.0


def test_aesthetic_and_imagereward_heads():
    # AP / IR MLP: Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1),
    # Linear(64, 16), Linear(16, 1); IR: mean 0.16717362830052426, std 1.0333394966054072, BERT max_length=35, 224 px
    layers = preference.AestheticHead(768).layers
    assert [(l.in_features, l.out_features) for l in layers if isinstance(l, torch.nn.Linear)] == \
        [(768, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    assert [l.p for l in layers if isinstance(l, torch.nn.Dropout)] == [0.2, 0.2, 0.1]
    assert (imagereward.MEAN, imagereward.STD) == (0.16717362830052426, 1.0333394966054072)
    assert imagereward.MAX_TEXT_TOKENS == 35 and imagereward.IMAGE_SIZE == 224


# --- text ---------------------------------------------------------------------------------------------------------

# OA / OC SimpleTokenizer: '<|startoftext|>' and '<|endoftext|>' after the 49152 - 256 - 2 merges and 512 byte
# symbols: 49406 and 49407; vocabulary 49408; tokenize() pads with 0 and, when truncating, sets the last of the 77
# ids to the end-of-text token
SPECIAL_IDS = {"sot": 49406, "eot": 49407, "vocab": 49408, "pad": 0, "context": 77}


def test_official_token_ids_in_the_reference_table():
    for row in REFERENCE["text"]:
        for key in ("open_clip_ids", "openai_ids"):
            ids = row[key]
            assert ids[0] == SPECIAL_IDS["sot"] and ids[-1] == SPECIAL_IDS["eot"] and len(ids) <= SPECIAL_IDS["context"]
            assert max(ids) < SPECIAL_IDS["vocab"]
    assert len(REFERENCE["text"][-1]["open_clip_ids"]) == 77           # the DPG-length prompt, truncated keeping eot


@pytest.mark.parametrize("row", REFERENCE["text"], ids=lambda r: repr(r["text"][:24]))
def test_openai_clean_is_the_official_cleaning(row):
    """open_clip's whitespace_clean(basic_clean(t)).lower() and OpenAI CLIP's, as run by
    benchmarks/clip_references.py (ftfy 6.3.1)."""
    assert row["open_clip_clean"] == row["openai_clean"]
    assert clip_colors.openai_clean(row["text"]) == row["open_clip_clean"]


def _real_vocab_tokenizer():
    """transformers' CLIPTokenizer over the real CLIP vocabulary, where one is here: $HARNESS_CLIP_DIR or
    open_clip's bundled bpe_simple_vocab_16e6.txt.gz."""
    import importlib.util
    import os
    import tempfile

    from transformers import CLIPTokenizer

    folder = os.environ.get(clip_colors.CLIP_DIR_ENV)
    if folder and (Path(folder) / "vocab.json").is_file():
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("no real CLIP vocabulary here ($HARNESS_CLIP_DIR unset, open_clip not installed)")
    from open_clip import tokenizer as oc_tok
    spec = importlib.util.spec_from_file_location("clip_references", Path(__file__).parent.parent / "benchmarks" / "clip_references.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.hf_tokenizer_from_bpe(Path(oc_tok.default_bpe()), Path(tempfile.mkdtemp()) / "bpe")


def test_token_ids_match_open_clip_with_the_real_vocabulary():
    tokenizer = _real_vocab_tokenizer()
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, len(tokenizer)) == (SPECIAL_IDS["sot"], SPECIAL_IDS["eot"], SPECIAL_IDS["vocab"])
    for row in REFERENCE["text"]:
        ours = clip_colors.tokenize(tokenizer, [row["text"]], clean=True, truncation="eot", padding=False)
        assert ours["input_ids"][0].tolist() == row["open_clip_ids"], row["text"]


# --- score scales -------------------------------------------------------------------------------------------------

def test_score_scales(tiny_clip_dir, tmp_path, monkeypatch):
    """PS: logit_scale.exp() * cos; TM: 100 * cos, metric max(mean, 0); JH: 2.5 * max(cos, 0) per image, mean;
    HPS img_score.py: cos of the normalised features (the project reports 100 x, the benchmark tables' scale)."""
    from evaluators.base import Sample
    from harness import registry

    for w in (preference.PICKSCORE_WEIGHTS, preference.CLIP_L14_WEIGHTS, preference.CLIP_B32_WEIGHTS):
        monkeypatch.setenv(w.env, str(tiny_clip_dir))
    monkeypatch.setattr(preference, "_LOADED", {})
    rng = np.random.default_rng(0)
    items = [Sample(key=f"{i}", metadata={"prompt": p}, image=rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
             for i, p in enumerate(["a red photo", "a dog", "three apples"])]
    clip = clip_colors.load_clip(tiny_clip_dir)
    hf = preference.cosines(clip, items, preference.CLIPSCORE_EOT_PROTOCOL)
    score = lambda name: np.array([r["score"] for r in registry.get("evaluators", name).score(items).values()])
    assert np.allclose(score("clipscore"), 100 * hf.numpy(), atol=1e-4)
    assert np.allclose(score("pickscore"), clip.model.logit_scale.exp().item() * hf.numpy(), atol=1e-4)
    hessel = preference.cosines(clip, items, preference.HESSEL_PROTOCOL).numpy()
    assert np.allclose(score("clipscore-hessel"), 2.5 * np.maximum(hessel, 0), atol=1e-5)
    metric = registry.get("evaluators", "clipscore").aggregate([{"score": -5.0}, {"score": 1.0}])[0]
    assert metric.value == 0.0 and metric.name == "clipscore"
    assert registry.get("evaluators", "clipscore-eot").aggregate([{"score": 3.0}])[0].name == "clipscore_eot"
