"""DeQA-Score (evaluators/deqa.py): our mPLUG-Owl2 parts checked against independent implementations on tiny random
weights: the vision tower against transformers' CLIPVisionModel (after undoing the per-head fused qkv layout), the
multiway LLaMA against transformers' LlamaForCausalLM (both ways equal), the abstractor against the layer written
out with einsum; plus the prompt's chunked tokenisation, the 1-5 expectation and the loader's key checks."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluators import deqa
from evaluators.base import Sample
from harness import registry

VISION = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
          "image_size": 56, "patch_size": 14, "layer_norm_eps": 1e-6}
ABSTRACTOR = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 48,
              "num_learnable_queries": 4, "layer_norm_eps": 1e-6}
WORDS = ["USER:", "How", "would", "you", "rate", "the", "quality", "of", "this", "image?", "ASSISTANT:", "The",
         "image", "is", "excellent", "good", "fair", "poor", "bad"]


def config(vocab: int) -> dict:
    return {"vocab_size": vocab, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 4, "intermediate_size": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "visual_config": {"visual_model": VISION, "visual_abstractor": ABSTRACTOR}}


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model.eval()


def test_vision_tower_matches_transformers_clip():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    ours = randomised(deqa.Vision(VISION))
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                            image_size=56, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-6)).eval()
    s, heads, hd = ours.state_dict(), 2, 16
    mapped = {"embeddings.class_embedding": s["embeddings.cls_token"][0, 0],
              "embeddings.patch_embedding.weight": s["embeddings.patch_embed.weight"],
              "embeddings.position_embedding.weight": s["embeddings.position_embedding"][0],
              "pre_layrnorm.weight": s["embeddings.pre_layernorm.weight"],
              "pre_layrnorm.bias": s["embeddings.pre_layernorm.bias"],
              "post_layernorm.weight": s["post_layernorm.weight"],
              "post_layernorm.bias": s["post_layernorm.bias"]}
    for i in range(2):
        o, t = f"encoder.layers.{i}.", f"encoder.layers.{i}."
        w = s[o + "self_attn.query_key_value.weight"].view(heads, 3, hd, 32)     # rows grouped head by head
        b = s[o + "self_attn.query_key_value.bias"].view(heads, 3, hd)
        for j, part in enumerate(("q_proj", "k_proj", "v_proj")):
            mapped[t + f"self_attn.{part}.weight"] = w[:, j].reshape(32, 32)
            mapped[t + f"self_attn.{part}.bias"] = b[:, j].reshape(32)
        for ours_name, clip_name in (("self_attn.dense", "self_attn.out_proj"), ("input_layernorm", "layer_norm1"),
                                     ("post_attention_layernorm", "layer_norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            for p in ("weight", "bias"):
                mapped[f"{t}{clip_name}.{p}"] = s[f"{o}{ours_name}.{p}"]
    missing, unexpected = clip.load_state_dict(mapped, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        reference = clip(pixel_values=pixels).last_hidden_state          # transformers stops before post_layernorm
        reference = F.layer_norm(reference, (32,), s["post_layernorm.weight"], s["post_layernorm.bias"], eps=1e-6)
        assert torch.allclose(ours(pixels), reference, atol=1e-5)


def test_multiway_llama_matches_transformers_llama_when_both_ways_are_equal():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = config(40)
    ours = randomised(deqa.MplugOwl2(cfg))
    s = ours.state_dict()
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=4, intermediate_size=128, rms_norm_eps=1e-6,
                                         rope_theta=10000.0, tie_word_embeddings=False)).eval()
    mapped = {}
    for key in llama.state_dict():
        source = key
        for part in ("k_proj", "v_proj", "input_layernorm", "post_attention_layernorm"):
            source = source.replace(f".{part}.", f".{part}.multiway.0.")
        mapped[key] = s[source]
    llama.load_state_dict(mapped)
    with torch.no_grad():
        for layer in ours.model.layers:       # way 1 (image tokens) = way 0: the model is a plain LLaMA
            for part in (layer.self_attn.k_proj, layer.self_attn.v_proj, layer.input_layernorm, layer.post_attention_layernorm):
                part.multiway[1].load_state_dict(part.multiway[0].state_dict())
        pixels = torch.randn(2, 3, 56, 56)
        before, after = torch.tensor([[1, 5, 6]]), torch.tensor([[7, 8]])
        visual = ours.model.visual_abstractor(ours.model.vision_model(pixels))
        embeds = torch.cat([ours.model.embed_tokens(before).expand(2, -1, -1), visual,
                            ours.model.embed_tokens(after).expand(2, -1, -1)], 1)
        reference = llama(inputs_embeds=embeds).logits[:, -1]
        assert torch.allclose(ours.last_logits(before, after, pixels), reference, atol=1e-4)
        # way 1 now differs: only the image positions use it, so the logits change
        ours.model.layers[0].self_attn.k_proj.multiway[1].weight.add_(0.5)
        assert not torch.allclose(ours.last_logits(before, after, pixels), reference, atol=1e-3)


def test_abstractor_layer_written_out():
    layer = randomised(deqa.AbstractorLayer(32, 2, 48, 1e-6, queries=4, keys=17))
    c, a, o = layer.crossattention, layer.crossattention.attention, layer.crossattention.output
    queries, image = torch.randn(2, 4, 32), torch.randn(2, 17, 32)
    with torch.no_grad():
        nq = F.layer_norm(queries, (32,), c.norm1.weight, c.norm1.bias)
        nk = F.layer_norm(image, (32,), c.normk.weight, c.normk.bias)
        kv = torch.cat([nq, nk], 1)                                             # keys: the queries and the image
        q = a.query(nq + a.q_pos_embed).view(2, 4, 2, 16)
        k = a.key(kv + torch.cat([a.q_pos_embed, a.k_pos_embed])).view(2, 21, 2, 16)
        v = a.value(kv).view(2, 21, 2, 16)                                      # no positions on the values
        weights = torch.einsum("bqhd,bkhd->bhqk", q, k).div(4.0).softmax(-1)
        context = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(2, 4, 32)
        out = nq + o.out_proj(context)
        h = F.layer_norm(out, (32,), o.norm2.weight, o.norm2.bias)
        inner = F.silu(o.mlp.w1(h)) * o.mlp.w3(h)
        expected = out + o.mlp.w2(F.layer_norm(inner, (48,), o.mlp.ffn_ln.weight, o.mlp.ffn_ln.bias, eps=1e-6))
        assert torch.allclose(layer(queries, image), expected, atol=1e-5)


@pytest.fixture(scope="module")
def deqa_folder(tmp_path_factory, word_level_tokenizer):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("deqa")
    from tokenizers.processors import TemplateProcessing

    tokenizer = word_level_tokenizer(WORDS, ["</s>", "<s>"], bos_token="<s>", eos_token="</s>")
    bos = tokenizer.convert_tokens_to_ids("<s>")          # like LLaMA's: BOS before every text
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    cfg = config(len(tokenizer))
    model = randomised(deqa.MplugOwl2(cfg), seed=3)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)                   # tolerated: recomputed
    save_file(state, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps(cfg))
    tokenizer.save_pretrained(root)
    return root, model, tokenizer


def test_prompt_and_levels_and_score(deqa_folder, monkeypatch):
    root, model, _ = deqa_folder
    monkeypatch.setenv(deqa.DIR_ENV, str(root))
    monkeypatch.setattr(deqa, "_LOADED", {})
    loaded, tokenizer, levels = deqa.deqa_model()
    before, after = deqa.prompt_ids(tokenizer)
    bos = tokenizer.bos_token_id
    assert tokenizer("The").input_ids[0] == bos                 # the tokenizer adds BOS to every text ...
    assert before[0, 0] == bos and bos not in after[0].tolist()  # ... the prompt keeps one, at the start
    assert tokenizer.convert_ids_to_tokens(levels) == list(deqa.LEVELS)
    rng = np.random.default_rng(0)
    items = [Sample(key=f"{i}", metadata={"tag": "dense", "prompt": "x"},
                    image=rng.integers(0, 256, (40 + 10 * i, 56, 3), dtype=np.uint8)) for i in range(2)]
    got = registry.get("evaluators", "deqa").score(items)
    pixels = torch.stack([deqa.preprocess(s.image, 56) for s in items])
    with torch.no_grad():
        logits = model.last_logits(before, after, pixels)[:, levels]
    expected = torch.softmax(logits, -1) @ torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    assert np.allclose([got[s.key]["score"] for s in items], expected.numpy(), atol=1e-5)
    sure = torch.nn.Linear(64, len(tokenizer))           # a head sure of "excellent": the score is 5
    with torch.no_grad():
        sure.weight.zero_(), sure.bias.zero_()
        sure.bias[levels[0]] = 100.0
    loaded.lm_head = sure
    assert registry.get("evaluators", "deqa").score(items[:1])["0"]["score"] == pytest.approx(5.0, abs=1e-3)


def test_padding_to_a_square_uses_the_mean_colour():
    image = np.zeros((20, 40, 3), dtype=np.uint8)                 # black, wider than tall
    pixels = deqa.preprocess(image, 40)
    mean = torch.tensor([int(m * 255) / 255 for m in deqa.clip_colors.OPENAI_MEAN]).view(3, 1)
    std = torch.tensor(deqa.clip_colors.OPENAI_STD).view(3, 1)
    assert torch.allclose(pixels[:, 0, :], ((mean - torch.tensor(deqa.clip_colors.OPENAI_MEAN).view(3, 1)) / std).expand(3, 40), atol=1e-4)
    assert torch.allclose(pixels[:, 20, :], (-torch.tensor(deqa.clip_colors.OPENAI_MEAN).view(3, 1) / std).expand(3, 40), atol=1e-4)


def test_deqa_files_are_checked(deqa_folder, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    root, _, _ = deqa_folder
    evaluator = registry.get("evaluators", "deqa")
    monkeypatch.delenv(deqa.DIR_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="zhiyuanyou/DeQA-Score-Mix3"):
        evaluator.check_ready()
    (tmp_path / "config.json").write_text((root / "config.json").read_text())
    monkeypatch.setenv(deqa.DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no weights"):
        evaluator.check_ready()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (root / name).exists():
            (tmp_path / name).write_bytes((root / name).read_bytes())
    state = load_file(str(root / "model.safetensors"))
    state["model.extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected"):
        deqa.load_deqa(tmp_path, "cpu", torch.float32)
