"""Constants tables: values taken from the official code and configs (each row names its source), checked against what
the project builds -- never against the project's own constants. Fast: no weights, modules on the meta device.

Sources (commits as fetched):
  IVL  OpenGVLab/InternVL @ 2410d1dbf208f0e799459aff9376e5747dbf41a2
  UP   thunderbolt215/UniPercept @ 34660fffc4a1bf3f6b815ae38adb5edea26a20b1
  MM   Gen-Verse/MMaDA @ 3cdb8709635beb29f66e4e23cd66060872ac3996
  DM   Alpha-VLLM/Lumina-DiMOO @ 81344e60545ae8d70f11039d3450717d974f831b
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from evaluators import unipercept
from harness.backbones.base import MASKED, PromptBatch

# --- UniPercept = InternVL3-8B ----------------------------------------------------------------------------------

# InternVL3-8B's config.json, architecture keys only: InternViT-300M-448px-V2.5 + Qwen2.5-7B. Vision values as in the
# released InternVL3 configs (vision_config of InternVL3-1B/2B/8B: the same ViT); LLM values as Qwen2.5-7B's
# config.json (hidden 3584, 28 heads, 4 KV heads, 28 layers, MLP 18944, rope_theta 1e6); vocab 151674 and the
# top-level keys (force_image_size 448, downsample_ratio 0.5, ps_version v2, template internvl2_5) as in the
# released InternVL3 configs and IVL internvl_chat/shell/internvl3.0/2nd_finetune/internvl3_8b_*.sh (L38-66).
INTERNVL3_8B = {
    "vision_config": {"hidden_size": 1024, "num_attention_heads": 16, "num_hidden_layers": 24, "intermediate_size": 4096,
                      "image_size": 448, "patch_size": 14, "qkv_bias": True, "qk_normalization": False,
                      "norm_type": "layer_norm", "layer_norm_eps": 1e-6, "hidden_act": "gelu", "torch_dtype": "bfloat16"},
    "llm_config": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "num_hidden_layers": 28,
                   "intermediate_size": 18944, "vocab_size": 151674, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                   "torch_dtype": "bfloat16"},
    "force_image_size": 448, "downsample_ratio": 0.5, "ps_version": "v2", "select_layer": -1, "template": "internvl2_5",
}

UNIPERCEPT_TABLE = [   # (name, official value, source)
    ("vision heads x head width", (16, 64), "InternViT-300M vision_config: hidden 1024 / 16 heads"),
    ("LLM heads x head width, KV heads", (28, 128, 4), "Qwen2.5-7B config.json: hidden 3584 / 28 heads, 4 KV heads"),
    ("tile size", 448, "UP src/eval/eval_vr.py build_transform(input_size=448) L23-28; config force_image_size"),
    ("image mean", (0.485, 0.456, 0.406), "UP src/eval/eval_vr.py IMAGENET_MEAN L19"),
    ("image std", (0.229, 0.224, 0.225), "UP src/eval/eval_vr.py IMAGENET_STD L20"),
    ("num_image_token", 256, "UP modeling_unipercept.py L55-60: int((448 // 14) ** 2 * 0.5 ** 2)"),
    ("image tokens", ("<img>", "</img>", "<IMG_CONTEXT>"), "UP modeling_unipercept.py score() defaults L421-423"),
    ("internvl2_5 template", ("<|im_start|>system\n{system_message}", "<|im_start|>user\n",
                              "<|im_start|>assistant\n", "<|im_end|>\n"),
     "UP src/internvl/conversation.py L395-401 (system_template, roles, sep; SeparatorStyle.MPT)"),
    ("default system message", "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。",
     "UP src/internvl/conversation.py L397 (internvl2_5 system_message)"),
    ("score tokens", ("aa", "az", "ca", "cy", "da", "dy", "ea", "ey"),
     "UP src/internvl/model/internvl_chat/aes_tokens.py score2aestoken: 0, 25, 26, 50, 51, 75, 76, 100"),
]
TABLE = dict((name, value) for name, value, _ in UNIPERCEPT_TABLE)


def test_unipercept_heads_and_head_widths_as_built():
    from transformers.models.internvl.modeling_internvl import InternVLVisionAttention
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention
    config = unipercept.transformers_config(INTERNVL3_8B, image_token_id=151667)
    with torch.device("meta"):
        vision = InternVLVisionAttention(config.vision_config)
        text = Qwen2Attention(config.text_config, layer_idx=0)
    assert (vision.num_heads, vision.head_dim) == TABLE["vision heads x head width"]
    assert (config.text_config.num_attention_heads, text.head_dim, config.text_config.num_key_value_heads) == \
        TABLE["LLM heads x head width, KV heads"]
    assert vision.q_proj.bias is not None and config.vision_config.use_qk_norm is False   # qkv_bias, no qk-norm
    assert config.text_config.dtype is None                   # the saved bf16 does not pick the build dtype


def test_unipercept_image_geometry_and_normalisation_as_built():
    assert unipercept.image_size(INTERNVL3_8B) == TABLE["tile size"]
    assert unipercept.num_image_token(INTERNVL3_8B) == TABLE["num_image_token"]
    image = np.full((30, 50, 3), (10, 128, 250), dtype=np.uint8)       # a flat colour survives any resampling
    got = unipercept.preprocess(image, TABLE["tile size"])
    assert got.shape == (3, 448, 448)
    mean, std = TABLE["image mean"], TABLE["image std"]
    for c, v in enumerate((10, 128, 250)):
        assert torch.allclose(got[c], torch.tensor((v / 255 - mean[c]) / std[c]), atol=1e-5)


def test_unipercept_conversation_as_built():
    system_template, user, assistant, sep = TABLE["internvl2_5 template"]
    start, end, context = TABLE["image tokens"]
    question = "<image>Rate the quality of the image."
    expected = (system_template.format(system_message="S") + sep + user + question + sep + assistant)   # MPT style
    expected = expected.replace("<image>", start + context * TABLE["num_image_token"] + end, 1)
    assert unipercept.query(question, "S", unipercept.num_image_token(INTERNVL3_8B)) == expected


def test_unipercept_system_message_rule_and_default():
    """No key: the template default (as read from the wheel's conversation.py by `harness data fetch`); a key, even
    null: its value through str.format (UP modeling_unipercept.py L98-101, IVL modeling_internvl_chat.py L98-101)."""
    from evaluators import data
    conversation = ("register_conv_template(Conversation(name='internvl2_5', system_template='x', "
                    f"system_message={TABLE['default system message']!r}, sep='y'))\n")
    model = 'def score(self, desc):\n    question = f"<image>Rate the {desc} score."\n'
    default = data.unipercept_prompts_from_source(model, conversation)["system_message"]
    assert default == TABLE["default system message"]
    assert unipercept.system_message(INTERNVL3_8B, lambda: default) == default
    assert unipercept.system_message({**INTERNVL3_8B, "system_message": None}, lambda: default) == "None"
    assert unipercept.system_message({**INTERNVL3_8B, "system_message": ""}, lambda: default) == ""


def test_unipercept_score_tokens_as_built():
    tokens = unipercept.score_tokens()
    assert tuple(tokens[i] for i in (0, 25, 26, 50, 51, 75, 76, 100)) == TABLE["score tokens"]


# --- MMaDA / Lumina-DiMOO samplers ------------------------------------------------------------------------------

MMADA_TABLE = [   # (name, official value, source)
    ("mask token", 126336, "MM models/modeling_mmada.py t2i_generate mask_token_id=126336 (L131)"),
    ("codebook size", 8192, "MM configs/mmada_demo.yaml codebook_size (L21); t2i_generate codebook_size=8192 (L133)"),
    ("image tokens at 512 px", 1024, "MM configs/mmada_demo.yaml num_vq_tokens (L22), resolution 512 (L47)"),
    ("text prefix length", 513, "MM t2i_generate uncond_prefix = uncond_input_ids[:, :resolution + 1], resolution=512 "
                                "(L132, L153); max_seq_length 512 (configs/mmada_demo.yaml L52)"),
    ("image slots", "input_ids[:, -(N + 1):-1]", "MM t2i_generate L148: the N slots end one token before the end"),
    ("preset steps, CFG", (15, 3.5), "MM README.md L142: inference_t2i.py ... guidance_scale=3.5 generation_timesteps=15"),
]
DIMOO_TABLE = [
    ("mask token", 126336, "DM config.py SPECIAL_TOKENS mask_token (L28); generate_image mask_token_id (L20)"),
    ("newline token", 126084, "DM config.py newline_token (L29); generate_image newline_id (L21)"),
    ("image code offset", 126356, "DM config.py image_token_offset (L30)"),
    ("<answer>, </answer>", (126354, 126355), "DM config.py answer_start / answer_end (L31-32)"),
    ("<IMAGE>, </IMAGE>", (126349, 126350), "DM config.py boi / eoi (L33-34)"),
    ("<uncondition>", 126351, "DM config.py uncondition (L35)"),
    ("codebook size", 8192, "DM generators/image_generation_generator.py generate_image codebook_size=8192 (L26)"),
    ("pixels per code", 16, "DM utils/image_utils.py calculate_vq_params vae_scale=16 (L82-96)"),
    ("image part", "[BOA, BOI] + rows(MASK * w + NEWLINE) * h + [EOI, EOA]",
     "DM inference/inference_t2i.py L104-105 (add_break_line, img_pred_token)"),
    ("system text", "Generate an image according to the text prompt.", "DM config.py PROMPT_TEMPLATES image_generation"),
    ("preset steps, CFG, temperature", (64, 4.0, 1.0),
     "DM config.py GENERATION_CONFIG default_timesteps / default_cfg_scale / default_temperature (L9-11); "
     "inference/inference_t2i.py --timesteps 64 --cfg_scale 4.0 (L34-35)"),
]
MM = dict((n, v) for n, v, _ in MMADA_TABLE)
DM = dict((n, v) for n, v, _ in DIMOO_TABLE)


def test_mmada_layout_as_built():
    from harness.backbones import mmada
    tokenizer = SimpleNamespace(bos_token_id=mmada.BOS, eos_token_id=mmada.EOS)
    bb = mmada.MMaDABackbone(SimpleNamespace(head=[torch.empty(134656, 0)]), tokenizer, None, resolution=512)
    n = bb.grid[0] * bb.grid[1]
    assert n == MM["image tokens at 512 px"] and bb.codebook_size == MM["codebook size"]
    prefix = MM["text prefix length"]
    ids = torch.full((1, prefix), mmada.PAD)
    prompts = PromptBatch(ids=ids, attn=torch.ones_like(ids, dtype=torch.bool), maskable=torch.zeros_like(ids, dtype=torch.bool),
                          texts=[""], pad_id=mmada.PAD, pad_side="left")
    codes = torch.full((1, n), MASKED)
    codes[0, 0] = 7
    seq, _, positions = bb.build_inputs(prompts, codes)
    assert seq.shape[1] == prefix + 1 + n + 1
    slots = seq[:, -(n + 1):-1]                                    # where t2i_generate reads and writes the image
    assert torch.equal(positions[0], torch.arange(seq.shape[1])[-(n + 1):-1])
    assert (slots[0, 1:] == MM["mask token"]).all() and bb.text_mask_id == MM["mask token"]


def test_dimoo_layout_as_built():
    from harness.backbones import lumina_dimoo as ld
    module = SimpleNamespace(head=[torch.empty(DM["image code offset"] + DM["codebook size"], 0)])
    bb = ld.LuminaDiMOOBackbone(module, None, None, height=48, width=80)            # non-square: 3 x 5 codes
    h, w = 48 // DM["pixels per code"], 80 // DM["pixels per code"]
    assert bb.grid == (h, w)
    codes = torch.full((1, h * w), MASKED)
    codes[0, 0] = 5
    part, offsets = bb.image_part(codes)
    boa, eoa = DM["<answer>, </answer>"]
    boi, eoi = DM["<IMAGE>, </IMAGE>"]
    rows = [[DM["mask token"]] * w + [DM["newline token"]] for _ in range(h)]
    rows[0][0] = 5 + DM["image code offset"]
    assert part[0].tolist() == [boa, boi] + sum(rows, []) + [eoi, eoa]
    assert part[0, offsets].tolist() == [5 + DM["image code offset"]] + [DM["mask token"]] * (h * w - 1)
    assert ld.UNCONDITION == DM["<uncondition>"] and DM["system text"] in ld.SYSTEM


def test_sampler_presets_as_built():
    from harness.sampling import PRESETS
    mm, dm = PRESETS["mmada"], PRESETS["lumina-dimoo"]
    assert (mm.steps, mm.cfg) == MM["preset steps, CFG"]
    assert (dm.steps, dm.cfg, dm.temperature) == DM["preset steps, CFG, temperature"]
    # MMaDA anneals the remask noise as temperature *= (1 - ratio) each step (MM t2i_generate L203); DiMOO keeps it
    # (DM generate_image passes `temperature` unchanged to mask_by_random_topk, L133)
    assert (mm.noise_anneal, dm.noise_anneal) == ("cumprod", "constant")
    assert (mm.schedule, dm.schedule) == ("mmada-cosine", "dimoo-cosine")   # per-step counts: tests/test_sampling.py
    assert math.isclose(mm.choice_temperature, 1.0) and math.isclose(dm.choice_temperature, 1.0)   # t2i_generate / generate_image temperature=1.0


@pytest.mark.parametrize("table", [UNIPERCEPT_TABLE, MMADA_TABLE, DIMOO_TABLE])
def test_every_row_names_its_source(table):
    assert all(len(row) == 3 and row[2] for row in table)
