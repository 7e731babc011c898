"""Test-wide settings: offline, one torch thread per worker (the CI box has 2 cores)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


# --- tiny CLIP (the GenEval colour classifier and the preference scorers) ----------------------------------------

LETTERS = "abcdefghijklmnopqrstuvwxyz-"
# A few merges so the BPE path is exercised ("red" and "photo" become single tokens).
MERGES = [("r", "e"), ("re", "d</w>"), ("p", "h"), ("ph", "o"), ("o", "t"), ("ot", "o</w>")]


def write_tiny_clip(folder) -> None:
    """A random 2-layer CLIP plus a CLIP BPE tokenizer over lowercase letters, saved as a HF folder."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(LETTERS) + [c + "</w>" for c in LETTERS]
    tokens += [a + b for a, b in MERGES]
    vocab = {t: i for i, t in enumerate(tokens)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0,
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    write_tiny_clip(folder)
    return folder



@pytest.fixture(scope="session")
def word_level_tokenizer():
    """A factory: a fast tokenizer over whole words (unknown ones -> [UNK]) with `specials` kept as single tokens;
    stands in for the VLM scorers' real tokenizers offline."""
    def build(words: list[str], specials: list[str], **kwargs):
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {t: i for i, t in enumerate(["[UNK]"] + words + specials)}
        core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
        core.pre_tokenizer = pre_tokenizers.Whitespace()
        return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token=specials[0],
                                       additional_special_tokens=specials[1:], **kwargs)
    return build
