"""Real-size speed of the 8B backbones on random weights, against the hardware limit measured in the same run
(issue 18, items 2 and 5).

    python benchmarks/real_size.py                       # CPU, reduced depth (1 block of full width), a few minutes
    python benchmarks/real_size.py --size smoke          # the same code path, tiny widths (tests)
    python benchmarks/real_size.py --size full --device cuda --out DIR    # official shapes, bf16 (benchmarks/real_size_gpu.sh)

MMaDA-8B and Lumina-DiMOO-8B are built as our own modules (harness.backbones.llada on the meta device, then
materialised with random weights) behind the project's adapters (MMaDABackbone / LuminaDiMOOBackbone: the
official token layouts, CFG batched, head sliced to the codebook), with the shapes of the official configs
(harness.flops: LLaDA-8B d 4096, 32 layers, 32 heads, MLP 12288; 134656 / 134548 head rows). It measures
- rollouts: images/s against batch size with the configs' sampler (harness.sampling.sample),
- one training step per method (trainers.loop.train_step with configs/<backbone>/<method>.yaml: LoRA r=128 or,
  where the memory model says it fits, full fine-tuning), rewards random and VQ decoding stubbed (scoring and
  decoding are not part of this table),
- peak memory (GPU: torch.cuda.max_memory_allocated; CPU: the model only) beside harness.flops' prediction,
- MFU = model FLOPs (harness.flops) / time / peak, where peak is the dense matmul rate of the run's dtype measured
  by a large matmul in this process (and a nominal peak if given).
The tiny default (item 5) is measured the same way: sampler and train-step MFU of configs/tiny/ht_grpo.yaml.
Reduced sizes change depth, widths (smoke only) and the image/prompt lengths, never the code path.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import flops as F  # noqa: E402
from harness.backbones.base import concat_prompts  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("ht-grpo", "grpo", "maskgrpo", "tracegrpo", "diffu-grpo")
CONFIG_NAME = {"ht-grpo": "ht_grpo", "grpo": "grpo", "maskgrpo": "maskgrpo", "tracegrpo": "tracegrpo",
               "diffu-grpo": "diffu_grpo"}
PROMPT = "a photo of two red cube and a blue sphere"


@dataclass(frozen=True)
class Size:
    d_model: int | None          # None: the official width
    n_heads: int | None
    mlp_hidden: int | None
    layers: int | None           # None: the official depth
    mmada_resolution: int
    mmada_text_len: int          # MMaDA's prompt part is text_len + 1 tokens (official 512)
    dimoo_hw: tuple[int, int]
    batches: tuple[int, ...]
    sampler_steps: int | None    # None: the configs' (MMaDA 12, DiMOO 32)
    prompts: int
    group: int
    inner: int | None            # None: the configs' inner_iterations
    micro_batch: int | None      # None: the configs'
    dtype: str
    methods: tuple[str, ...]
    train_backbones: tuple[str, ...]


SIZES = {
    "smoke": Size(64, 4, 192, 1, 64, 16, (64, 64), (1, 2), 2, 1, 2, 1, 0, "float32", ("ht-grpo",), ("mmada",)),
    "cpu": Size(None, None, None, 1, 128, 64, (128, 128), (1, 2, 4), 2, 1, 2, 1, 0, "float32", METHODS,
                ("mmada", "lumina-dimoo")),
    "full": Size(None, None, None, None, 512, 512, (512, 512), (1, 4, 8, 16), None, 1, 9, None, None, "bfloat16",
                 METHODS, ("mmada", "lumina-dimoo")),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def measured_peak_bytes(device: torch.device) -> float | None:
    return float(torch.cuda.max_memory_allocated()) if device.type == "cuda" else None


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int, seconds: float) -> float:
    """Dense matmul FLOP/s of one n x n x n product, best of repeated timings over ~`seconds`."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    sync(device)
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        for _ in range(4 if device.type == "cuda" else 1):
            a @ b
        sync(device)
        el = (time.perf_counter() - t) / (4 if device.type == "cuda" else 1)
        best = max(best, 2 * n ** 3 / el)
    return best


# --- building the 8B backbones with random weights ------------------------------------------------------------

def llada_config(name: str, size: Size, layers: int | None):
    c = F.MMADA_8B if name == "mmada" else F.DIMOO_8B
    return replace(c, d_model=size.d_model or c.d_model, n_heads=size.n_heads or c.n_heads,
                   n_kv_heads=size.n_heads or c.n_kv_heads, mlp_hidden_size=size.mlp_hidden or c.mlp_hidden_size,
                   n_layers=layers or size.layers or c.n_layers)


def random_llada(config, device: torch.device, dtype: torch.dtype, seed: int = 0, std: float = 0.02):
    """Meta-device construction, then storage on `device` in `dtype`, filled in place (no fp32 copy of 8B): norms
    1, every other weight normal(0, std)."""
    from harness.backbones.llada import LLaDA
    with torch.device("meta"):
        model = LLaDA(config).to(dtype)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=gen)
    return model


def build_backbone(name: str, size: Size, device: torch.device, dtype: torch.dtype, tmp: Path, layers=None):
    from transformers import AutoTokenizer
    from harness.backbones import lumina_dimoo, mmada
    from harness.backbones.replicas import write_word_tokenizer
    module = random_llada(llada_config(name, size, layers), device, dtype)
    if name == "mmada":
        write_word_tokenizer(tmp / "mmada_tok", {"<|startoftext|>": mmada.BOS, "<|endoftext|>": mmada.EOS},
                             bos="<|startoftext|>", eos="<|endoftext|>")
        tok = AutoTokenizer.from_pretrained(str(tmp / "mmada_tok"), padding_side="left")
        bb = mmada.MMaDABackbone(module, tok, None, resolution=size.mmada_resolution, max_text_len=size.mmada_text_len)
    else:
        write_word_tokenizer(tmp / "dimoo_tok", {"<system>": 2001, "</system>": 2002, "<user>": 2003, "</user>": 2004,
                                                 "<uncondition>": lumina_dimoo.UNCONDITION})
        tok = AutoTokenizer.from_pretrained(str(tmp / "dimoo_tok"))
        bb = lumina_dimoo.LuminaDiMOOBackbone(module, tok, None, height=size.dimoo_hw[0], width=size.dimoo_hw[1])
    h, w = bb.image_size
    # no VQ: decoding (and scoring) are not part of this benchmark
    bb.decode = lambda codes: torch.zeros(codes.shape[0], 3, h, w)
    return bb


def train_config(backbone: str, method: str, size: Size, device: torch.device, full_ft: bool):
    from harness.config import read_yaml
    from trainers.config import TrainConfig
    folder = "mmada" if backbone == "mmada" else "lumina_dimoo"
    data = read_yaml(ROOT / "configs" / folder / f"{CONFIG_NAME[method]}.yaml")
    data["backbone"].update(device=str(device), dtype=size.dtype, options={})
    if full_ft:
        data["backbone"]["lora"] = None
    r = data["rollout"]
    r.update(prompts_per_step=size.prompts, group_size=size.group, batch_size=size.prompts * size.group, prompt_file=None)
    r.pop("tag_weights", None)
    if size.sampler_steps:
        r["sampler"]["steps"] = size.sampler_steps
    if size.inner:
        data["method"]["inner_iterations"] = size.inner
        data["method"].pop("n_global", None)
        data["method"].pop("n_struct", None)
    if size.micro_batch is not None:
        data["loss"]["micro_batch"] = size.micro_batch
    data["reward"] = {"shapes-geneval": 1.0}             # replaced by random rewards below
    data["checkpoint"] = {"eval_suite": None}
    data["tensorboard"] = False
    return TrainConfig.model_validate(data)


def make_trainer(bb, cfg):
    """trainers.loop.build_trainer's steps on an in-memory backbone, with random rewards."""
    from harness import registry
    from harness.backbones.lora import apply_lora
    from trainers.loop import Trainer, lr_factor
    reference = None
    if cfg.backbone.lora is not None:
        apply_lora(bb, r=cfg.backbone.lora.r, alpha=cfg.backbone.lora.alpha, dropout=cfg.backbone.lora.dropout,
                   targets=cfg.backbone.lora.targets or list(bb.lora_targets))
    else:
        bb.module.requires_grad_(True)          # full fine-tuning (a LoRA run before it froze the weights)
        if cfg.loss.beta_kl > 0:
            reference = copy.deepcopy(bb.module).eval().requires_grad_(False)
    if cfg.backbone.gradient_checkpointing:
        bb.module.gradient_checkpointing_enable()
    params = [p for p in bb.module.parameters() if p.requires_grad]
    o = cfg.optim
    opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    k = cfg.method.inner_iterations
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: lr_factor(o, u // k, cfg.steps))
    sampler = cfg.rollout.sampler.resolve(cfg.backbone.name)
    rng = np.random.default_rng(0)
    reward = lambda samples: (rng.random(len(samples)), {})
    return Trainer(cfg, bb, registry.get("methods", cfg.method.name), reward, opt, sched, reference, sampler)


def strip_lora(bb):
    from harness.backbones.lora import base_module
    m = base_module(bb.module)
    if hasattr(bb.module, "unload"):
        m = bb.module.unload()
    m.gradient_checkpointing = False
    bb.module, bb.lora = m, None
    return bb


# --- measurements ---------------------------------------------------------------------------------------------

def rollout_rows(bb, label: str, arch: F.Arch, sampler, batches, device, peak: float, dtype: str, nominal: float):
    from harness.sampling import sample
    rows = []
    texts = [PROMPT] * max(batches)
    sample(bb, bb.tokenize(texts[:1]), replace(sampler, steps=1), seed=0)   # warm-up
    for b in batches:
        prompts = bb.tokenize(texts[:b])
        lay = F.layout_of(bb, concat_prompts(prompts, bb.uncond(b)) if sampler.cfg else prompts)
        fl = F.rollout_flops(arch, b, lay, sampler.steps, cfg=sampler.cfg != 0, schedule=sampler.schedule)
        mem = F.inference_bytes(arch, b, lay, dtype=dtype) + arch.params * F.DTYPE_BYTES[dtype]
        reset_peak(device)
        t = time.perf_counter()
        sample(bb, prompts, sampler, seed=0)
        sync(device)
        el = time.perf_counter() - t
        rows.append({"backbone": label, "what": f"rollout batch {b}", "L": lay.length, "N": lay.slots,
                     "steps": sampler.steps, "s": el, "images_per_s": b / el, "flops": fl.model,
                     "mfu": F.mfu(fl.model, el, peak), "mfu_nominal": F.mfu(fl.model, el, nominal),
                     "peak_mem": measured_peak_bytes(device), "model_mem": mem, "parts": {"mfu": (fl.model, el, dtype)}})
    return rows


def train_row(bb, label: str, method: str, size: Size, device, peak: float, nominal: float, full_ft: bool,
              mem_limit: float):
    from trainers.loop import step_prompts, train_step
    cfg = train_config(bb.name, method, size, device, full_ft)
    arch = F.arch_of(bb.module)
    b = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    texts = [m["prompt"] for m in step_prompts(cfg, 0) for _ in range(cfg.rollout.group_size)]
    prompts = bb.tokenize(texts)
    lay = F.layout_of(bb, prompts)
    mb = cfg.loss.micro_batch or b
    lora = cfg.backbone.lora
    mem = F.memory_model(arch, dtype=size.dtype, trainable="full" if full_ft else "lora", lora_r=lora.r if lora else 0,
                         lora_dropout=lora.dropout if lora else 0.0, reference=cfg.loss.beta_kl > 0, micro_batch=mb,
                         layout=lay, gradient_checkpointing=cfg.backbone.gradient_checkpointing, rollout_batch=b)
    kind = "full FT" if full_ft else f"LoRA r={lora.r}"
    row = {"backbone": label, "what": f"{method} step, {kind}", "L": lay.length, "N": lay.slots,
           "steps": cfg.rollout.sampler.resolve(bb.name).steps, "model_mem": mem["peak"]}
    if mem["peak"] > mem_limit:
        row.update(skipped=f"does not fit: model {F.fmt_bytes(mem['peak'])} > {F.fmt_bytes(mem_limit)}")
        return row
    tr = make_trainer(bb, cfg)
    try:
        reset_peak(device)
        t = time.perf_counter()
        out = train_step(tr, 0)
        sync(device)
        el = time.perf_counter() - t
        sf = F.train_step_flops(
            arch, rollouts=b, layout=lay,
            rollout_layout=F.layout_of(bb, concat_prompts(prompts, bb.uncond(b))) if tr.sampler.cfg else lay,
            sampler_steps=tr.sampler.steps, cfg=tr.sampler.cfg != 0, schedule=tr.sampler.schedule,
            views=round(out["forward_passes_per_update"] * cfg.method.inner_iterations),
            masked_entropy=tr.method.needs_masked_entropy(cfg.method), reference=cfg.loss.beta_kl > 0,
            trainable="full" if full_ft else "lora", lora_r=lora.r if lora else 0,
            gradient_checkpointing=cfg.backbone.gradient_checkpointing)
        row.update(s=el, rollout_s=out["rollout_s"], update_s=out["train_s"], images_per_s=b / el,
                   flops=sf.total.model, mfu=F.mfu(sf.total.model, el, peak), mfu_nominal=F.mfu(sf.total.model, el, nominal),
                   update_mfu=F.mfu(sf.update.model, out["train_s"], peak), peak_mem=measured_peak_bytes(device),
                   rollouts=b, inner=cfg.method.inner_iterations, views=sf.parts["views"],
                   parts={"mfu": (sf.total.model, el, size.dtype), "update_mfu": (sf.update.model, out["train_s"], size.dtype)})
    finally:
        if full_ft:
            del tr
        else:
            strip_lora(bb)
            del tr
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def tiny_rows(device, peaks: dict, nominal: float, quick: bool):
    """Item 5: the tiny default's sampler and train-step MFU against this machine's measured matmul peaks."""
    from harness.backbones.tiny import load_tiny
    from harness.config import load_config
    from harness.sampling import SamplerConfig, sample
    from trainers.config import TrainConfig
    from trainers.loop import build_trainer, step_prompts, train_step
    rows = []
    bb = load_tiny(device=str(device))
    arch = F.arch_of(bb.module)
    cfg_s = SamplerConfig(steps=2 if quick else 12, cfg=2.0)
    texts = ["a photo of two red circles"] * 32
    for dtype in ("float32", "bfloat16"):
        for b in ((2,) if quick else (8, 32)):
            prompts = bb.tokenize(texts[:b])
            lay = F.layout_of(bb, concat_prompts(prompts, bb.uncond(b)))
            fl = F.rollout_flops(arch, b, lay, cfg_s.steps)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                sample(bb, prompts, replace(cfg_s, steps=2), seed=0)
                t = time.perf_counter()
                sample(bb, prompts, cfg_s, seed=0)
                sync(device)
                el = time.perf_counter() - t
            rows.append({"backbone": "tiny", "what": f"rollout batch {b} ({dtype})", "L": lay.length, "N": lay.slots,
                         "steps": cfg_s.steps, "s": el, "images_per_s": b / el, "flops": fl.model, "dtype": dtype,
                         "mfu": F.mfu(fl.model, el, peaks[dtype]), "mfu_nominal": F.mfu(fl.model, el, nominal),
                         "parts": {"mfu": (fl.model, el, dtype)}})
    overrides = ["checkpoint.eval_suite=null", "tensorboard=false", f"backbone.device={device}"]
    if quick:
        overrides += ["rollout.prompts_per_step=1", "rollout.group_size=2", "method.inner_iterations=1",
                      "method.n_global=1", "method.n_struct=0", "rollout.sampler.steps=2"]
    cfg = load_config(TrainConfig, ROOT / "configs" / "tiny" / "ht_grpo.yaml", overrides)
    tr = build_trainer(cfg)
    if not quick:
        train_step(tr, 0)                               # warm-up
    g = cfg.rollout.group_size
    texts = [m["prompt"] for m in step_prompts(cfg, 1) for _ in range(g)]
    prompts = tr.backbone.tokenize(texts)
    b = len(texts)
    t = time.perf_counter()
    out = train_step(tr, 1)
    sync(device)
    el = time.perf_counter() - t
    sf = F.train_step_flops(arch, rollouts=b, layout=F.layout_of(tr.backbone, prompts),
                            rollout_layout=F.layout_of(tr.backbone, concat_prompts(prompts, tr.backbone.uncond(b))),
                            sampler_steps=tr.sampler.steps, views=round(out["forward_passes_per_update"] * cfg.method.inner_iterations),
                            masked_entropy=tr.method.needs_masked_entropy(cfg.method), reference=cfg.loss.beta_kl > 0,
                            trainable="full")
    rd, ld = cfg.rollout.dtype, cfg.loss.dtype
    rows.append({"backbone": "tiny", "what": f"ht-grpo step ({cfg.rollout.prompts_per_step}x{g}, K={cfg.method.inner_iterations}; "
                 f"rollout {rd}, updates {ld})", "L": F.layout_of(tr.backbone, prompts).length, "N": 64,
                 "steps": tr.sampler.steps, "s": el, "images_per_s": b / el, "flops": sf.total.model, "dtype": ld,
                 "mfu": F.mfu(sf.total.model, el, peaks[ld]), "mfu_nominal": F.mfu(sf.total.model, el, nominal),
                 "rollout_mfu": F.mfu(sf.rollout.model, out["rollout_s"], peaks[rd]),
                 "update_mfu": F.mfu(sf.update.model, out["train_s"], peaks[ld]),
                 "parts": {"mfu": (sf.total.model, el, ld), "rollout_mfu": (sf.rollout.model, out["rollout_s"], rd),
                           "update_mfu": (sf.update.model, out["train_s"], ld)}})
    return rows


# --- the table ------------------------------------------------------------------------------------------------

def pct(x) -> str:
    return "–" if x is None or x != x else f"{100 * x:.1f}%"


def table(rows: list[dict], nominal: float) -> str:
    head = "| backbone | measured | L | N | steps | s | images/s | model FLOPs | MFU | "
    head += ("MFU (nominal) | " if nominal else "") + "peak mem (measured) | peak mem (model) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['backbone']} | {r['what']} | {r['L']} | {r['N']} | {r['steps']} | {r['skipped']} |"
                         + " |" * (head.count("|") - 7))
            continue
        extra = ""
        if "update_mfu" in r:
            extra = f" (updates {pct(r['update_mfu'])}" + (f", rollout {pct(r['rollout_mfu'])}" if "rollout_mfu" in r else "") + ")"
        mem = "–" if r.get("peak_mem") is None else F.fmt_bytes(r["peak_mem"])
        model_mem = "–" if r.get("model_mem") is None else F.fmt_bytes(r["model_mem"])
        lines.append(f"| {r['backbone']} | {r['what']} | {r['L']} | {r['N']} | {r['steps']} | {r['s']:.2f} | "
                     f"{r['images_per_s']:.2f} | {F.fmt_flops(r['flops'])} | {pct(r['mfu'])}{extra} | "
                     + (f"{pct(r['mfu_nominal'])} | " if nominal else "") + f"{mem} | {model_mem} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="cpu")
    ap.add_argument("--device", default=None, help="default: cuda for --size full, else cpu")
    ap.add_argument("--backbones", default="mmada,lumina-dimoo")
    ap.add_argument("--methods", default=None, help="comma list (default: the size's)")
    ap.add_argument("--train-backbones", default=None, help="backbones whose training steps are timed")
    ap.add_argument("--batches", default=None, help="rollout batch sizes, comma list")
    ap.add_argument("--layers", type=int, default=None, help="override the depth")
    ap.add_argument("--inner", type=int, default=None, help="override inner_iterations K")
    ap.add_argument("--full-ft", choices=["auto", "off"], default="auto",
                    help="auto: a full fine-tuning step where the memory model says it fits")
    ap.add_argument("--mem-limit-gb", type=float, default=None, help="device memory for the fit decision "
                    "(default: the GPU's, or 8 GB on the CPU)")
    ap.add_argument("--nominal-peak-tflops", type=float, default=0.0, help="also print MFU against this peak "
                    "(H100 / H200 dense bf16: 989)")
    ap.add_argument("--no-tiny", action="store_true", help="skip the tiny default's rows (item 5)")
    ap.add_argument("--tiny-only", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write real_size.md and real_size.json here")
    a = ap.parse_args(argv)
    size = SIZES[a.size]
    size = replace(size, batches=tuple(int(x) for x in a.batches.split(",")) if a.batches else size.batches,
                   methods=tuple(a.methods.split(",")) if a.methods else size.methods,
                   train_backbones=tuple(a.train_backbones.split(",")) if a.train_backbones else size.train_backbones,
                   layers=a.layers or size.layers, inner=a.inner or size.inner)
    device = torch.device(a.device or ("cuda" if a.size == "full" else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("real_size: no CUDA device is visible (use --device cpu or a GPU machine)", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads) if device.type == "cpu" else None
    nominal = a.nominal_peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        total = torch.cuda.get_device_properties(0).total_memory
        n, secs = 8192, 2.0
    else:
        name, total = f"CPU, {torch.get_num_threads()} threads", None
        n, secs = (512, 0.3) if a.size == "smoke" else (2048, 2.0)
    mem_limit = a.mem_limit_gb * 1e9 if a.mem_limit_gb else (0.95 * total if total else 8e9)
    peaks = {"float32": matmul_peak(torch.float32, device, n, secs),
             "bfloat16": matmul_peak(torch.bfloat16, device, n, secs)}
    print(f"matmul peak at the start (n={n}): fp32 {peaks['float32'] / 1e12:.3f}, bf16 {peaks['bfloat16'] / 1e12:.3f} "
          "TFLOP/s", flush=True)
    rows: list[dict] = []
    dtype = getattr(torch, size.dtype)
    peak = peaks[size.dtype]
    if not a.tiny_only:
        from trainers.config import TrainConfig  # noqa: F401
        with tempfile.TemporaryDirectory() as tmp:
            for name_bb in a.backbones.split(","):
                t0 = time.perf_counter()
                bb = build_backbone(name_bb, size, device, dtype, Path(tmp))
                arch = F.arch_of(bb.module)
                label = f"{name_bb} ({arch.n_layers} of 32 layers, d {arch.d_model})" if arch.n_layers != 32 else name_bb
                print(f"[{name_bb}] built {arch.params / 1e9:.2f} B params in {time.perf_counter() - t0:.1f} s; "
                      f"grid {bb.grid}", flush=True)
                sampler = train_config(name_bb, "ht-grpo", size, device, False).rollout.sampler.resolve(name_bb)
                rows += rollout_rows(bb, label, arch, sampler, size.batches, device, peak, size.dtype, nominal)
                print(table(rows[-len(size.batches):], nominal), flush=True)
                if name_bb in size.train_backbones:
                    for m in size.methods:
                        rows.append(train_row(bb, label, m, size, device, peak, nominal, False, mem_limit))
                        print(table(rows[-1:], nominal), flush=True)
                    if a.full_ft == "auto":
                        rows.append(train_row(bb, label, "ht-grpo", size, device, peak, nominal, True, mem_limit))
                        print(table(rows[-1:], nominal), flush=True)
                del bb
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    if not a.no_tiny:
        rows += tiny_rows(device, peaks, nominal, quick=a.size == "smoke")
    # the peak again at the end: on a shared machine the best of the two is the limit (MFU rows use it)
    start = dict(peaks)
    end = {"float32": matmul_peak(torch.float32, device, n, secs), "bfloat16": matmul_peak(torch.bfloat16, device, n, secs)}
    peaks = {k: max(start[k], end[k]) for k in start}
    for r in rows:
        for key, (fl, secs_, dt) in r.get("parts", {}).items():
            r[key] = F.mfu(fl, secs_, peaks[dt])
    header = (f"device: {name}; torch {torch.__version__}; size {a.size}; matmul peak measured in this run "
              f"(n={n}, best of start / end): fp32 {peaks['float32'] / 1e12:.3f} TFLOP/s "
              f"({start['float32'] / 1e12:.3f} / {end['float32'] / 1e12:.3f}), bf16 {peaks['bfloat16'] / 1e12:.3f} TFLOP/s "
              f"({start['bfloat16'] / 1e12:.3f} / {end['bfloat16'] / 1e12:.3f})"
              + (f"; nominal {a.nominal_peak_tflops:.0f} TFLOP/s" if nominal else ""))
    text = (header + "\n\nMFU = model FLOPs (harness.flops) / time / the matmul peak of the run's dtype "
            f"({size.dtype} for the 8B rows; the tiny rows name theirs).\n\n" + table(rows, nominal))
    print("\n" + text)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "real_size.md").write_text(text + "\n")
        (a.out / "real_size.json").write_text(json.dumps({"header": header, "peaks": peaks, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
