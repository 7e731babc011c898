"""MAGVIT-v2 image tokenizer of Show-o / MMaDA: a conv VQGAN with lookup-free quantisation (LFQ).

Facts (../shared backbones.md §1.2): 13-bit LFQ, so 8192 codes; encoder channel multipliers
(1, 2, 2, 4, 4), four downsamples = 16x; pixels in [-1, 1] both ways; `get_code(pixels) -> [B, h*w]`,
`decode_code(codes) -> pixels`. A code is sum_k 2^(12-k) [z_k > 0] over the 13 latent channels,
and the latent of a code is its bits (most significant first) mapped to -1/+1.

The layer-level structure and key names below follow Show-o's `models/modeling_magvitv2.py` and
`models/common_modules.py` (taming-transformers style), read through the search index; they are
NOT in backbones.md, so treat them as unverified against the `showlab/magvitv2` weight file:

    encoder.conv_in, encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut},
    encoder.down.{i}.downsample.conv, encoder.mid.{block_1,attn_1,block_2},
    encoder.mid.attn_1.{norm,q,k,v,proj_out}, encoder.norm_out, encoder.conv_out, encoder.quant_conv,
    decoder.post_quant_conv, decoder.conv_in, decoder.mid.*, decoder.up.{i}.block.{j}.*,
    decoder.up.{i}.upsample.conv, decoder.norm_out, decoder.conv_out,
    quantize.embedding [8192, 13], quantize.power_vals [13]   (buffers; optional when loading)

Show-o's defaults: ch 128; encoder ch_mult (1,2,2,4,4), res blocks (4,3,4,3,4); decoder ch_mult
(1,1,2,2,4), res blocks (4,4,3,4,3); GroupNorm(32, eps 1e-6); swish; attention only in the middle
(its attn_resolutions=[5] is never reached at 256/512 px, so levels carry no attention modules).
Downsample pads (0,1,0,1) then a stride-2 3x3 conv; Upsample is nearest 2x then a 3x3 conv.
The official MAGViTv2 takes no constructor arguments, so its config.json carries no architecture:
our loader reads optional architecture keys from config.json (used by tiny replicas) and falls
back to the defaults above.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.backbones import hub

MODEL_ID = "showlab/magvitv2"
LAYOUT = "config.json and the weights as *.safetensors (or pytorch_model.bin) with keys encoder.*, decoder.*, quantize.*"


@dataclass
class MagvitConfig:
    ch: int = 128
    encoder_ch_mult: tuple[int, ...] = (1, 2, 2, 4, 4)
    encoder_num_res_blocks: tuple[int, ...] = (4, 3, 4, 3, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_num_res_blocks: tuple[int, ...] = (4, 4, 3, 4, 3)
    z_channels: int = 13          # LFQ bits: codebook = 2 ** z_channels
    in_ch: int = 3
    out_ch: int = 3
    norm_groups: int = 32

    def __post_init__(self):
        self.encoder_ch_mult, self.decoder_ch_mult = tuple(self.encoder_ch_mult), tuple(self.decoder_ch_mult)
        self.encoder_num_res_blocks = tuple(self.encoder_num_res_blocks)
        self.decoder_num_res_blocks = tuple(self.decoder_num_res_blocks)
        if len(self.encoder_ch_mult) != len(self.encoder_num_res_blocks) or \
                len(self.decoder_ch_mult) != len(self.decoder_num_res_blocks):
            raise ValueError("MAGVIT ch_mult and num_res_blocks must have one entry per level")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.encoder_ch_mult) - 1)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=1e-6)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=1e-6)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, 1x1 convs for q, k, v and the output."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (p(n).reshape(b, 1, c, h * w).transpose(2, 3) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)            # scale c^-0.5, as upstream
        return x + self.proj_out(y.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(c: int, groups: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(c, c, groups), AttnBlock(c, groups), ResnetBlock(c, c, groups)
    return mid


class Encoder(nn.Module):
    def __init__(self, c: MagvitConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(c.in_ch, c.ch, 3, padding=1)
        in_mult = (1,) + c.encoder_ch_mult
        self.down = nn.ModuleList()
        for i, (mult, n_blocks) in enumerate(zip(c.encoder_ch_mult, c.encoder_num_res_blocks)):
            level = nn.Module()
            c_in, c_out = c.ch * in_mult[i], c.ch * mult
            level.block = nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out, c.norm_groups) for j in range(n_blocks))
            if i != len(c.encoder_ch_mult) - 1:
                level.downsample = Downsample(c_out)
            self.down.append(level)
        top = c.ch * c.encoder_ch_mult[-1]
        self.mid = _mid(top, c.norm_groups)
        self.norm_out = nn.GroupNorm(c.norm_groups, top, eps=1e-6)
        self.conv_out = nn.Conv2d(top, c.z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(c.z_channels, c.z_channels, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for blk in level.block:
                h = blk(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.quant_conv(self.conv_out(swish(self.norm_out(h))))


class Decoder(nn.Module):
    def __init__(self, c: MagvitConfig):
        super().__init__()
        n_levels = len(c.decoder_ch_mult)
        c_in = c.ch * c.decoder_ch_mult[-1]
        self.post_quant_conv = nn.Conv2d(c.z_channels, c.z_channels, 1)
        self.conv_in = nn.Conv2d(c.z_channels, c_in, 3, padding=1)
        self.mid = _mid(c_in, c.norm_groups)
        levels = []
        for i in reversed(range(n_levels)):        # built top-down, stored bottom-up (up[0] = full resolution)
            level = nn.Module()
            c_out = c.ch * c.decoder_ch_mult[i]
            level.block = nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out, c.norm_groups)
                                        for j in range(c.decoder_num_res_blocks[i]))
            c_in = c_out
            if i != 0:
                level.upsample = Upsample(c_out)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = nn.GroupNorm(c.norm_groups, c_in, eps=1e-6)
        self.conv_out = nn.Conv2d(c_in, c.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(self.post_quant_conv(z))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for blk in level.block:
                h = blk(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class LFQuantizer(nn.Module):
    def __init__(self, bits: int = 13):
        super().__init__()
        self.bits = bits
        codes = torch.arange(2 ** bits)
        powers = 2 ** torch.arange(bits - 1, -1, -1)                     # 2^(bits-1-k): channel 0 is the top bit
        self.register_buffer("embedding", ((codes[:, None] // powers) % 2).float() * 2 - 1)   # [K, bits] in {-1, 1}
        self.register_buffer("power_vals", powers)

    def codes_of(self, z: torch.Tensor) -> torch.LongTensor:
        """z [B, bits, h, w] -> codes [B, h*w] (row-major), code = sum_k 2^(bits-1-k) [z_k > 0]."""
        bits = (z > 0).long()
        return (bits * self.power_vals.view(1, -1, 1, 1).long()).sum(1).flatten(1)

    def latents_of(self, codes: torch.LongTensor, shape: tuple[int, int]) -> torch.Tensor:
        """codes [B, h*w] -> z [B, bits, h, w] with entries -1/+1."""
        b = codes.shape[0]
        h, w = shape
        return self.embedding[codes.reshape(-1)].view(b, h, w, self.bits).permute(0, 3, 1, 2).contiguous()


class MagvitV2(nn.Module):
    def __init__(self, config: MagvitConfig | None = None):
        super().__init__()
        self.config = config or MagvitConfig()
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.quantize = LFQuantizer(self.config.z_channels)

    @property
    def codebook_size(self) -> int:
        return 2 ** self.config.z_channels

    def get_code(self, pixels: torch.Tensor) -> torch.LongTensor:
        """pixels [B, 3, H, W] in [-1, 1] -> codes [B, (H/16)*(W/16)]."""
        z = self.encoder(pixels.to(self.encoder.conv_in.weight.dtype))
        return self.quantize.codes_of(z)

    def decode_code(self, codes: torch.LongTensor, shape: tuple[int, int] | None = None) -> torch.Tensor:
        """codes [B, h*w] -> pixels [B, 3, 16h, 16w] in about [-1, 1]; a square grid unless `shape` is given."""
        if shape is None:
            side = math.isqrt(codes.shape[-1])
            if side * side != codes.shape[-1]:
                raise ValueError(f"{codes.shape[-1]} codes are not a square grid; pass shape=(h, w)")
            shape = (side, side)
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(f"MAGVIT codes must lie in 0..{self.codebook_size - 1}")
        z = self.quantize.latents_of(codes, shape).to(self.decoder.conv_in.weight.dtype)
        return self.decoder(z)


def load_magvit(path: str | Path = MODEL_ID, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> MagvitV2:
    directory = hub.resolve_model_dir(path, model_id=MODEL_ID, layout=LAYOUT)
    raw = hub.read_json(directory / "config.json") if (directory / "config.json").exists() else {}
    known = {f.name for f in fields(MagvitConfig)}
    model = MagvitV2(MagvitConfig(**{k: v for k, v in raw.items() if k in known}))
    if list(directory.glob("*.safetensors")):
        state = hub.read_tensors(hub.safetensors_files(directory, model_id=MODEL_ID, layout=LAYOUT), "cpu", None)
    else:
        bins = [directory / n for n in ("pytorch_model.bin", "diffusion_pytorch_model.bin") if (directory / n).exists()]
        if not bins:
            raise FileNotFoundError(f"no MAGVIT-v2 weights in {directory}. Expected layout: {LAYOUT}")
        state = torch.load(bins[0], map_location="cpu", weights_only=True)
    buffers = {"quantize.embedding", "quantize.power_vals"}
    hub.check_state_keys(set(model.state_dict()), set(state), source=directory, optional=buffers,
                         hint="encoder.* / decoder.* / quantize.* as in Show-o's MAGViTv2")
    ours = model.state_dict()
    for k in buffers & set(state):   # the code <-> bits table is fixed; a checkpoint must agree with it
        if not torch.equal(state[k].to(ours[k].dtype), ours[k]):
            raise ValueError(f"{directory}: {k} differs from the LFQ bit table this code assumes (MSB first)")
    model.load_state_dict(state, strict=False)
    return model.to(device=device, dtype=dtype).eval()


def write_magvit_checkpoint(model: MagvitV2, directory: str | Path) -> Path:
    """config.json (with our optional architecture keys) + model.safetensors (tiny replicas)."""
    from harness.checkpoint import save_weights
    from harness.io import atomic_write_json
    directory = Path(directory)
    atomic_write_json(directory / "config.json", {"_class_name": "MAGViTv2", **asdict(model.config)})
    save_weights(directory / "model.safetensors", model.state_dict(), {"format": "pt"})
    return directory
