"""Lumina-DiMOO (Alpha-VLLM/Lumina-DiMOO) behind the Backbone protocol: LLaDA-8B + aMUSEd-style VQ.

Facts used (../shared backbones.md §2):
- Prompt: tokenizer(text)["input_ids"] with the tokenizer as-is, where
      cond   text = "<system>Generate an image according to the text prompt.</system><user>{prompt}</user>"
      uncond text = "<system>Generate an image according to the text prompt.</system><user><uncondition></user>"
- Image part, for an h x w grid (h = H/16, w = W/16, any H, W multiple of 16):
      [<answer> 126354, <IMAGE> 126349] + rows([slot]*w + [NEWLINE 126084])*h + [</IMAGE> 126350, </answer> 126355]
  directly after each sample's own prompt tokens; the batch is right-padded after that, so every
  sample's positions start at 0 and its text-to-image geometry does not depend on the batch.
- Image slot = code + 126356, or [MASK] 126336. The head must have 126356 + 8192 = 134548 rows
  (the upstream generator infers the offset as width - 8192), checked at load.
- Attention bias from the padding mask only (never causal), see harness.backbones.llada.
- VQ: diffusers VQModel in the `vqvae` subfolder, 16x; encode takes pixels in [0, 1]; decode looks
  codes up in the codebook (`force_not_quantize=True, shape=(B, h, w, C)`) and clips to [0, 1].

The grid is fixed per backbone object (the protocol's `grid`); `at_resolution(H, W)` gives a view
at another resolution that shares the weights.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from harness.backbones import hub
from harness.backbones.base import MASKED, PromptBatch
from harness.backbones.llada import LLaDA, LLaDAImageBackbone, load_llada_backbone

MODEL_ID = "Alpha-VLLM/Lumina-DiMOO"
LAYOUT = (f"a directory like the HF repo {MODEL_ID}: config.json (LLaDA keys) and *.safetensors (keys "
          "model.transformer.*) at the root, tokenizer files at the root, and the diffusers VQModel in "
          "vqvae/ (config.json + diffusion_pytorch_model.safetensors)")

CODE_OFFSET = 126356
MASK_ID = 126336
NEWLINE = 126084
BOI, EOI = 126349, 126350        # <IMAGE>, </IMAGE>
BOA, EOA = 126354, 126355        # <answer>, </answer>
UNCONDITION = 126351             # <uncondition> (appears through the uncond text's tokenisation)
CODEBOOK_SIZE = 8192
LOGIT_WIDTH = CODE_OFFSET + CODEBOOK_SIZE     # 134548
PAD_ID = 0                       # upstream right-pads with 0 (masked out anyway)
SYSTEM = "<system>Generate an image according to the text prompt.</system>"
COND_TEMPLATE = SYSTEM + "<user>{prompt}</user>"
UNCOND_TEXT = SYSTEM + "<user><uncondition></user>"


class LuminaDiMOOBackbone(LLaDAImageBackbone):
    name = "lumina-dimoo"
    CODE_OFFSET, CODEBOOK_SIZE = CODE_OFFSET, CODEBOOK_SIZE

    def __init__(self, module: LLaDA, tokenizer, vq, *, height: int = 1024, width: int = 1024):
        rows = module.head[0].shape[0]
        if rows != LOGIT_WIDTH:
            raise ValueError(f"Lumina-DiMOO's head must have {CODE_OFFSET} + {CODEBOOK_SIZE} = {LOGIT_WIDTH} rows "
                             f"(image id = code + {CODE_OFFSET}); the checkpoint has {rows}")
        self.module = module
        self.tokenizer = tokenizer
        self.vq = vq
        self.codebook_size = CODEBOOK_SIZE
        self.text_mask_id = MASK_ID
        self.lora: dict | None = None
        self._set_resolution(height, width)

    def _set_resolution(self, height: int, width: int) -> None:
        if height % 16 or width % 16 or height <= 0 or width <= 0:
            raise ValueError(f"Lumina-DiMOO needs height and width that are positive multiples of 16, got {height}x{width}")
        self.grid = (height // 16, width // 16)
        self.image_size = (height, width)

    def at_resolution(self, height: int, width: int) -> "LuminaDiMOOBackbone":
        """The same model (shared weights, adapter and all) generating height x width images."""
        other = copy.copy(self)
        other._set_resolution(height, width)
        return other

    # --- prompts ---------------------------------------------------------------------------------

    def prompt_row(self, text: str, *, uncond: bool = False) -> tuple[list[int], list[bool]]:
        """Prompt token ids and which of them come from the user's prompt (maskable)."""
        full = UNCOND_TEXT if uncond else COND_TEMPLATE.format(prompt=text)
        if uncond or not text:
            ids = list(self.tokenizer(full)["input_ids"])
            return ids, [False] * len(ids)
        start = full.index("<user>") + len("<user>")
        end = start + len(text)
        try:
            enc = self.tokenizer(full, return_offsets_mapping=True)
            spans = enc["offset_mapping"]
        except (NotImplementedError, ValueError, TypeError, KeyError):
            enc, spans = self.tokenizer(full), None
        ids = list(enc["input_ids"])
        if spans is not None:
            maskable = [e > s and s >= start and e <= end for s, e in spans]
        else:   # slow tokenizer: the tokens between the template's own prefix and suffix tokens
            head = len(self.tokenizer(full[:start])["input_ids"])
            tail = len(self.tokenizer(full[end:], add_special_tokens=False)["input_ids"])
            maskable = [head <= i < len(ids) - tail for i in range(len(ids))]
        return ids, maskable

    def _batch(self, texts: list[str], uncond: bool) -> PromptBatch:
        rows = [self.prompt_row(t, uncond=uncond) for t in texts]
        length = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
        attn = torch.zeros(len(rows), length, dtype=torch.bool)
        maskable = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, (row, mk) in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
            attn[i, :len(row)] = True
            maskable[i, :len(row)] = torch.tensor(mk)
        return PromptBatch(ids=ids, attn=attn, maskable=maskable, texts=list(texts), pad_id=PAD_ID,
                           pad_side="right").to(self.device)

    # --- the forward -----------------------------------------------------------------------------

    def image_part(self, codes: torch.LongTensor) -> tuple[torch.LongTensor, torch.LongTensor]:
        """ids [B, M] of BOA, BOI, the rows with NEWLINE, EOI, EOA; and the N slot offsets within it."""
        h, w = self.grid
        b = codes.shape[0]
        slots = torch.where(codes == MASKED, torch.full_like(codes, MASK_ID), codes + CODE_OFFSET).view(b, h, w)
        rows = torch.cat([slots, torch.full((b, h, 1), NEWLINE, dtype=torch.long, device=codes.device)], dim=2)
        head = torch.tensor([BOA, BOI], device=codes.device).expand(b, 2)
        tail = torch.tensor([EOI, EOA], device=codes.device).expand(b, 2)
        part = torch.cat([head, rows.view(b, h * (w + 1)), tail], dim=1)
        r, c = torch.meshgrid(torch.arange(h, device=codes.device), torch.arange(w, device=codes.device), indexing="ij")
        return part, (2 + r * (w + 1) + c).reshape(-1)

    def build_inputs(self, prompts: PromptBatch, codes: torch.LongTensor):
        """(input_ids [B, L], key_mask [B, L], slot positions [B, N]): each sample's prompt, then its image part, then pads."""
        if prompts.pad_side != "right":
            raise ValueError("Lumina-DiMOO prompts are right-padded; build them with LuminaDiMOOBackbone.tokenize/uncond")
        hub.check_codes(codes, self.grid[0] * self.grid[1], CODEBOOK_SIZE, len(prompts))
        device = prompts.ids.device
        b, lp = prompts.ids.shape
        lengths = prompts.attn.sum(1)
        if not torch.equal(prompts.attn, torch.arange(lp, device=device)[None] < lengths[:, None]):
            raise ValueError("Lumina-DiMOO prompt attention must be True on a prefix (right padding)")
        part, slot_offsets = self.image_part(codes.to(device))
        m = part.shape[1]
        ids = torch.full((b, lp + m), PAD_ID, dtype=torch.long, device=device)
        ids[:, :lp] = prompts.ids.masked_fill(~prompts.attn, PAD_ID)
        ids.scatter_(1, lengths[:, None] + torch.arange(m, device=device)[None], part)
        key_mask = torch.arange(lp + m, device=device)[None] < (lengths + m)[:, None]
        positions = lengths[:, None] + slot_offsets[None]
        return ids, key_mask, positions

    # --- pixels ----------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, codes: torch.LongTensor) -> torch.Tensor:
        h, w = self.grid
        hub.check_codes(codes, h * w, CODEBOOK_SIZE, allow_masked=False)
        device = next(self.vq.parameters()).device
        dim = self.vq.quantize.embedding.weight.shape[1]
        out = self.vq.decode(codes.to(device), force_not_quantize=True, shape=(codes.shape[0], h, w, dim)).sample
        return out.float().clamp(0, 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.LongTensor:
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(f"this Lumina-DiMOO view encodes {self.image_size} images, got {tuple(images.shape[-2:])}; "
                             "use at_resolution(H, W) with H, W multiples of 16")
        device = next(self.vq.parameters()).device
        x = images.to(device=device, dtype=next(self.vq.parameters()).dtype)
        latents = self.vq.encode(x).latents
        return self.vq.quantize(latents)[2][2].reshape(images.shape[0], -1).to(self.device)

    def save_metadata(self) -> dict:
        return {"height": self.image_size[0], "width": self.image_size[1]}


def load_vqvae(directory: Path, device: str | torch.device = "cpu"):
    from diffusers import VQModel
    if not (directory / "vqvae" / "config.json").exists():
        raise FileNotFoundError(f"{directory / 'vqvae'} has no config.json. Expected layout: {LAYOUT}")
    vq = VQModel.from_pretrained(str(directory), subfolder="vqvae", local_files_only=True)
    scale = 2 ** (len(vq.config.block_out_channels) - 1)
    if scale != 16 or vq.config.num_vq_embeddings != CODEBOOK_SIZE:
        raise ValueError(f"{directory / 'vqvae'}: expected a 16x VQ with {CODEBOOK_SIZE} codes, found "
                         f"{scale}x with {vq.config.num_vq_embeddings}")
    return vq.to(device).eval()


def load_lumina_dimoo(path: str | Path = MODEL_ID, device: str | torch.device = "cpu",
                      dtype: str | torch.dtype = "bfloat16", lora: dict | str | Path | None = None, *,
                      tokenizer=None, height: int = 1024, width: int = 1024, trust_remote_code: bool = False,
                      gradient_checkpointing: bool = False) -> LuminaDiMOOBackbone:
    """Lumina-DiMOO from a local directory or the HF cache; see load_mmada for `lora`.

    Upstream loads the tokenizer with trust_remote_code=True; that runs code from the model
    directory, so it is off unless asked for (the LLaDA tokenizer loads without it).
    """
    path = MODEL_ID if path is None else path
    directory = hub.resolve_model_dir(path, model_id=MODEL_ID, layout=LAYOUT)
    if tokenizer is None:
        tokenizer = hub.load_tokenizer(directory, model_id=MODEL_ID, layout=LAYOUT, trust_remote_code=trust_remote_code)
    vq = load_vqvae(directory, device)
    return load_llada_backbone(
        directory, lambda module: LuminaDiMOOBackbone(module, tokenizer, vq, height=height, width=width),
        device=device, dtype=dtype, model_id=MODEL_ID, layout=LAYOUT, lora=lora,
        gradient_checkpointing=gradient_checkpointing)
