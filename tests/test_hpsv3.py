"""HPSv3 (evaluators/hpsv3.py) on a tiny random Qwen2-VL saved in the official checkpoint's (transformers <= 4.51)
key layout, with a tiny tokenizer, Qwen2-VL's image processor and a Qwen-style chat template: the score must be
the RankNet head's mu at the <|Reward|> token of the original model run with sequential positions."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evaluators import hpsv3
from evaluators.base import Sample
from harness import registry

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
WORDS = ["system", "user", "assistant", "You", "are", "a", "helpful", "rate", "this", "image", "for",
         "photo", "of", "red", "dog", "cat", "score", "end", "now"]
TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}<|vision_start|><|image_pad|>"
    "<|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
INSTRUCTION = {"instruction": "rate this image for {text_prompt} now", "suffix": " score <|Reward|> end"}


@pytest.fixture(scope="module")
def hpsv3_files(tmp_path_factory, word_level_tokenizer):
    """(base folder, checkpoint folder, original model, head tensors)."""
    from safetensors.torch import save_file
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from transformers import Qwen2VLImageProcessor

    root = tmp_path_factory.mktemp("hpsv3")
    tokenizer = word_level_tokenizer(WORDS, SPECIAL, eos_token="<|im_end|>")
    n_tokens = len(tokenizer) + 1               # + <|Reward|>
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=n_tokens, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, in_chans=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    tokenizer.save_pretrained(root / "base")
    (root / "base" / "chat_template.jinja").write_text(TEMPLATE)     # as newer HF repos ship it
    Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 1280).save_pretrained(root / "base")
    config.save_pretrained(root / "base")
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).eval()
    old_layout = {}
    for key, value in model.state_dict().items():       # transformers <= 4.51 names, as in HPSv3.safetensors
        key = key.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        old_layout[key] = value.detach().clone().contiguous()
    head = {f"rm_head.{i}.{p}": 0.1 * torch.randn(*shape) for i, (n_in, n_out) in ((0, (64, 1024)), (3, (1024, 16)),
                                                                                    (5, (16, 2)))
            for p, shape in (("weight", (n_out, n_in)), ("bias", (n_out,)))}
    (root / "ckpt").mkdir()
    save_file({**old_layout, **head}, str(root / "ckpt" / hpsv3.CHECKPOINT_NAME))
    (root / "data" / "hpsv3").mkdir(parents=True)
    (root / "data" / "hpsv3" / "instruction.json").write_text(json.dumps(INSTRUCTION))
    return root, model, head


@pytest.fixture()
def hpsv3_env(hpsv3_files, monkeypatch):
    root, model, head = hpsv3_files
    monkeypatch.setenv(hpsv3.DIR_ENV, str(root / "ckpt"))
    monkeypatch.setenv(hpsv3.BASE_ENV, str(root / "base"))
    monkeypatch.setenv("HARNESS_DATA", str(root / "data"))
    monkeypatch.setattr(hpsv3, "_LOADED", {})
    return hpsv3_files


def test_smart_resize_follows_qwen2vl():
    assert hpsv3.smart_resize(512, 512) == (448, 448) and hpsv3.smart_resize(1024, 1024) == (448, 448)
    for height, width in ((200, 300), (1000, 250), (37, 41)):
        h, w = hpsv3.smart_resize(height, width)
        assert h % 28 == 0 and w % 28 == 0 and h * w >= hpsv3.PIXELS
        assert abs(h / w - height / width) / (height / width) < 0.15


def test_hpsv3_is_mu_at_the_reward_token_with_sequential_positions(hpsv3_env):
    root, model, head_state = hpsv3_env
    rng = np.random.default_rng(0)
    items = [Sample(key=f"{i:05d}/0000", metadata={"tag": "dense", "prompt": p},
                    image=rng.integers(0, 256, (512, 512 - 64 * i, 3), dtype=np.uint8))
             for i, p in enumerate(["a red dog", "a photo of a cat"])]
    evaluator = registry.get("evaluators", "hpsv3")
    evaluator.check_ready()
    got = np.array([evaluator.score(items)[s.key]["score"] for s in items])

    _, _, inputs = hpsv3._LOADED[str(root / "ckpt" / hpsv3.CHECKPOINT_NAME)]
    batch = inputs([s.metadata["prompt"] for s in items], [s.image for s in items], INSTRUCTION)
    assert batch["image_grid_thw"][0].tolist() == [1, 32, 32]          # 512 x 512 -> 448 x 448
    image_id = inputs.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert ((batch["input_ids"] == image_id).sum(1) == batch["image_grid_thw"].prod(-1) // 4).all()
    reward_id = inputs.tokenizer.convert_tokens_to_ids(hpsv3.REWARD_TOKEN)
    assert reward_id == len(inputs.tokenizer) - 1 and ((batch["input_ids"] == reward_id).sum(1) == 1).all()
    lengths = batch["attention_mask"].sum(1)
    assert lengths[0] != lengths[1] and (batch["attention_mask"][:, 0] == 1).all()     # right padding
    at = batch["input_ids"] == reward_id
    seq = torch.arange(batch["input_ids"].shape[1]).view(1, 1, -1).expand(3, 2, -1)
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=seq,
                             pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"]).last_hidden_state
        x = hidden[at]
        x = torch.relu(x @ head_state["rm_head.0.weight"].T + head_state["rm_head.0.bias"])
        x = torch.relu(x @ head_state["rm_head.3.weight"].T + head_state["rm_head.3.bias"])
        mu = (x @ head_state["rm_head.5.weight"].T + head_state["rm_head.5.bias"])[:, 0]
        types = (batch["input_ids"] == image_id).int()       # 1 = image token, as the processor marks them
        mrope = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            mm_token_type_ids=types, pixel_values=batch["pixel_values"],
                            image_grid_thw=batch["image_grid_thw"]).last_hidden_state[at]
    assert np.allclose(got, mu.numpy(), atol=1e-4)
    assert not torch.allclose(mrope, hidden[at], atol=1e-3)      # the 3D image positions would change the score


def test_hpsv3_missing_files_and_foreign_checkpoints_are_named(hpsv3_files, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    root, _, _ = hpsv3_files
    evaluator = registry.get("evaluators", "hpsv3")
    monkeypatch.delenv(hpsv3.DIR_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="MizzenAI/HPSv3"):
        evaluator.check_ready()
    monkeypatch.setenv(hpsv3.DIR_ENV, str(root / "ckpt"))
    monkeypatch.setenv(hpsv3.BASE_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="lacks config.json"):
        evaluator.check_ready()
    monkeypatch.setenv(hpsv3.BASE_ENV, str(root / "base"))
    monkeypatch.setenv("HARNESS_DATA", str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="harness data fetch hpsv3"):
        evaluator.check_ready()

    state = load_file(str(root / "ckpt" / hpsv3.CHECKPOINT_NAME))
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:-1]       # no row for <|Reward|>
    save_file(state, str(tmp_path / "short.safetensors"))
    with pytest.raises(ValueError, match="embedding has"):
        hpsv3.load_hpsv3(tmp_path / "short.safetensors", root / "base", "cpu", torch.float32)


def test_the_instruction_is_read_from_the_wheel_as_data_and_checked(tmp_path, monkeypatch):
    """`harness data fetch hpsv3` takes the two string constants out of the wheel's module with ast (nothing is
    run), and refuses a wheel other than the pinned one."""
    import io
    import zipfile

    from evaluators import data

    source = 'INSTRUCTION = """\nrate {text_prompt}\n"""\nprompt_with_special_token = "<|Reward|>"\nx = f()\n'
    assert data.hpsv3_instruction_from_source(source) == {"instruction": "\nrate {text_prompt}\n", "suffix": "<|Reward|>"}
    with pytest.raises(data.FetchError, match="suffix"):
        data.hpsv3_instruction_from_source('INSTRUCTION = "x"\n')
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        wheel.writestr(data.HPSV3_SOURCE_FILE, source)
    (tmp_path / "hpsv3-1.0.0-py3-none-any.whl").write_bytes(buffer.getvalue())
    with pytest.raises(data.FetchError, match="sha256"):
        data.fetch("hpsv3", dest=tmp_path / "d", prompts=tmp_path / "hpsv3-1.0.0-py3-none-any.whl")
    assert not (tmp_path / "d" / "hpsv3").exists()
    monkeypatch.setenv("HARNESS_OFFLINE", "1")
    with pytest.raises(data.FetchError, match="HARNESS_OFFLINE"):
        data.fetch("hpsv3", dest=tmp_path / "d")
