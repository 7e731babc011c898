"""MMaDA-8B (Gen-Verse/MMaDA) behind the Backbone protocol: LLaDA-8B + MAGVIT-v2, text-to-image.

Facts used (../shared backbones.md §1):
- Sequence (L = 513 + 1 + N + 1; N = 1024 at the released 512 px):
      [iPAD]*(513-n) <|t2i|> <bos> text <eos> | <|soi|> | N image slots | <|eoi|>
  the prompt part is left-padded to exactly max_text_len + 1 = 513 tokens; the text is the raw
  tokenizer output (no chat template) with BOS prepended if missing; too long: cut to 512 and end
  with EOS. Attention is False on the pads only.
- Unconditional prompt (CFG): the empty text, i.e. [iPAD]*510 <|t2i|> <bos> <eos>, same image part.
- Image slot = code + 126349 (len of the LLaDA tokenizer), or [MASK] 126336; logits are read at
  the slots, over head rows [126349, 126349 + 8192) only, as the sampler and MaskGRPO do.
- Attention bias from the padding mask only (never causal), see harness.backbones.llada.
- MAGVIT-v2 takes pixels in [-1, 1]; decode output is mapped by clamp((x + 1) / 2, 0, 1).

Files: a local directory (or the HF cache entry of Gen-Verse/MMaDA-8B-Base, HF_HUB_OFFLINE works)
with config.json, *.safetensors and the tokenizer files; MAGVIT-v2 from `vq_path`, else a
`magvitv2/` folder inside the model directory, else the HF cache entry of showlab/magvitv2.
"""
from __future__ import annotations

from pathlib import Path

import torch

from harness.backbones import hub
from harness.backbones.base import MASKED, PromptBatch
from harness.backbones.llada import LLaDA, LLaDAImageBackbone, load_llada_backbone
from harness.backbones.magvit import MODEL_ID as MAGVIT_ID, MagvitV2, load_magvit

MODEL_ID = "Gen-Verse/MMaDA-8B-Base"
LAYOUT = (f"a directory like the HF repo {MODEL_ID}: config.json (LLaDA keys), *.safetensors "
          "(keys model.transformer.*), tokenizer files (tokenizer.json / tokenizer_config.json); "
          f"MAGVIT-v2 weights from {MAGVIT_ID} (pass vq_path, or put them in <dir>/magvitv2)")

CODE_OFFSET = 126349      # image id = code + 126349
MASK_ID = 126336
SOI, EOI, T2I, PAD = 126084, 126085, 126088, 126093   # <|soi|>, <|eoi|>, <|t2i|>, [iPAD]
BOS, EOS = 126080, 126081                             # <|startoftext|>, <|endoftext|> of the LLaDA tokenizer
CODEBOOK_SIZE = 8192
MAX_TEXT_LEN = 512        # the prompt part is MAX_TEXT_LEN + 1 = 513 tokens


class MMaDABackbone(LLaDAImageBackbone):
    name = "mmada"
    CODE_OFFSET, CODEBOOK_SIZE = CODE_OFFSET, CODEBOOK_SIZE

    def __init__(self, module: LLaDA, tokenizer, vq: MagvitV2, *, resolution: int = 512,
                 max_text_len: int = MAX_TEXT_LEN):
        if resolution % 16:
            raise ValueError(f"MMaDA resolution {resolution} is not a multiple of 16 (MAGVIT-v2 downsamples 16x)")
        rows = module.head[0].shape[0]
        if rows < CODE_OFFSET + CODEBOOK_SIZE:
            raise ValueError(f"the checkpoint's head has {rows} rows; MMaDA needs at least "
                             f"{CODE_OFFSET} + {CODEBOOK_SIZE} = {CODE_OFFSET + CODEBOOK_SIZE} (released: 134656)")
        for attr, want in (("bos_token_id", BOS), ("eos_token_id", EOS)):
            if getattr(tokenizer, attr, None) != want:
                raise ValueError(f"tokenizer {attr} is {getattr(tokenizer, attr, None)}, MMaDA's layout needs {want}; "
                                 "is this the MMaDA / LLaDA tokenizer?")
        self.module = module
        self.tokenizer = tokenizer
        self.vq = vq
        self.prompt_len = max_text_len + 1
        self.grid = (resolution // 16, resolution // 16)
        self.image_size = (resolution, resolution)
        self.codebook_size = CODEBOOK_SIZE
        self.text_mask_id = MASK_ID
        self.lora: dict | None = None

    # --- prompts ---------------------------------------------------------------------------------

    def prompt_row(self, text: str) -> tuple[list[int], list[bool]]:
        """The 513-token left-padded prompt part and which of its tokens are prompt text (maskable)."""
        ids = list(self.tokenizer(text)["input_ids"])
        if not ids or ids[0] != BOS:
            ids = [BOS] + ids
        row = [T2I] + ids + [EOS]
        maskable = [False, False] + [i not in (BOS, EOS) for i in ids[1:]] + [False]
        if len(row) > self.prompt_len:   # keep the head of the text, force EOS last
            row, maskable = row[:self.prompt_len - 1] + [EOS], maskable[:self.prompt_len - 1] + [False]
        pad = self.prompt_len - len(row)
        return [PAD] * pad + row, [False] * pad + maskable

    def _batch(self, texts: list[str], uncond: bool = False) -> PromptBatch:
        rows = [self.prompt_row(t) for t in texts]     # the unconditional prompt is the empty text
        ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
        maskable = torch.tensor([r[1] for r in rows], dtype=torch.bool)
        attn = ids != PAD
        return PromptBatch(ids=ids, attn=attn, maskable=maskable, texts=list(texts), pad_id=PAD,
                           pad_side="left").to(self.device)

    # --- the forward -----------------------------------------------------------------------------

    def build_inputs(self, prompts: PromptBatch, codes: torch.LongTensor):
        """(input_ids [B, L], key_mask [B, L], slot positions [B, N]) of the T2I sequence."""
        if prompts.pad_side != "left":
            raise ValueError("MMaDA prompts are left-padded; build them with MMaDABackbone.tokenize/uncond")
        n = self.grid[0] * self.grid[1]
        hub.check_codes(codes, n, CODEBOOK_SIZE, len(prompts))
        b, lp = prompts.ids.shape
        device = prompts.ids.device
        codes = codes.to(device)
        slots = torch.where(codes == MASKED, torch.full_like(codes, MASK_ID), codes + CODE_OFFSET)
        ids = torch.cat([prompts.ids, torch.full((b, 1), SOI, device=device), slots,
                         torch.full((b, 1), EOI, device=device)], dim=1)
        key_mask = torch.cat([prompts.attn, torch.ones(b, n + 2, dtype=torch.bool, device=device)], dim=1)
        positions = (lp + 1 + torch.arange(n, device=device)).expand(b, n)
        return ids, key_mask, positions

    # --- pixels ----------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, codes: torch.LongTensor) -> torch.Tensor:
        hub.check_codes(codes, self.grid[0] * self.grid[1], CODEBOOK_SIZE, allow_masked=False)
        device = next(self.vq.parameters()).device
        pixels = self.vq.decode_code(codes.to(device), shape=self.grid)
        return ((pixels.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.LongTensor:
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(f"MMaDA encodes {self.image_size} images, got {tuple(images.shape[-2:])}; "
                             "resize (short side, bicubic) and center-crop first, as upstream")
        device = next(self.vq.parameters()).device
        return self.vq.get_code(images.to(device).float() * 2 - 1).to(self.device)


def load_mmada(path: str | Path = MODEL_ID, device: str | torch.device = "cpu", dtype: str | torch.dtype = "bfloat16",
               lora: dict | str | Path | None = None, *, vq_path: str | Path | None = None, tokenizer=None,
               resolution: int = 512, max_text_len: int = MAX_TEXT_LEN,
               gradient_checkpointing: bool = False) -> MMaDABackbone:
    """MMaDA from a local directory or the HF cache.

    lora: None; a dict {r, alpha, dropout, targets} for a fresh adapter; or a file written by
    `save` (adapter weights + settings). The VQ stays fp32 (it is small and runs once per image).
    """
    path = MODEL_ID if path is None else path
    directory = hub.resolve_model_dir(path, model_id=MODEL_ID, layout=LAYOUT)
    if tokenizer is None:
        tokenizer = hub.load_tokenizer(directory, model_id=MODEL_ID, layout=LAYOUT, padding_side="left")
    if vq_path is None:
        vq_path = directory / "magvitv2" if (directory / "magvitv2").is_dir() else MAGVIT_ID
    vq = load_magvit(vq_path, device=device)
    return load_llada_backbone(
        directory, lambda module: MMaDABackbone(module, tokenizer, vq, resolution=resolution, max_text_len=max_text_len),
        device=device, dtype=dtype, model_id=MODEL_ID, layout=LAYOUT, lora=lora,
        gradient_checkpointing=gradient_checkpointing)
