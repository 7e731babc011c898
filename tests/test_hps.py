"""HPSv2.1 (evaluators/hps.py) on a tiny random checkpoint under open_clip's key names, checked against a
hand-written open_clip CLIP forward (fused in_proj attention, class token, ln_pre / ln_post, causal text tower
pooled at the end-of-text token, x @ proj), plus HPS's resize-longest-side-and-pad transform. The tiny towers keep
the real head layout: 80 wide in the vision tower, 64 in the text tower (open_clip model_configs/ViT-H-14.json:
vision_cfg head_width 80, text_cfg width 1024 / heads 16), written here, not read from evaluators/hps.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluators import clip_colors, hps
from evaluators.base import Sample
from harness import registry

V_WIDTH, T_WIDTH, LAYERS, PATCH, GRID, EMBED, CONTEXT = 320, 128, 2, 8, 4, 32, 77
V_HEAD_WIDTH, T_HEAD_WIDTH = 80, 64     # open_clip ViT-H-14.json: vision head_width 80; text 1024 / 16 heads


def block_state(prefix: str, width: int, rand) -> dict:
    return {prefix + "ln_1.weight": 1 + rand(width), prefix + "ln_1.bias": rand(width),
            prefix + "attn.in_proj_weight": rand(3 * width, width), prefix + "attn.in_proj_bias": rand(3 * width),
            prefix + "attn.out_proj.weight": rand(width, width), prefix + "attn.out_proj.bias": rand(width),
            prefix + "ln_2.weight": 1 + rand(width), prefix + "ln_2.bias": rand(width),
            prefix + "mlp.c_fc.weight": rand(4 * width, width), prefix + "mlp.c_fc.bias": rand(4 * width),
            prefix + "mlp.c_proj.weight": rand(width, 4 * width), prefix + "mlp.c_proj.bias": rand(width)}


def open_clip_state(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: 0.1 * torch.randn(*shape, generator=g)
    state = {"visual.conv1.weight": rand(V_WIDTH, 3, PATCH, PATCH), "visual.class_embedding": rand(V_WIDTH),
             "visual.positional_embedding": rand(GRID * GRID + 1, V_WIDTH),
             "visual.ln_pre.weight": 1 + rand(V_WIDTH), "visual.ln_pre.bias": rand(V_WIDTH),
             "visual.ln_post.weight": 1 + rand(V_WIDTH), "visual.ln_post.bias": rand(V_WIDTH),
             "visual.proj": rand(V_WIDTH, EMBED), "token_embedding.weight": rand(vocab, T_WIDTH),
             "positional_embedding": rand(CONTEXT, T_WIDTH), "ln_final.weight": 1 + rand(T_WIDTH),
             "ln_final.bias": rand(T_WIDTH), "text_projection": rand(T_WIDTH, EMBED),
             "logit_scale": torch.tensor(4.6052)}
    for i in range(LAYERS):
        state.update(block_state(f"visual.transformer.resblocks.{i}.", V_WIDTH, rand))
        state.update(block_state(f"transformer.resblocks.{i}.", T_WIDTH, rand))
    return state


def reference_block(x, state, prefix, width, head_width, causal):
    ln = lambda t, name: F.layer_norm(t, (width,), state[prefix + name + ".weight"], state[prefix + name + ".bias"])
    heads, (b, n, _) = width // head_width, x.shape
    q, k, v = F.linear(ln(x, "ln_1"), state[prefix + "attn.in_proj_weight"], state[prefix + "attn.in_proj_bias"]).chunk(3, -1)
    split = lambda t: t.reshape(b, n, heads, head_width).transpose(1, 2)
    scores = split(q) @ split(k).transpose(-2, -1) / head_width ** 0.5
    if causal:
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, n, width)
    x = x + F.linear(out, state[prefix + "attn.out_proj.weight"], state[prefix + "attn.out_proj.bias"])
    hidden = F.gelu(F.linear(ln(x, "ln_2"), state[prefix + "mlp.c_fc.weight"], state[prefix + "mlp.c_fc.bias"]))
    return x + F.linear(hidden, state[prefix + "mlp.c_proj.weight"], state[prefix + "mlp.c_proj.bias"])


def reference_scores(state, pixels, ids, eot: int) -> np.ndarray:
    """100 x cos of open_clip's encode_image / encode_text, written out."""
    ln = lambda t, name, w: F.layer_norm(t, (w,), state[name + ".weight"], state[name + ".bias"])
    x = F.conv2d(pixels, state["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([state["visual.class_embedding"].expand(len(x), 1, -1), x], 1) + state["visual.positional_embedding"]
    x = ln(x, "visual.ln_pre", V_WIDTH)
    for i in range(LAYERS):
        x = reference_block(x, state, f"visual.transformer.resblocks.{i}.", V_WIDTH, V_HEAD_WIDTH, causal=False)
    image = ln(x[:, 0], "visual.ln_post", V_WIDTH) @ state["visual.proj"]
    t = state["token_embedding.weight"][ids] + state["positional_embedding"]
    for i in range(LAYERS):
        t = reference_block(t, state, f"transformer.resblocks.{i}.", T_WIDTH, T_HEAD_WIDTH, causal=True)
    t = ln(t, "ln_final", T_WIDTH)
    # open_clip pools at ids.argmax(), the end-of-text token in CLIP's vocabulary (49407, the highest id); the tiny
    # vocabulary numbers it 1, so pool at its first position instead
    text = t[torch.arange(len(ids)), (ids == eot).int().argmax(-1)] @ state["text_projection"]
    return (100 * (F.normalize(image, dim=-1) * F.normalize(text, dim=-1)).sum(-1)).numpy()


@pytest.fixture()
def hps_env(tiny_clip_dir, tmp_path, monkeypatch):
    tokenizer = clip_colors.load_clip(tiny_clip_dir).tokenizer
    state = open_clip_state(len(tokenizer))
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / hps.CHECKPOINT_NAME)
    monkeypatch.setenv(hps.CHECKPOINT_ENV, str(tmp_path / hps.CHECKPOINT_NAME))
    monkeypatch.setenv(hps.TOKENIZER_ENV, str(tiny_clip_dir))
    monkeypatch.setattr(hps, "_LOADED", {})
    return state, tokenizer


def test_hps_scores_match_open_clip_written_out(hps_env):
    state, tokenizer = hps_env
    rng = np.random.default_rng(0)
    prompts = ["a red photo", "a dog", "photo of a cat and a dog"]
    items = [Sample(key=f"{i:05d}/0000", metadata={"tag": "dense", "prompt": p},
                    image=rng.integers(0, 256, (32, 32 + 8 * i, 3), dtype=np.uint8)) for i, p in enumerate(prompts)]
    evaluator = registry.get("evaluators", "hpsv21")
    evaluator.check_ready()
    result = evaluator.evaluate(items)
    got = np.array([result.records[s.key]["score"] for s in items])
    ids = tokenizer(prompts, padding="max_length", max_length=CONTEXT, return_tensors="pt")["input_ids"]
    pixels = torch.stack([hps.preprocess(s.image, PATCH * GRID) for s in items])
    assert np.allclose(got, reference_scores(state, pixels, ids, tokenizer.eos_token_id), atol=1e-3)
    assert result.metrics[0].name == "hpsv21" and result.metrics[0].value == pytest.approx(got.mean())


def test_hps_transform_resizes_the_longest_side_and_pads_centred_with_black():
    image = np.full((20, 40, 3), 255, dtype=np.uint8)          # white, twice as wide as tall
    pixels = hps.preprocess(image, 16)
    mean = torch.tensor(clip_colors.OPENAI_MEAN).view(3, 1)
    std = torch.tensor(clip_colors.OPENAI_STD).view(3, 1)
    black, white = (-mean / std), ((1 - mean) / std)
    assert pixels.shape == (3, 16, 16)
    assert torch.allclose(pixels[:, :4, :].reshape(3, -1), black.expand(3, 64)) and torch.allclose(pixels[:, 12:, :].reshape(3, -1), black.expand(3, 64))
    assert torch.allclose(pixels[:, 4:12, :].reshape(3, -1), white.expand(3, 128), atol=1e-4)


def test_hps_checkpoint_errors_are_named(tiny_clip_dir, tmp_path, monkeypatch):
    evaluator = registry.get("evaluators", "hpsv21")
    monkeypatch.delenv(hps.CHECKPOINT_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="HPS_v2.1_compressed.pt"):
        evaluator.check_ready()
    tokenizer = clip_colors.load_clip(tiny_clip_dir).tokenizer
    state = open_clip_state(len(tokenizer))
    torch.save({"state_dict": {**state, "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(V_WIDTH)}}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="unexpected block key"):
        hps.load_hps(tmp_path / "x.pt", tiny_clip_dir)
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "y.pt")
    with pytest.raises(ValueError, match="not an open_clip checkpoint"):
        hps.load_hps(tmp_path / "y.pt", tiny_clip_dir)


def test_hps_cleans_the_prompt_as_open_clips_tokenizer(hps_env):
    """open_clip's SimpleTokenizer (hpsv2/src/open_clip/tokenizer.py) runs ftfy.fix_text and html.unescape before
    BPE: full-width letters and the "ﬁ" ligature become plain letters, so the score equals the clean prompt's;
    transformers' CLIPTokenizer alone would map them to unknown tokens."""
    _, tokenizer = hps_env
    image = np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    score = lambda p: registry.get("evaluators", "hpsv21").score(
        [Sample(key="00000/0000", metadata={"tag": "dense", "prompt": p}, image=image)])["00000/0000"]["score"]
    messy, clean = "A ｒｅｄ ﬁsh &amp;  photo", "a red fish & photo"
    assert clip_colors.openai_clean(messy) == clean
    assert score(messy) == pytest.approx(score(clean), abs=1e-5)
    assert tokenizer([messy])["input_ids"] != tokenizer([clean])["input_ids"]
