"""harness.flops against measurement: FLOPs counted by torch's FlopCounterMode on the real forwards / backwards of
small random instances, bytes saved for backward counted with saved-tensor hooks, parameter counts of the
full-size architectures built on the meta device. The issue asks for 10%; the model is exact up to the terms it
documents leaving out, so the bounds here are tighter."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from harness import flops as F
from harness.backbones.base import concat_prompts, token_logprobs
from harness.backbones.llada import BLOCK_LINEARS, LLaDA, LLaDAConfig
from harness.backbones.lora import apply_lora

B, L, N, K = 2, 96, 64, 256


def small_llada(dtype, lora: bool, ckpt: bool, layers: int = 3, r: int = 8, dropout: float = 0.05):
    torch.manual_seed(0)
    c = LLaDAConfig(d_model=128, n_layers=layers, n_heads=4, mlp_hidden_size=384, embedding_size=1000)
    m = LLaDA(c).init_weights().to(dtype)
    m.gradient_checkpointing = ckpt
    bb = SimpleNamespace(module=m, lora_targets=BLOCK_LINEARS, name="llada")
    if lora:
        apply_lora(bb, r=r, alpha=2 * r, dropout=dropout)
    bb.module.train()
    return c, bb.module


def inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (B, L), generator=g)
    key_mask = torch.ones(B, L, dtype=torch.bool)
    key_mask[0, :7] = False                      # padded: the masked attention path
    positions = (torch.arange(N) + L - N).expand(B, N)
    return ids, key_mask, positions


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("trainable", ["full", "lora"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_llada_flops_and_saved_bytes(dtype, trainable, ckpt):
    c, mod = small_llada(getattr(torch, dtype), trainable == "lora", ckpt)
    arch, lay, r = F.Arch.from_llada(c, codebook=K), F.Layout(L, N), 8 if trainable == "lora" else 0
    ids, key_mask, positions = inputs()
    run = lambda: torch.log_softmax(mod(ids, key_mask, positions, (100, K)), -1)
    with torch.no_grad():
        measured_fwd, _ = F.count_flops(run)
    fwd = F.forward_flops(arch, B, lay, lora_r=r)
    assert measured_fwd == pytest.approx(fwd.hardware, rel=1e-3)
    measured_step, _ = F.count_flops(lambda: run().sum().backward())
    bwd = F.backward_flops(arch, B, lay, trainable=trainable, lora_r=r, gradient_checkpointing=ckpt)
    assert measured_step == pytest.approx((fwd + bwd).hardware, rel=1e-3)
    # model FLOPs: backward = 2x forward where trained, 1x where only passed through
    if trainable == "full":
        assert bwd.model == pytest.approx(2 * fwd.model)
    else:
        assert fwd.model < bwd.model < 2 * fwd.model
    saved, _ = F.saved_activation_bytes(run, mod)
    model = F.activation_bytes(arch, B, lay, dtype=dtype, trainable=trainable, lora_r=r, lora_dropout=0.05,
                               gradient_checkpointing=ckpt)
    assert saved == pytest.approx(model["saved"], rel=0.02)


def test_lora_without_dropout_saved_bytes():
    c, mod = small_llada(torch.bfloat16, True, False, dropout=0.0)
    ids, key_mask, positions = inputs()
    saved, _ = F.saved_activation_bytes(lambda: torch.log_softmax(mod(ids, key_mask, positions, (100, K)), -1), mod)
    model = F.activation_bytes(F.Arch.from_llada(c, codebook=K), B, F.Layout(L, N), dtype="bfloat16",
                               trainable="lora", lora_r=8, lora_dropout=0.0)
    assert saved == pytest.approx(model["saved"], rel=0.05)


def test_tiny_forward_backward_and_rollout():
    from harness.backbones.tiny import load_tiny
    from harness.sampling import SamplerConfig, sample
    bb = load_tiny("")
    arch = F.arch_of(bb.module)
    prompts = bb.tokenize(["a photo of two red circles", "a blue square"])
    lay = F.layout_of(bb, prompts)
    codes = torch.randint(0, bb.codebook_size, (2, lay.slots))
    visible = torch.rand(codes.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    measured, _ = F.count_flops(lambda: token_logprobs(bb, prompts, codes, visible).logp.sum().backward())
    fwd = F.forward_flops(arch, 2, lay)
    bwd = F.backward_flops(arch, 2, lay, trainable="full")
    assert measured == pytest.approx((fwd + bwd).hardware, rel=1e-3)
    saved, _ = F.saved_activation_bytes(lambda: token_logprobs(bb, prompts, codes, visible).logp, bb.module)
    model = F.activation_bytes(arch, 2, lay, dtype="float32", trainable="full")
    assert saved == pytest.approx(model["saved"], rel=0.05)
    cfg = SamplerConfig(steps=4, cfg=2.0)
    cfg_layout = F.layout_of(bb, concat_prompts(prompts, bb.uncond(2)))
    measured, _ = F.count_flops(lambda: sample(bb, prompts, cfg, seed=0))
    assert measured == pytest.approx(F.rollout_flops(arch, 2, cfg_layout, 4).hardware, rel=1e-3)


def test_full_size_parameter_counts():
    """Meta-device builds of the 8B architectures (no memory) against the formula, and the documented sizes."""
    for config, arch in ((F.MMADA_8B, F.MMADA), (F.DIMOO_8B, F.DIMOO)):
        with torch.device("meta"):
            m = LLaDA(config)
        assert sum(p.numel() for p in m.parameters()) == arch.params
        assert 8.0e9 < arch.params < 8.2e9           # "about 8.1 B parameters" (docs/backbones.md)
        with torch.device("meta"):
            bb = SimpleNamespace(module=LLaDA(config), lora_targets=BLOCK_LINEARS, name="llada")
            apply_lora(bb, r=128, alpha=64, dropout=0.05)
        n_lora = sum(p.numel() for p in bb.module.parameters() if p.requires_grad)
        assert n_lora == F.lora_params(arch, 128) == 32 * 81920 * 128   # docs: 81,920 x r per block
    from harness.backbones.tiny import TinyConfig, TinyDMLLM
    tiny = TinyDMLLM(TinyConfig())
    assert sum(p.numel() for p in tiny.parameters()) == F.Arch.from_tiny(TinyConfig()).params


def test_adapter_layouts_match_the_formulas(tmp_path):
    from harness.backbones import lumina_dimoo, mmada
    from harness.backbones.replicas import tiny_llada, write_word_tokenizer
    from transformers import AutoTokenizer
    write_word_tokenizer(tmp_path / "mm", {"<|startoftext|>": mmada.BOS, "<|endoftext|>": mmada.EOS},
                         bos="<|startoftext|>", eos="<|endoftext|>")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "mm"), padding_side="left")
    mm = mmada.MMaDABackbone(tiny_llada(134656, 0), tok, None, resolution=64)
    assert F.layout_of(mm, mm.tokenize(["a red cube"])) == F.mmada_layout(64)
    assert F.mmada_layout(512).length == 1539                    # docs/backbones.md
    write_word_tokenizer(tmp_path / "dm", {"<system>": 2001, "</system>": 2002, "<user>": 2003, "</user>": 2004,
                                           "<uncondition>": lumina_dimoo.UNCONDITION})
    dm = lumina_dimoo.LuminaDiMOOBackbone(tiny_llada(lumina_dimoo.LOGIT_WIDTH, 0),
                                          AutoTokenizer.from_pretrained(str(tmp_path / "dm")), None, height=48, width=80)
    prompts = dm.tokenize(["a red cube"])
    assert F.layout_of(dm, prompts) == F.dimoo_layout(48, 80, prompt_len=prompts.ids.shape[1])
    # a whole rollout of the DiMOO adapter (its own stopping rule) against the count
    from harness.sampling import sample, sampler_config
    cfg = sampler_config("lumina-dimoo", steps=5)
    arch = F.arch_of(dm.module)
    both = F.layout_of(dm, concat_prompts(prompts, dm.uncond(1)))
    measured, _ = F.count_flops(lambda: sample(dm, prompts, cfg, seed=0))
    assert measured == pytest.approx(F.rollout_flops(arch, 1, both, 5, schedule=cfg.schedule).hardware, rel=1e-3)


def test_tiny_train_step_flops_match_the_count():
    """A whole trainers.loop.train_step of the tiny default (full fine-tuning, KL reference copy)."""
    from harness.backbones.base import concat_prompts as cat
    from trainers.config import TrainConfig
    from trainers.loop import build_trainer, step_prompts, train_step
    for method in ("ht-grpo", "tracegrpo"):
        cfg = TrainConfig(method={"name": method, "inner_iterations": 2},
                          rollout={"prompts_per_step": 2, "group_size": 2, "batch_size": 64,
                                   "sampler": {"steps": 3}},
                          checkpoint={"eval_suite": None}, tensorboard=False)
        tr = build_trainer(cfg)
        texts = [m["prompt"] for m in step_prompts(cfg, 0) for _ in range(2)]
        prompts = tr.backbone.tokenize(texts)
        measured, out = F.count_flops(lambda: train_step(tr, 0))
        model = F.train_step_flops(
            F.arch_of(tr.backbone.module), rollouts=4, layout=F.layout_of(tr.backbone, prompts),
            rollout_layout=F.layout_of(tr.backbone, cat(prompts, tr.backbone.uncond(4))), sampler_steps=3,
            views=round(out["forward_passes_per_update"] * 2), masked_entropy=tr.method.needs_masked_entropy(cfg.method),
            reference=True, trainable="full")
        assert measured == pytest.approx(model.total.hardware, rel=0.02), method


def test_memory_model_8b():
    """The documented LoRA and weight sizes; full FT of 8B in bf16 with a KL reference does not fit 80 GB."""
    lay = F.mmada_layout(512)
    m = F.memory_model(F.MMADA, lora_r=128, layout=lay, micro_batch=3)
    assert m["weights"] == pytest.approx(16.2e9, rel=0.01)
    assert m["lora"] + m["grads"] + m["optimizer"] == pytest.approx(16 * 32 * 81920 * 128)   # 5.4 GB at r = 128
    assert m["peak"] < 80e9
    no_ckpt = F.memory_model(F.MMADA, lora_r=128, layout=lay, micro_batch=3, gradient_checkpointing=False)
    assert no_ckpt["activations"] > 5 * m["activations"]
    full = F.memory_model(F.MMADA, trainable="full", layout=lay, micro_batch=1)
    assert full["static"] > 80e9
