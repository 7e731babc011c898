"""Tiny random replicas of MMaDA and Lumina-DiMOO, written in the official on-disk formats.

They exercise the real loading code end to end without the 8B weights: config.json with LLaDA's
key names, safetensors with the official tensor names, a tokenizer directory that AutoTokenizer
loads offline, and the VQ in its own format (MAGVIT-v2 in magvitv2/, a diffusers VQModel in
vqvae/). The vocabulary rows are the real ones (134656 for MMaDA, 134548 for DiMOO) because the
special and image-token ids are fixed; everything else is small (d_model 16, 2 layers).
Used by tests/test_adapters.py and `benchmarks/gpu_check.py --replicas`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from harness.backbones import lumina_dimoo, mmada
from harness.backbones.llada import LLaDA, LLaDAConfig, write_llada_checkpoint
from harness.backbones.magvit import MagvitConfig, MagvitV2, write_magvit_checkpoint

MMADA_VOCAB_ROWS = 134656          # MMaDA's new_vocab_size
WORDS = ("a an the photo of two red green blue yellow cube sphere cat dog dogs and on to left right above below "
         "Generate image according text prompt .").split()
WORD_ID_START = 1000               # plain words get ids 1000.. (clear of every fixed special id)


def write_word_tokenizer(directory: str | Path, special: dict[str, int], *, bos: str | None = None,
                         eos: str | None = None) -> Path:
    """A word-level fast tokenizer whose special tokens have exactly the given ids."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"[UNK]": 0, **{w: WORD_ID_START + i for i, w in enumerate(WORDS)}, **special}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token=bos, eos_token=eos)
    fast.save_pretrained(str(directory))
    return Path(directory)


def tiny_llada(rows: int, seed: int, d_model: int = 16, n_layers: int = 2, n_heads: int = 2) -> LLaDA:
    config = LLaDAConfig(d_model=d_model, n_layers=n_layers, n_heads=n_heads, mlp_hidden_size=2 * d_model,
                         embedding_size=rows, rope_theta=500000.0)
    # std 1: a random replica whose logits actually depend on their inputs
    return LLaDA(config).init_weights(std=1.0 / d_model ** 0.5, generator=torch.Generator().manual_seed(seed))


def make_mmada_replica(directory: str | Path, *, seed: int = 0, d_model: int = 16, n_layers: int = 2) -> Path:
    """<dir>/config.json, model.safetensors, tokenizer files, magvitv2/ (a 16x MAGVIT-v2 with ch 16)."""
    directory = Path(directory)
    model = tiny_llada(MMADA_VOCAB_ROWS, seed, d_model, n_layers)
    write_llada_checkpoint(model, directory, {"new_vocab_size": MMADA_VOCAB_ROWS, "llm_vocab_size": 126464,
                                              "codebook_size": 8192, "mask_token_id": mmada.MASK_ID})
    write_word_tokenizer(directory, {"<|startoftext|>": mmada.BOS, "<|endoftext|>": mmada.EOS},
                         bos="<|startoftext|>", eos="<|endoftext|>")
    torch.manual_seed(seed)
    vq = MagvitV2(MagvitConfig(ch=16, encoder_ch_mult=(1, 1, 1, 1, 1), encoder_num_res_blocks=(1, 1, 1, 1, 1),
                               decoder_ch_mult=(1, 1, 1, 1, 1), decoder_num_res_blocks=(1, 1, 1, 1, 1), norm_groups=8))
    write_magvit_checkpoint(vq, directory / "magvitv2")
    return directory


def make_dimoo_replica(directory: str | Path, *, seed: int = 0, d_model: int = 16, n_layers: int = 2) -> Path:
    """<dir>/config.json, model.safetensors, tokenizer files, vqvae/ (a 16x diffusers VQModel, 8192 codes)."""
    from diffusers import VQModel
    directory = Path(directory)
    model = tiny_llada(lumina_dimoo.LOGIT_WIDTH, seed, d_model, n_layers)
    write_llada_checkpoint(model, directory, {"mask_token_id": lumina_dimoo.MASK_ID})
    write_word_tokenizer(directory, {"<system>": 2001, "</system>": 2002, "<user>": 2003, "</user>": 2004,
                                     "<uncondition>": lumina_dimoo.UNCONDITION})
    torch.manual_seed(seed)
    vq = VQModel(down_block_types=("DownEncoderBlock2D",) * 5, up_block_types=("UpDecoderBlock2D",) * 5,
                 block_out_channels=(8,) * 5, layers_per_block=1, latent_channels=4, vq_embed_dim=4,
                 num_vq_embeddings=lumina_dimoo.CODEBOOK_SIZE, norm_num_groups=4, lookup_from_codebook=True)
    vq.save_pretrained(str(directory / "vqvae"))
    return directory
