"""The CLIP-family scorers against the official code itself, on shared random weights. Needs open_clip_torch and
torchmetrics, which the project's venv does not have (open_clip imports torchvision): skipped there, run in the
reference venv of benchmarks/clip_references.py:

    PYTHONPATH=. /tmp/refvenv/bin/python -m pytest -q -p no:cacheprovider tests/test_official_clip_parity.py
"""
from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluators import clip_colors, hps, preference
from evaluators.base import Sample
from harness import registry

PROMPTS = ["a photo of a cat", "“Curly” quotes &amp; a ﬁne ﬂower", "ＦＵＬＬ width ｔｅｘｔ",
           "a long prompt: " + ", ".join(f"object number {i} in a red box" for i in range(14))]
SIZES = [(64, 64), (53, 48), (40, 90)]


def _samples() -> list[Sample]:
    rng = np.random.default_rng(0)
    return [Sample(key=f"{i:05d}/0000", metadata={"tag": "dense", "prompt": p},
                   image=rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            for i, (p, (w, h)) in enumerate(zip(PROMPTS, SIZES * 2))]


@pytest.fixture(scope="module")
def real_vocab_dir():
    """transformers' CLIPTokenizer over open_clip's bundled bpe_simple_vocab_16e6, saved as a folder."""
    oc_tok = pytest.importorskip("open_clip.tokenizer", reason="open_clip is not installed (reference venv only)")
    spec = importlib.util.spec_from_file_location("clip_references", Path(__file__).parent.parent / "benchmarks" / "clip_references.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    folder = Path(tempfile.mkdtemp()) / "bpe"
    module.hf_tokenizer_from_bpe(Path(oc_tok.default_bpe()), folder)
    return folder


def test_hpsv21_matches_open_clip_on_shared_random_weights(real_vocab_dir, tmp_path, monkeypatch):
    """open_clip's CLIP (ViT-H-14's head widths: vision 80, text 64; two blocks per tower, the real vocabulary)
    with open_clip's own tokenizer and encode_image / encode_text, against hpsv21 on the same checkpoint."""
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIP

    torch.manual_seed(0)
    model = CLIP(embed_dim=64, vision_cfg=dict(image_size=224, layers=2, width=320, head_width=80, patch_size=14),
                 text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))       # off the init's structure (e.g. zero biases)
    torch.save({"state_dict": model.state_dict()}, tmp_path / hps.CHECKPOINT_NAME)
    monkeypatch.setenv(hps.CHECKPOINT_ENV, str(tmp_path / hps.CHECKPOINT_NAME))
    monkeypatch.setenv(hps.TOKENIZER_ENV, str(real_vocab_dir))
    monkeypatch.setattr(hps, "_LOADED", {})
    items = _samples()
    tokenizer = open_clip.get_tokenizer("ViT-H-14")
    with torch.no_grad():
        image = model.encode_image(torch.stack([hps.preprocess(s.image) for s in items]), normalize=True)
        text = model.encode_text(tokenizer([s.metadata["prompt"] for s in items]), normalize=True)
    official = (image * text).sum(-1).numpy()
    got = np.array([r["score"] for r in registry.get("evaluators", "hpsv21").score(items).values()]) / 100
    assert np.allclose(got, official, atol=1e-5)


def test_clipscore_is_torchmetrics_and_pickscore_the_readme_recipe(real_vocab_dir, tmp_path, monkeypatch):
    """torchmetrics' _clip_score_update (images as uint8 tensors, a CLIPProcessor with the PIL image processor)
    against clipscore on the same model, a prompt over 77 tokens included; PickScore's README recipe against
    pickscore."""
    pytest.importorskip("torchmetrics")
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(0)
    config = CLIPConfig(vision_config=dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2,
                                           patch_size=14, image_size=224),
                        text_config=dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2,
                                         vocab_size=49408, max_position_embeddings=77, eos_token_id=2),
                        projection_dim=32)
    model = CLIPModel(config).eval()
    model.save_pretrained(tmp_path / "clip")
    tokenizer = CLIPTokenizer.from_pretrained(real_vocab_dir)
    tokenizer.save_pretrained(tmp_path / "clip")
    for w in (preference.CLIP_L14_WEIGHTS, preference.PICKSCORE_WEIGHTS):
        monkeypatch.setenv(w.env, str(tmp_path / "clip"))
    monkeypatch.setattr(preference, "_LOADED", {})
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(), tokenizer=tokenizer)

    class Tensors(torch.nn.Module):
        """get_*_features as tensors: torchmetrics' main branch reads pooler_output of transformers 5's outputs,
        the 1.9.0 release on PyPI does not yet."""
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def get_image_features(self, *args, **kwargs):
            return clip_colors.projected_features(self.inner.get_image_features(*args, **kwargs))

        def get_text_features(self, *args, **kwargs):
            return clip_colors.projected_features(self.inner.get_text_features(*args, **kwargs))

    items = _samples()
    assert len(tokenizer(items[-1].metadata["prompt"])["input_ids"]) > 77
    with torch.no_grad():
        official = np.array([float(_clip_score_update([torch.from_numpy(s.image).permute(2, 0, 1)], [s.metadata["prompt"]],
                                                      Tensors(model), processor)[0][0]) for s in items])
    got = np.array([r["score"] for r in registry.get("evaluators", "clipscore").score(items).values()])
    assert np.allclose(got, official, atol=1e-4)
    eot = np.array([r["score"] for r in registry.get("evaluators", "clipscore-eot").score(items).values()])
    assert np.allclose(eot[:-1], official[:-1], atol=1e-4) and abs(eot[-1] - official[-1]) > 1e-3

    from PIL import Image
    readme = []
    with torch.no_grad():
        for s in items:
            image_inputs = processor(images=[Image.fromarray(s.image)], padding=True, truncation=True, max_length=77,
                                     return_tensors="pt")
            text_inputs = processor(text=s.metadata["prompt"], padding=True, truncation=True, max_length=77,
                                    return_tensors="pt")
            image_embs = clip_colors.projected_features(model.get_image_features(**image_inputs))
            text_embs = clip_colors.projected_features(model.get_text_features(**text_inputs))
            image_embs = image_embs / image_embs.norm(dim=-1, keepdim=True)
            text_embs = text_embs / text_embs.norm(dim=-1, keepdim=True)
            readme.append(float(model.logit_scale.exp() * (text_embs @ image_embs.T)[0, 0]))
    got = np.array([r["score"] for r in registry.get("evaluators", "pickscore").score(items).values()])
    assert np.allclose(got, readme, atol=1e-4)
