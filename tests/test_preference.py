"""The CLIP-family preference scorers (evaluators/preference.py) on a tiny random CLIP (tests/conftest.py): each
score against an independent computation through transformers' own CLIPModel forward, the official
aggregation rules, the aesthetic head's official key names, and clear errors for missing weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluators import clip_colors, preference
from evaluators.base import Sample
from harness import registry


@pytest.fixture()
def weights_env(tiny_clip_dir, tmp_path, monkeypatch):
    """Every scorer pointed at the tiny CLIP, plus a random aesthetic head in the official layout."""
    for w in (preference.PICKSCORE_WEIGHTS, preference.CLIP_L14_WEIGHTS, preference.CLIP_B32_WEIGHTS):
        monkeypatch.setenv(w.env, str(tiny_clip_dir))
    torch.manual_seed(1)
    dim = clip_colors.load_clip(tiny_clip_dir).model.config.projection_dim
    head = preference.AestheticHead(dim)
    torch.save(head.state_dict(), tmp_path / preference.AESTHETIC_HEAD_NAME)
    monkeypatch.setenv(preference.AESTHETIC_HEAD_ENV, str(tmp_path / preference.AESTHETIC_HEAD_NAME))
    monkeypatch.setattr(preference, "_LOADED", {})
    return head


def samples(n: int = 3) -> list[Sample]:
    """The first image is 53 x 48: resized to 35 x 32 for the tiny 32 px CLIP, where torchvision's crop offset
    (round(1.5) = 2) and the HF processor's (3 // 2 = 1) differ."""
    rng = np.random.default_rng(0)
    prompts = ["a red photo", "a dog and a cat", "three green apples", "a photo of a red car"]
    return [Sample(key=f"{i:05d}/0000", metadata={"tag": "dense", "prompt": prompts[i % len(prompts)]},
                   image=rng.integers(0, 256, ((53, 40, 48, 56)[i % 4], 48, 3), dtype=np.uint8)) for i in range(n)]


def reference_logits(folder, texts: list[str], items: list[Sample], rule: str = clip_colors.HF_PROCESSOR,
                     slice_at: int | None = None) -> tuple[torch.Tensor, float]:
    """logit_scale.exp() * cos for matching (text, image) pairs, from CLIPModel.forward; slice_at: the ids cut as
    torchmetrics does (tokenised whole, then [..., :slice_at])."""
    clip = clip_colors.load_clip(folder)
    if slice_at is None:
        tokens = clip.tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    else:
        tokens = clip.tokenizer(texts, padding=True, return_tensors="pt")
        tokens = {k: tokens[k][..., :slice_at] for k in ("input_ids", "attention_mask")}
    pixels = torch.stack([clip_colors.preprocess(p, clip.image_size, rule) for p in preference._pictures(items)])
    with torch.no_grad():
        out = clip.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
    return out.logits_per_image.diagonal(), clip.model.logit_scale.exp().item()


def test_pickscore_and_clipscore_match_clip_forward(weights_env, tiny_clip_dir):
    items = samples(3)
    logits, scale = reference_logits(tiny_clip_dir, [s.metadata["prompt"] for s in items], items)
    pick = registry.get("evaluators", "pickscore").evaluate(items)
    got = [pick.records[s.key]["score"] for s in items]
    assert np.allclose(got, logits.numpy(), atol=1e-4)
    assert pick.metrics[0].name == "pickscore" and pick.metrics[0].value == pytest.approx(np.mean(got))
    clip = registry.get("evaluators", "clipscore").evaluate(items)
    assert np.allclose([clip.records[s.key]["score"] for s in items], 100 * logits.numpy() / scale, atol=1e-3)


def test_clipscore_hessel_uses_the_caption_prefix_and_clamps_each_image(weights_env, tiny_clip_dir):
    items = samples(4)
    texts = ["A photo depicts " + s.metadata["prompt"] for s in items]
    logits, scale = reference_logits(tiny_clip_dir, [clip_colors.openai_clean(t) for t in texts], items,
                                     rule=clip_colors.TORCHVISION)
    cos = logits.numpy() / scale
    records = registry.get("evaluators", "clipscore-hessel").score(items)
    assert np.allclose([records[s.key]["score"] for s in items], 2.5 * np.maximum(cos, 0), atol=1e-4)
    plain, _ = reference_logits(tiny_clip_dir, [s.metadata["prompt"] for s in items], items, rule=clip_colors.TORCHVISION)
    assert not np.allclose(plain.numpy() / scale, cos, atol=1e-4)      # the prefix reaches the text encoder


# "ｒｅｄ" (full width) and "ﬁ" (ligature) are what ftfy's fix_text changes: the tiny vocabulary has only a-z, so
# without the cleaning they become unknown tokens
MESSY, CLEAN = "A ｒｅｄ ﬁsh  photo", "a red fish photo"


def _one(prompt: str, image: np.ndarray) -> list[Sample]:
    return [Sample(key="00000/0000", metadata={"tag": "dense", "prompt": prompt}, image=image)]


def test_hessel_cleans_the_text_as_clip_tokenize_and_pickscore_clipscore_do_not(weights_env, tiny_clip_dir):
    image = samples(1)[0].image
    score = lambda name, prompt: registry.get("evaluators", name).score(_one(prompt, image))["00000/0000"]["score"]
    assert clip_colors.openai_clean(MESSY) == CLEAN
    assert score("clipscore-hessel", MESSY) == pytest.approx(score("clipscore-hessel", CLEAN), abs=1e-6)
    for name in ("pickscore", "clipscore", "clipscore-eot"):      # the plain HF tokenizer, as PickScore / torchmetrics
        logits, scale = reference_logits(tiny_clip_dir, [MESSY], _one(MESSY, image))
        factor = scale if name == "pickscore" else 100.0
        assert score(name, MESSY) == pytest.approx(float(logits[0]) / scale * factor, abs=1e-4)
        assert abs(score(name, MESSY) - score(name, CLEAN)) > 1e-3


LONG = "a red photo of " + " ".join(["red"] * 90)          # 94 tokens + BOS / EOS with the tiny vocabulary


def test_clipscore_cuts_long_prompts_as_torchmetrics_and_clipscore_eot_keeps_the_end_token(weights_env, tiny_clip_dir):
    """torchmetrics clip_score.py _get_features: the processor tokenises without truncation and the ids are cut to
    max_position_embeddings, so a long prompt loses its end-of-text token and the text tower pools elsewhere."""
    clip = clip_colors.load_clip(tiny_clip_dir)
    ids = clip.tokenizer([LONG])["input_ids"][0]
    assert len(ids) > 77 and ids[76] != clip.tokenizer.eos_token_id
    items = _one(LONG, samples(1)[0].image)
    sliced, scale = reference_logits(tiny_clip_dir, [LONG], items, slice_at=77)
    kept, _ = reference_logits(tiny_clip_dir, [LONG], items)
    parity = registry.get("evaluators", "clipscore").score(items)["00000/0000"]["score"]
    corrected = registry.get("evaluators", "clipscore-eot").score(items)["00000/0000"]["score"]
    assert parity == pytest.approx(100 * float(sliced[0]) / scale, abs=1e-4)
    assert corrected == pytest.approx(100 * float(kept[0]) / scale, abs=1e-4)
    assert abs(parity - corrected) > 1e-2
    short = samples(2)
    same = [registry.get("evaluators", n).score(short) for n in ("clipscore", "clipscore-eot")]
    assert all(same[0][k]["score"] == pytest.approx(same[1][k]["score"], abs=1e-6) for k in same[0])


def test_the_clipscore_labels_say_which_variant():
    parity, corrected = registry.get("evaluators", "clipscore"), registry.get("evaluators", "clipscore-eot")
    assert "torchmetrics" in parity.description and "77" in parity.description
    assert "end-of-text" in corrected.description
    assert corrected.aggregate([{"score": 3.0}])[0].name == "clipscore_eot" != parity.aggregate([{"score": 3.0}])[0].name
    from leaderboards.leaderboard import QUALITY_HEADERS      # the column headers say the variant too
    assert "torchmetrics" in QUALITY_HEADERS["clipscore"] and "EOT" in QUALITY_HEADERS["clipscore_eot"]


def test_clipscore_metrics_clamp_where_their_references_do():
    """torchmetrics clamps the mean at 0; Hessel clamps each image (so the mean of records stays as is)."""
    aggregate = registry.get("evaluators", "clipscore").aggregate
    assert aggregate([{"score": -10.0}, {"score": 30.0}])[0].value == 10.0
    assert aggregate([{"score": -10.0}, {"score": 4.0}])[0].value == 0.0
    hessel = registry.get("evaluators", "clipscore-hessel").aggregate([{"score": 0.0}, {"score": 0.5}])[0]
    assert hessel.name == "clipscore_hessel" and hessel.value == 0.25
    with pytest.raises(ValueError, match="no records"):
        aggregate([])


def test_aesthetic_is_the_official_mlp_on_the_normalised_image_embedding(weights_env, tiny_clip_dir):
    head = weights_env
    assert sorted(head.state_dict()) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    items = samples(3)
    clip = clip_colors.load_clip(tiny_clip_dir)
    with torch.no_grad():
        pixels = torch.stack([clip_colors.preprocess(p, clip.image_size) for p in preference._pictures(items)])
        features = clip_colors.projected_features(clip.model.get_image_features(pixel_values=pixels))
        x = features / features.norm(dim=-1, keepdim=True)
        for layer in (head.layers[0], head.layers[2], head.layers[4], head.layers[6], head.layers[7]):
            x = layer(x)          # no activations between the layers; dropout is off in eval
    records = registry.get("evaluators", "laion-aesthetic").score(items)
    assert np.allclose([records[s.key]["score"] for s in items], x.squeeze(-1).numpy(), atol=1e-5)


def test_aesthetic_head_with_other_keys_or_width_is_refused(tiny_clip_dir, tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(1, 768)}, bad)
    with pytest.raises(ValueError, match="not the LAION aesthetic predictor"):
        preference.load_aesthetic_head(bad, 768)
    torch.save(preference.AestheticHead(768).state_dict(), bad)
    with pytest.raises(ValueError, match="takes 768-dim embeddings but the CLIP model gives 16"):
        preference.load_aesthetic_head(bad, 16)


def test_missing_weights_fail_before_scoring_and_name_what_to_get(tiny_clip_dir, tmp_path, monkeypatch):
    from trainers.rewards import build_reward

    for name in ("pickscore", "clipscore", "clipscore-hessel", "laion-aesthetic"):
        for w in (preference.PICKSCORE_WEIGHTS, preference.CLIP_L14_WEIGHTS, preference.CLIP_B32_WEIGHTS):
            monkeypatch.delenv(w.env, raising=False)
        evaluator = registry.get("evaluators", name)
        assert evaluator.reward_field == "score"
        with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
            evaluator.check_ready()
        with pytest.raises(FileNotFoundError):
            build_reward({name: 1.0})
    monkeypatch.setenv(preference.CLIP_L14_WEIGHTS.env, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="lacks config.json"):
        registry.get("evaluators", "clipscore").check_ready()
    monkeypatch.setenv(preference.CLIP_L14_WEIGHTS.env, str(tiny_clip_dir))
    monkeypatch.delenv(preference.AESTHETIC_HEAD_ENV, raising=False)
    registry.get("evaluators", "clipscore").check_ready()
    with pytest.raises(FileNotFoundError, match="sac\\+logos\\+ava1-l14-linearMSE.pth"):
        registry.get("evaluators", "laion-aesthetic").check_ready()


def test_pickscore_without_a_tokenizer_takes_the_named_one(tiny_clip_dir, tmp_path, monkeypatch):
    weights_only = tmp_path / "pickscore"
    clip_colors.load_clip(tiny_clip_dir).model.save_pretrained(weights_only)
    monkeypatch.setenv(preference.PICKSCORE_WEIGHTS.env, str(weights_only))
    monkeypatch.delenv(preference.PICKSCORE_TOKENIZER_ENV, raising=False)
    monkeypatch.setattr(preference, "_LOADED", {})
    with pytest.raises(FileNotFoundError, match="laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
        registry.get("evaluators", "pickscore").check_ready()
    monkeypatch.setenv(preference.PICKSCORE_TOKENIZER_ENV, str(tiny_clip_dir))
    registry.get("evaluators", "pickscore").check_ready()
    items = samples(2)
    logits, _ = reference_logits(tiny_clip_dir, [s.metadata["prompt"] for s in items], items)
    records = registry.get("evaluators", "pickscore").score(items)
    assert np.allclose([records[s.key]["score"] for s in items], logits.numpy(), atol=1e-4)


PREFERENCE_SUITE = """
name: t-preference
version: 1
backbones: [tiny]
prompts: {kind: shapes-dense, split: eval, count: 2, seed: 1}
images_per_prompt: 4
sampler: {steps: 2, cfg: 1.0}
evaluators: [clipscore, laion-aesthetic]
layout: dpg
"""


def test_a_dpg_layout_suite_scores_every_tile_and_stores_the_metrics(weights_env, tiny_clip_dir, tmp_path):
    """The preference scorers inside the eval runner: each tile of the 2x2 grids is one image, and the stored
    metric is the mean over the tiles of what the scorer gives those tiles directly."""
    from PIL import Image

    from evaluators import run as runner
    from evaluators.dpg import split_grid
    from evaluators.suites import load_suite
    from harness.backbones.tiny import load_tiny
    from harness.store import ResultsStore

    bb = load_tiny("", d_model=32, n_layers=1, n_heads=2, mlp_hidden=64)
    bb.save(tmp_path / "model.safetensors")
    (tmp_path / "suite.yaml").write_text(PREFERENCE_SUITE)
    suite = load_suite(tmp_path / "suite.yaml")
    with ResultsStore(tmp_path / "store.sqlite") as store:
        metrics = runner.evaluate(bb, suite, checkpoint_path=tmp_path / "model.safetensors", store=store,
                                  out_root=tmp_path / "images", batch_size=4)
    grids = sorted((next((tmp_path / "images" / "t-preference").iterdir()) / "grids").iterdir())
    assert len(grids) == 2
    prompts = {p.prompt_id: p for p in runner.suite_prompts(suite)}
    tiles = [Sample(key=f"{g.stem}/{t}", metadata=prompts[g.stem].metadata, image=np.asarray(tile))
             for g in grids for t, tile in enumerate(split_grid(Image.open(g).convert("RGB")))]
    assert len(tiles) == 8
    direct = registry.get("evaluators", "clipscore").score(tiles)
    assert metrics["clipscore"] == pytest.approx(max(np.mean([r["score"] for r in direct.values()]), 0.0), abs=1e-4)
    aesthetic = registry.get("evaluators", "laion-aesthetic").score(tiles)
    assert metrics["laion_aesthetic"] == pytest.approx(np.mean([r["score"] for r in aesthetic.values()]), abs=1e-5)
