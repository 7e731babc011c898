"""UniPercept (evaluators/unipercept.py) on a tiny random InternVL saved under InternVL-chat's own key names and
config: the three scores must be the expectation over the 101 score tokens of the original model's next-token
distribution after the internvl2_5 conversation, and the token table must map 'da' to 51."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from evaluators import unipercept
from evaluators.base import Sample
from harness import registry

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]
WORDS = ["system", "user", "assistant", "sys", "Rate", "the", "score", "now", "aesthetics", "quality",
         "structure", "and", "texture", "richness"]
PROMPTS = {"question": "<image>Rate the {desc} score now", "system_message": "sys"}


def internvl_chat_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' InternVL names back to InternVL-chat's (as in UniPercept's safetensors), q/k/v fused."""
    out, fused = {}, {}
    for key, value in state.items():
        if key.startswith("model.vision_tower."):
            name = key[len("model.vision_tower."):]
            name = (name.replace("embeddings.cls_token", "embeddings.class_embedding")
                    .replace("embeddings.position_embeddings", "embeddings.position_embedding")
                    .replace("embeddings.patch_embeddings.projection.", "embeddings.patch_embedding.")
                    .replace("encoder.layer.", "encoder.layers.").replace(".lambda_1", ".ls1").replace(".lambda_2", ".ls2")
                    .replace(".layernorm_before.", ".norm1.").replace(".layernorm_after.", ".norm2.")
                    .replace(".attention.projection_layer.", ".attn.proj."))
            for part in ("q_proj", "k_proj", "v_proj"):
                if f".attention.{part}." in name:
                    layer, kind = name.split(f".attention.{part}.")
                    fused.setdefault((layer, kind), {})[part] = value
                    break
            else:
                out["vision_model." + name] = value
        elif key.startswith("model.multi_modal_projector."):
            name = key[len("model.multi_modal_projector."):]
            for new, old in (("layer_norm.", "mlp1.0."), ("linear_1.", "mlp1.1."), ("linear_2.", "mlp1.3.")):
                if name.startswith(new):
                    out[old + name[len(new):]] = value
        elif key.startswith("model.language_model."):
            out["language_model.model." + key[len("model.language_model."):]] = value
        elif key == "lm_head.weight":
            out["language_model.lm_head.weight"] = value
    for (layer, kind), parts in fused.items():
        out[f"vision_model.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return {k: v.contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def unipercept_files(tmp_path_factory, word_level_tokenizer):
    from safetensors.torch import save_file
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    root = tmp_path_factory.mktemp("unipercept")
    tokenizer = word_level_tokenizer(WORDS + unipercept.score_tokens(), SPECIAL)
    image_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2)
    llm = dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=False,
               rope_theta=1000000.0)   # as Qwen2.5 (InternVL3)
    config = InternVLConfig(vision_config=dict(**vision, image_size=[448, 448], patch_size=[14, 14],
                                               attention_bias=True, layer_scale_init_value=0.1, norm_type="layer_norm"),
                            text_config=llm, image_token_id=image_id, downsample_ratio=0.5, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(config).eval()
    (root / "model").mkdir()
    save_file(internvl_chat_names(model.state_dict()), str(root / "model" / "model.safetensors"))
    (root / "model" / "config.json").write_text(json.dumps({
        "vision_config": {**vision, "image_size": 448, "patch_size": 14, "qkv_bias": True, "qk_normalization": False,
                          "norm_type": "layer_norm", "layer_norm_eps": 1e-6, "hidden_act": "gelu"},
        "llm_config": {**llm, "architectures": ["Qwen2ForCausalLM"]},
        "downsample_ratio": 0.5, "ps_version": "v2", "select_layer": -1, "template": "internvl2_5"}))
    tokenizer.save_pretrained(root / "model")
    (root / "data" / "unipercept").mkdir(parents=True)
    (root / "data" / "unipercept" / "prompts.json").write_text(json.dumps(PROMPTS))
    return root, model, tokenizer


def test_score_tokens_are_the_official_table():
    tokens = unipercept.score_tokens()
    assert len(tokens) == 101 and len(set(tokens)) == 101 and not any(t.startswith("b") for t in tokens)
    assert [tokens[i] for i in (0, 25, 26, 50, 51, 75, 76, 100)] == ["aa", "az", "ca", "cy", "da", "dy", "ea", "ey"]


def test_the_score_is_the_expectation_over_the_score_tokens(word_level_tokenizer):
    """A model whose next-token logits favour 'da' (51) by a wide margin scores ~51."""
    tokenizer = word_level_tokenizer(WORDS + unipercept.score_tokens(), SPECIAL)
    da = tokenizer.convert_tokens_to_ids("da")

    class Planted(torch.nn.Module):
        config = SimpleNamespace(vision_config=SimpleNamespace(image_size=[448, 448]))

        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask, pixel_values):
            logits = torch.zeros(*input_ids.shape, len(tokenizer))
            logits[:, -1, da] = 30.0
            return SimpleNamespace(logits=logits)

    got = unipercept.unipercept_scores(Planted(), tokenizer, "sys", 4, "<image>Rate", [np.zeros((8, 8, 3), np.uint8)])
    assert got.item() == pytest.approx(51.0, abs=1e-6)


def test_unipercept_matches_the_original_model(unipercept_files, monkeypatch):
    root, model, tokenizer = unipercept_files
    monkeypatch.setenv(unipercept.DIR_ENV, str(root / "model"))
    monkeypatch.setenv("HARNESS_DATA", str(root / "data"))
    monkeypatch.setattr(unipercept, "_LOADED", {})
    rng = np.random.default_rng(0)
    items = [Sample(key=f"{i:05d}/0000", metadata={"tag": "dense", "prompt": "x"},
                    image=rng.integers(0, 256, (300 + 40 * i, 256, 3), dtype=np.uint8)) for i in range(2)]
    scores = {}
    for short in ("aesthetics", "quality", "structure"):
        evaluator = registry.get("evaluators", f"unipercept-{short}")
        evaluator.check_ready()
        result = evaluator.evaluate(items)
        scores[short] = np.array([result.records[s.key]["score"] for s in items])
        assert result.metrics[0].name == f"unipercept_{short}"

    loaded = unipercept._LOADED[str(root / "model")][0].state_dict()        # every tensor back in its place
    original = model.state_dict()
    assert set(loaded) == set(original) and all(torch.equal(loaded[k], original[k]) for k in original)
    pixels = torch.stack([unipercept.preprocess(s.image, 448) for s in items])
    ids_of = tokenizer.convert_tokens_to_ids(unipercept.score_tokens())
    for short, desc in (("aesthetics", "aesthetics"), ("quality", "quality"), ("structure", "structure and texture richness")):
        text = ("<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 256 +
                f"</img>Rate the {desc} score now<|im_end|>\n<|im_start|>assistant\n")
        ids = tokenizer(text, return_tensors="pt")["input_ids"].expand(2, -1)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels).logits[:, -1, ids_of]
        expected = (torch.softmax(logits, -1) @ torch.arange(101.0)).numpy()
        assert np.allclose(scores[short], expected, atol=1e-4), short
    # the question reaches the model (a random tiny model is near uniform, so the scores differ only a little)
    assert np.abs(scores["aesthetics"] - scores["quality"]).max() > 1e-5


def test_unipercept_files_and_configs_are_checked(unipercept_files, tmp_path, monkeypatch):
    root, _, _ = unipercept_files
    evaluator = registry.get("evaluators", "unipercept-quality")
    monkeypatch.delenv(unipercept.DIR_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="Thunderbolt215215/UniPercept"):
        evaluator.check_ready()
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setenv(unipercept.DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        evaluator.check_ready()
    monkeypatch.setenv(unipercept.DIR_ENV, str(root / "model"))
    monkeypatch.setenv("HARNESS_DATA", str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="harness data fetch unipercept"):
        evaluator.check_ready()
    original = json.loads((root / "model" / "config.json").read_text())
    with pytest.raises(ValueError, match="ps_version"):
        unipercept.transformers_config({**original, "ps_version": "v1"}, 1)
    with pytest.raises(ValueError, match="unexpected key"):
        unipercept.convert_checkpoint({"vision_proj.weight": torch.zeros(1)})


def test_the_question_is_read_from_the_wheel_as_data_and_checked(tmp_path):
    import io
    import zipfile

    from evaluators import data

    model_src = ('class M:\n    def score(self, desc):\n        question = f"<image>Rate {desc} {{x}}."\n'
                 '        return question\n')
    conversation_src = "register(Conversation(name='internvl2_5', system_message='sys msg', sep='x'))\n"
    got = data.unipercept_prompts_from_source(model_src, conversation_src)
    assert got == {"question": "<image>Rate {desc} {{x}}.", "system_message": "sys msg"}
    assert got["question"].format(desc="quality") == "<image>Rate quality {x}."
    with pytest.raises(data.FetchError, match="internvl2_5"):
        data.unipercept_prompts_from_source(model_src, "x = 1\n")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        wheel.writestr(data.UNIPERCEPT_MODEL_FILE, model_src)
        wheel.writestr(data.UNIPERCEPT_CONVERSATION_FILE, conversation_src)
    (tmp_path / "w.whl").write_bytes(buffer.getvalue())
    with pytest.raises(data.FetchError, match="sha256"):
        data.fetch("unipercept", dest=tmp_path / "d", prompts=tmp_path / "w.whl")
    assert not (tmp_path / "d" / "unipercept").exists()


# --- config.json shaped like the released InternVL3 ones (issue 15 item 5) ------------------------------------------

def internvl3_shaped_config(config: dict, **top) -> dict:
    """The tiny fixture's config.json with every key a released OpenGVLab/InternVL3-* config.json carries (top level,
    llm_config and vision_config), bf16 as saved: torch_dtype / use_bfloat16 in all three, rope_scaling dynamic,
    layer_types, force_image_size 448, dynamic tiling switches (key set as printed from InternVL3-1B's config;
    OpenGVLab/InternVL @ 2410d1d internvl_chat/shell/internvl3.0/*/internvl3_8b_*.sh: force_image_size 448, ps_version v2)."""
    llm = {**config["llm_config"], "_name_or_path": "./pretrained/Qwen2.5-7B-Instruct", "attention_dropout": 0.0,
           "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "silu", "initializer_range": 0.02,
           "layer_types": ["full_attention"] * config["llm_config"]["num_hidden_layers"],
           "max_position_embeddings": 32768, "max_window_layers": 70, "moe_config": None, "rms_norm_eps": 1e-6,
           "rope_scaling": {"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"},
           "sliding_window": None, "torch_dtype": "bfloat16", "use_bfloat16": True, "use_cache": True,
           "use_sliding_window": False}
    vision = {**config["vision_config"], "_name_or_path": "OpenGVLab/InternViT-6B-448px-V1-5",
              "architectures": ["InternVisionModel"], "attention_dropout": 0.0, "drop_path_rate": 0.1, "dropout": 0.0,
              "initializer_factor": 0.1, "initializer_range": 1e-10, "model_type": "intern_vit_6b", "num_channels": 3,
              "torch_dtype": "bfloat16", "use_bfloat16": True, "use_flash_attn": False}
    return {"architectures": ["InternVLChatModel"], "downsample_ratio": 0.5, "dynamic_image_size": True,
            "force_image_size": 448, "llm_config": llm, "max_dynamic_patch": 12, "min_dynamic_patch": 1,
            "model_type": "internvl_chat", "pad2square": False, "ps_version": "v2", "select_layer": -1,
            "template": "internvl2_5", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "use_backbone_lora": 0, "use_llm_lora": 0, "use_thumbnail": True, "vision_config": vision, **top}


def model_variant(root, name: str, config: dict):
    """A model folder with another config.json beside the fixture's weights and tokenizer (linked, not copied)."""
    folder = root / name
    folder.mkdir(exist_ok=True)
    for f in (root / "model").iterdir():
        if f.name != "config.json" and not (folder / f.name).exists():
            (folder / f.name).symlink_to(f)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def reference_scores(model, tokenizer, system: str, images) -> np.ndarray:
    """The original model's expectation over the 101 score tokens, internvl2_5 conversation written out by hand."""
    pixels = torch.stack([unipercept.preprocess(im, 448) for im in images])
    text = (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 256 +
            "</img>Rate the quality score now<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer(text, return_tensors="pt")["input_ids"].expand(len(images), -1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels).logits[:, -1]
    chosen = logits[:, tokenizer.convert_tokens_to_ids(unipercept.score_tokens())]
    return (torch.softmax(chosen, -1) @ torch.arange(101.0)).numpy()


def ours(folder, images, dtype=torch.float32) -> tuple[np.ndarray, object, str]:
    model, tokenizer, system, per_image = unipercept.load_unipercept(folder, "cpu", dtype)
    got = unipercept.unipercept_scores(model, tokenizer, system, per_image, PROMPTS["question"].format(desc="quality"),
                                       images)
    return got.numpy(), model, system


IMAGES = [np.random.default_rng(1).integers(0, 256, (320, 300, 3), dtype=np.uint8),
          np.random.default_rng(2).integers(0, 256, (200, 260, 3), dtype=np.uint8)]


def test_a_bf16_internvl3_config_loads_every_part_in_the_dtype_asked_for(unipercept_files, monkeypatch):
    """config.json saved in bf16 (llm_config.torch_dtype: bfloat16): the float32 CPU path must build the language
    model in float32 too (it was bf16 beside a float32 vision tower: a dtype-mismatch crash), and score as the
    original model."""
    root, model, tokenizer = unipercept_files
    monkeypatch.setenv("HARNESS_DATA", str(root / "data"))
    original = json.loads((root / "model" / "config.json").read_text())
    folder = model_variant(root, "internvl3_bf16", internvl3_shaped_config(original))
    got, loaded, system = ours(folder, IMAGES)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert system == PROMPTS["system_message"]            # no system_message key: the template's default
    assert np.allclose(got, reference_scores(model, tokenizer, "sys", IMAGES), atol=1e-4)
    bf16 = unipercept.load_unipercept(folder, "cpu", torch.bfloat16)[0]
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("value, text", [(None, "None"), ("", ""), ("Rate", "Rate")])
def test_a_system_message_key_wins_even_when_null_as_the_official_hasattr(unipercept_files, monkeypatch, value, text):
    """InternVL-chat / UniPercept read `hasattr(config, "system_message")`: `"system_message": null` gives the literal
    system text "None" and "" an empty one; only a config without the key falls back to the template default."""
    root, model, tokenizer = unipercept_files
    monkeypatch.setenv("HARNESS_DATA", str(root / "data"))
    original = json.loads((root / "model" / "config.json").read_text())
    folder = model_variant(root, f"internvl3_system_{text or 'empty'}", internvl3_shaped_config(original, system_message=value))
    got, _, system = ours(folder, IMAGES)
    assert system == text
    expected = reference_scores(model, tokenizer, text, IMAGES)
    assert np.allclose(got, expected, atol=1e-4)
    # the test can tell: the default system text scores differently on this model
    assert np.abs(expected - reference_scores(model, tokenizer, PROMPTS["system_message"], IMAGES)).max() > 1e-4


def test_config_defaults_follow_internvl_chat():
    """force_image_size is the tile size (it must equal the vision tower's), tie_word_embeddings is always False,
    and vision keys a config leaves out take InternViT's class defaults."""
    base = {"vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1,
                              "image_size": 448, "patch_size": 14},
            "llm_config": {"model_type": "qwen2", "vocab_size": 10, "hidden_size": 16, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 32,
                           "tie_word_embeddings": True, "torch_dtype": "bfloat16"},
            "ps_version": "v2", "force_image_size": 448}
    config = unipercept.transformers_config(base, 9)
    assert config.tie_word_embeddings is False and config.text_config.tie_word_embeddings is False
    assert config.text_config.dtype is None            # the saved bf16 is not carried over
    v = config.vision_config
    assert (v.attention_bias, v.use_qk_norm, v.norm_type) == (False, True, "rms_norm")
    assert unipercept.num_image_token(base) == 256
    with pytest.raises(ValueError, match="force_image_size"):
        unipercept.transformers_config({**base, "force_image_size": 224}, 9)
