"""ImageReward (evaluators/imagereward.py) on a tiny random checkpoint written under the official key names
(BLIP's timm-style ViT, BLIP's med BERT, the MLP), checked against a hand-written forward of BLIP's ViT, so a
wrong key mapping, head count, qkv layout or normalisation breaks the test."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluators import clip_colors, imagereward
from evaluators.base import Sample
from harness import registry

WIDTH, DEPTH, PATCH, TEXT, TEXT_LAYERS = 128, 2, 16, 64, 2     # width 128 = 2 heads of 64, as BLIP's ViTs
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "red", "dog", "and", "cat", "two", "green"]
MED = {"hidden_size": TEXT, "intermediate_size": 2 * TEXT, "num_hidden_layers": TEXT_LAYERS, "num_attention_heads": 2,
       "max_position_embeddings": 40, "layer_norm_eps": 1e-12, "hidden_act": "gelu", "pad_token_id": 0,
       "vocab_size": len(WORDS) + 2, "encoder_width": WIDTH, "add_cross_attention": True}


def official_checkpoint() -> dict[str, torch.Tensor]:
    """Random weights under ImageReward.pt's key names (BLIP ViT + med BERT + retrieval heads + MLP)."""
    from transformers import BlipTextConfig
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: 0.05 * torch.randn(*shape, generator=g)
    n_tokens = (224 // PATCH) ** 2 + 1
    state = {"blip.visual_encoder.cls_token": rand(1, 1, WIDTH), "blip.visual_encoder.pos_embed": rand(1, n_tokens, WIDTH),
             "blip.visual_encoder.patch_embed.proj.weight": rand(WIDTH, 3, PATCH, PATCH),
             "blip.visual_encoder.patch_embed.proj.bias": rand(WIDTH),
             "blip.visual_encoder.norm.weight": 1 + rand(WIDTH), "blip.visual_encoder.norm.bias": rand(WIDTH)}
    for i in range(DEPTH):
        b = f"blip.visual_encoder.blocks.{i}."
        state.update({b + "norm1.weight": 1 + rand(WIDTH), b + "norm1.bias": rand(WIDTH),
                      b + "attn.qkv.weight": rand(3 * WIDTH, WIDTH), b + "attn.qkv.bias": rand(3 * WIDTH),
                      b + "attn.proj.weight": rand(WIDTH, WIDTH), b + "attn.proj.bias": rand(WIDTH),
                      b + "norm2.weight": 1 + rand(WIDTH), b + "norm2.bias": rand(WIDTH),
                      b + "mlp.fc1.weight": rand(4 * WIDTH, WIDTH), b + "mlp.fc1.bias": rand(4 * WIDTH),
                      b + "mlp.fc2.weight": rand(WIDTH, 4 * WIDTH), b + "mlp.fc2.bias": rand(WIDTH)})
    torch.manual_seed(0)      # med BERT's names are transformers' BlipText names; take a random one's tensors
    text = BlipTextModel(BlipTextConfig(vocab_size=MED["vocab_size"], hidden_size=TEXT, encoder_hidden_size=WIDTH,
                                        intermediate_size=2 * TEXT, num_hidden_layers=TEXT_LAYERS, num_attention_heads=2,
                                        max_position_embeddings=40, bos_token_id=None, sep_token_id=None,
                                        eos_token_id=None), add_pooling_layer=False)
    state.update({"blip.text_encoder." + k: v.detach().clone() for k, v in text.state_dict().items()})
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(40).expand(1, -1)
    state.update({"blip.vision_proj.weight": rand(256, WIDTH), "blip.vision_proj.bias": rand(256),
                  "blip.text_proj.weight": rand(256, TEXT), "blip.text_proj.bias": rand(256)})
    for i, (n_in, n_out) in zip((0, 2, 4, 6, 7), ((TEXT, 1024), (1024, 128), (128, 64), (64, 16), (16, 1))):
        state[f"mlp.layers.{i}.weight"], state[f"mlp.layers.{i}.bias"] = rand(n_out, n_in), rand(n_out)
    return state


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imagereward")
    state = official_checkpoint()
    torch.save(state, folder / imagereward.CHECKPOINT_NAME)
    (folder / imagereward.CONFIG_NAME).write_text(json.dumps(MED))
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    return folder, state


def reference_vit(state: dict, pixels: torch.Tensor) -> torch.Tensor:
    """BLIP's VisionTransformer.forward written out on the official keys (pre-norm blocks, LayerNorm eps 1e-6)."""
    w = lambda name: state["blip.visual_encoder." + name]
    ln = lambda x, name: F.layer_norm(x, (WIDTH,), w(name + ".weight"), w(name + ".bias"), eps=1e-6)
    x = F.conv2d(pixels, w("patch_embed.proj.weight"), w("patch_embed.proj.bias"), stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([w("cls_token").expand(len(x), -1, -1), x], dim=1) + w("pos_embed")
    heads, n = WIDTH // 64, x.shape[1]
    for i in range(DEPTH):
        b = f"blocks.{i}."
        qkv = F.linear(ln(x, b + "norm1"), w(b + "attn.qkv.weight"), w(b + "attn.qkv.bias"))
        q, k, v = qkv.reshape(len(x), n, 3, heads, 64).permute(2, 0, 3, 1, 4)
        attention = ((q @ k.transpose(-2, -1)) * 64 ** -0.5).softmax(-1)
        out = (attention @ v).transpose(1, 2).reshape(len(x), n, WIDTH)
        x = x + F.linear(out, w(b + "attn.proj.weight"), w(b + "attn.proj.bias"))
        hidden = F.gelu(F.linear(ln(x, b + "norm2"), w(b + "mlp.fc1.weight"), w(b + "mlp.fc1.bias")))
        x = x + F.linear(hidden, w(b + "mlp.fc2.weight"), w(b + "mlp.fc2.bias"))
    return ln(x, "norm")


def samples() -> list[Sample]:
    rng = np.random.default_rng(2)
    prompts = ["a photo of a red dog", "two green cat and a dog", "a cat"]
    return [Sample(key=f"{i:05d}/0000", metadata={"tag": "dense", "prompt": p},
                   image=rng.integers(0, 256, (200 + 30 * i, 240, 3), dtype=np.uint8)) for i, p in enumerate(prompts)]


def test_scores_follow_the_official_model_and_normalisation(checkpoint_dir, monkeypatch):
    folder, state = checkpoint_dir
    monkeypatch.setenv(imagereward.DIR_ENV, str(folder))
    monkeypatch.setattr(imagereward, "_LOADED", {})
    items = samples()
    evaluator = registry.get("evaluators", "imagereward")
    result = evaluator.evaluate(items)
    got = np.array([result.records[s.key]["score"] for s in items])

    model = imagereward._LOADED[str(folder)]
    pixels = torch.stack([clip_colors.preprocess(imagereward.Image.fromarray(s.image), 224) for s in items])
    with torch.no_grad():
        image_states = reference_vit(state, pixels)
        assert torch.allclose(model.vision(pixel_values=pixels).last_hidden_state, image_states, atol=1e-4)
        tokens = model.tokenizer([s.metadata["prompt"] for s in items], padding="max_length", max_length=35,
                                 truncation=True, return_tensors="pt")
        assert tokens["input_ids"].shape == (3, 35) and (tokens["input_ids"][:, 0] == WORDS.index("[CLS]")).all()
        cls = model.text(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                         encoder_hidden_states=image_states).last_hidden_state[:, 0]
        x = cls
        for i in (0, 2, 4, 6, 7):        # the MLP has no activations
            x = F.linear(x, state[f"mlp.layers.{i}.weight"], state[f"mlp.layers.{i}.bias"])
    expected = ((x.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072).numpy()
    assert np.allclose(got, expected, atol=1e-4)
    assert len(set(np.round(got, 6))) == 3               # the prompts and images matter
    assert result.metrics[0].name == "imagereward" and result.metrics[0].value == pytest.approx(got.mean())
    assert evaluator.reward_field == "score"
    assert model.vision.config.layer_norm_eps == 1e-6       # BLIP's ViT (too small to show in these activations)


def test_missing_files_and_foreign_checkpoints_are_named(checkpoint_dir, tmp_path, monkeypatch):
    folder, state = checkpoint_dir
    evaluator = registry.get("evaluators", "imagereward")
    monkeypatch.delenv(imagereward.DIR_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="THUDM/ImageReward"):
        evaluator.check_ready()
    monkeypatch.setenv(imagereward.DIR_ENV, str(tmp_path))
    torch.save(state, tmp_path / imagereward.CHECKPOINT_NAME)
    with pytest.raises(FileNotFoundError, match="lacks med_config.json"):
        evaluator.check_ready()
    (tmp_path / imagereward.CONFIG_NAME).write_text(json.dumps(MED))
    monkeypatch.delenv(imagereward.TOKENIZER_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="bert-base-uncased"):
        evaluator.check_ready()
    monkeypatch.setenv(imagereward.TOKENIZER_ENV, str(folder))
    evaluator.check_ready()

    foreign = dict(state)
    foreign["blip.visual_encoder.blocks.0.ls1.gamma"] = torch.ones(WIDTH)
    torch.save(foreign, tmp_path / imagereward.CHECKPOINT_NAME)
    with pytest.raises(ValueError, match="unexpected vision key"):
        imagereward.load_imagereward(tmp_path)
    truncated = {k: v for k, v in state.items() if k != "mlp.layers.7.bias"}
    torch.save(truncated, tmp_path / imagereward.CHECKPOINT_NAME)
    with pytest.raises(ValueError, match="does not fit ImageReward's mlp tower"):
        imagereward.load_imagereward(tmp_path)
