"""MMaDA and Lumina-DiMOO adapters on tiny random replicas written in the official on-disk formats.

The replicas (harness.backbones.replicas) have the real vocabulary rows, so every special id and
image-id offset is the real one; d_model is 16 with 2 layers. Expected sequences are written out
by hand from ../shared backbones.md (§1.3, §2.2, §2.3), not from the adapters' own constants.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import pytest
import torch
from safetensors import safe_open

from harness import registry
from harness.backbones.base import Backbone, concat_prompts, token_logprobs
from harness.backbones.llada import LLaDA, LLaDAConfig, config_from_json
from harness.backbones.lora import apply_lora, has_lora
from harness.backbones.lumina_dimoo import LuminaDiMOOBackbone, load_lumina_dimoo
from harness.backbones.magvit import LFQuantizer
from harness.backbones.mmada import MMaDABackbone, load_mmada
from harness.backbones.replicas import WORD_ID_START, WORDS, make_dimoo_replica, make_mmada_replica
from harness.sampling import sample, sampler_config

BLOCK_NAMES = ("attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj", "up_proj", "ff_out")


def words(text: str) -> list[int]:
    """Ids of plain words in the replica tokenizers."""
    return [WORD_ID_START + WORDS.index(w) for w in text.split()]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    return {"mmada": make_mmada_replica(root / "mmada", seed=1), "dimoo": make_dimoo_replica(root / "dimoo", seed=2)}


@pytest.fixture(scope="module")
def mm(dirs):
    return load_mmada(dirs["mmada"], dtype="float32", resolution=64)           # 4 x 4 grid


@pytest.fixture(scope="module")
def dm(dirs):
    return load_lumina_dimoo(dirs["dimoo"], dtype="float32", height=32, width=48)   # 2 x 3 grid, not square


@pytest.fixture(params=["mmada", "dimoo"])
def bb(request, mm, dm):
    return mm if request.param == "mmada" else dm


# --- hand-built sequences (the facts, independent of the adapters' code) ------------------------------

def mmada_sequence(text_ids: list[int], codes: list[int]) -> tuple[list[int], int]:
    """[iPAD]* <|t2i|> <bos> text <eos> (513) <|soi|> slots <|eoi|>; returns ids and the first slot index."""
    prompt = [126088, 126080] + text_ids + [126081]
    prompt = [126093] * (513 - len(prompt)) + prompt
    slots = [126336 if c < 0 else c + 126349 for c in codes]
    return prompt + [126084] + slots + [126085], 514


DIMOO_SYSTEM = [2001] + words("Generate an image according to the text prompt .") + [2002]


def dimoo_image_part(codes: list[list[int]]) -> list[int]:
    rows = [[126336 if c < 0 else c + 126356 for c in row] + [126084] for row in codes]
    return [126354, 126349] + [t for r in rows for t in r] + [126350, 126355]


# --- LLaDA module and checkpoint format ----------------------------------------------------------------

def test_replica_checkpoint_has_official_key_names(dirs):
    with safe_open(str(dirs["mmada"] / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    expected = {"model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight"}
    expected |= {f"model.transformer.blocks.{i}.{n}.weight" for i in range(2) for n in BLOCK_NAMES}
    assert keys == expected
    config = json.loads((dirs["mmada"] / "config.json").read_text())
    assert config["d_model"] == 16 and config["n_layers"] == 2 and config["block_type"] == "llama"


def test_llada_config_reading_is_tolerant_and_strict_about_features():
    hf_style = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
                "vocab_size": 100, "rope_theta": 500000.0, "rms_norm_eps": 1e-5}
    c = config_from_json(hf_style)
    assert (c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.mlp_hidden_size, c.embedding_size) == (32, 2, 4, 4, 64, 100)
    llada = {"d_model": 32, "n_layers": 1, "n_heads": 4, "mlp_ratio": 3, "vocab_size": 100, "new_vocab_size": 128}
    c = config_from_json(llada)
    assert c.mlp_hidden_size == 96 and c.embedding_size == 128
    with pytest.raises(ValueError, match="block_group_size"):
        config_from_json({**llada, "block_group_size": 2})
    with pytest.raises(ValueError, match="n_layers"):
        config_from_json({"d_model": 32, "n_heads": 4, "mlp_hidden_size": 64, "vocab_size": 10})


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = LLaDA(LLaDAConfig(d_model=16, n_layers=2, n_heads=2, mlp_hidden_size=32, embedding_size=50)).init_weights(0.3)
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :3] = False
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(ids, mask, torch.tensor([[5, 6], [7, 8]]), (10, 20)).logsumexp(-1).sum().backward()
        grads.append(model.model.transformer.blocks[0].q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


# --- MMaDA layout ---------------------------------------------------------------------------------------

def test_mmada_prompt_layout_and_uncond(mm):
    p = mm.tokenize(["a red cube"])
    expected = [126093] * 507 + [126088, 126080] + words("a red cube") + [126081]
    assert p.ids[0].tolist() == expected and p.pad_side == "left"
    assert p.attn[0].tolist() == [False] * 507 + [True] * 6
    assert p.maskable[0].tolist() == [False] * 509 + [True] * 3 + [False]
    u = mm.uncond(2)
    assert u.ids.tolist() == [[126093] * 510 + [126088, 126080, 126081]] * 2
    assert not u.maskable.any() and u.texts == ["", ""]
    long = mm.tokenize(["a " * 600])
    assert long.ids.shape == (1, 513) and long.attn.all()
    assert long.ids[0, :3].tolist() == [126088, 126080, words("a")[0]] and long.ids[0, -1] == 126081


def test_mmada_prompt_same_when_tokenizer_adds_bos(mm):
    class AddsBos:    # a tokenizer that prepends BOS itself must give the same row (BOS added only if missing)
        bos_token_id, eos_token_id = 126080, 126081

        def __call__(self, text):
            return {"input_ids": [126080] + mm.tokenizer(text)["input_ids"]}
    with_bos = MMaDABackbone(mm.module, AddsBos(), mm.vq, resolution=64)
    assert with_bos.prompt_row("a red cube") == mm.prompt_row("a red cube")


def test_mmada_sequence_layout(mm):
    codes = torch.tensor([[0, 8191, -1, 5] * 4])
    ids, key_mask, positions = mm.build_inputs(mm.tokenize(["a red cube"]), codes)
    expected, first = mmada_sequence(words("a red cube"), codes[0].tolist())
    assert ids[0].tolist() == expected and len(expected) == 513 + 1 + 16 + 1
    assert ids[0, 514:518].tolist() == [126349, 134540, 126336, 126354]
    assert positions[0].tolist() == list(range(first, first + 16))
    assert key_mask[0].tolist() == [False] * 507 + [True] * (6 + 18)


def test_mmada_released_resolution_layout(mm):
    full = MMaDABackbone(mm.module, mm.tokenizer, mm.vq)      # 512 px: 32 x 32 = 1024 slots
    assert full.grid == (32, 32) and full.image_size == (512, 512)
    ids, _, positions = full.build_inputs(full.uncond(1), torch.full((1, 1024), -1))
    assert ids.shape == (1, 1539)
    assert positions[0].tolist() == list(range(1539 - 1025, 1539 - 1))      # input_ids[:, -(1024+1):-1]
    assert ids[0, 513] == 126084 and ids[0, -1] == 126085


# --- Lumina-DiMOO layout ----------------------------------------------------------------------------------

def test_dimoo_prompt_layout_and_uncond(dm):
    p = dm.tokenize(["a red cube", "photo of two blue dogs"])
    first = DIMOO_SYSTEM + [2003] + words("a red cube") + [2004]
    second = DIMOO_SYSTEM + [2003] + words("photo of two blue dogs") + [2004]
    assert p.pad_side == "right" and p.ids.shape == (2, len(second))
    assert p.ids[0, :len(first)].tolist() == first and p.ids[1].tolist() == second
    assert p.attn.sum(1).tolist() == [len(first), len(second)]
    assert p.maskable[0].nonzero().flatten().tolist() == [len(DIMOO_SYSTEM) + 1 + i for i in range(3)]
    assert p.maskable[1].sum() == 5
    u = dm.uncond(1)
    assert u.ids[0].tolist() == DIMOO_SYSTEM + [2003, 126351, 2004] and not u.maskable.any()


def test_dimoo_sequence_layout_right_padded(dm):
    codes = torch.tensor([[0, 1, -1, 8191, -1, 2], [3, 3, 3, 3, 3, 3]])
    p = dm.tokenize(["a red cube", "photo of two blue dogs"])
    ids, key_mask, positions = dm.build_inputs(p, codes)
    for i, text in enumerate(["a red cube", "photo of two blue dogs"]):
        prompt = DIMOO_SYSTEM + [2003] + words(text) + [2004]
        part = dimoo_image_part(codes[i].view(2, 3).tolist())
        row = prompt + part
        assert ids[i, :len(row)].tolist() == row and key_mask[i].sum() == len(row)
        assert not key_mask[i, len(row):].any() and (ids[i, len(row):] == 0).all()
        assert positions[i].tolist() == [len(prompt) + j for j in (2, 3, 4, 6, 7, 8)]
    assert dimoo_image_part([[0, 1, -1], [8191, -1, 2]]) == [126354, 126349, 126356, 126357, 126336, 126084,
                                                           134547, 126336, 126358, 126084, 126350, 126355]


def test_dimoo_grid_follows_resolution_and_logit_width_is_checked(dm, mm):
    wide = dm.at_resolution(1024, 512)
    assert wide.grid == (64, 32) and wide.image_size == (1024, 512) and wide.module is dm.module
    assert dm.grid == (2, 3)
    with pytest.raises(ValueError, match="multiples of 16"):
        dm.at_resolution(1000, 512)
    with pytest.raises(ValueError, match="134548"):
        LuminaDiMOOBackbone(mm.module, dm.tokenizer, dm.vq)      # MMaDA's head has 134656 rows


# --- forward semantics (both backbones) -------------------------------------------------------------------

def direct_image_logprobs(bb, text: str, fed: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets | prompt, fed codes) at every slot: a hand-built sequence through the raw module,
    the full head, then the codebook slice."""
    if bb.name == "mmada":
        ids, first = mmada_sequence(words(text), fed.tolist())
        positions, offset = list(range(first, first + len(fed))), 126349
        key_mask = [i != 126093 for i in ids]
    else:
        prompt = DIMOO_SYSTEM + [2003] + words(text) + [2004]
        ids = prompt + dimoo_image_part(fed.view(bb.grid).tolist())
        w = bb.grid[1]
        positions = [len(prompt) + 2 + r * (w + 1) + c for r in range(bb.grid[0]) for c in range(w)]
        offset, key_mask = 126356, [True] * len(ids)
    hidden = bb.llada.hidden_states(torch.tensor([ids]), torch.tensor([key_mask]))[0, positions]
    logits = hidden @ bb.llada.model.transformer.ff_out.weight.T            # every vocabulary row
    logp = logits[:, offset:offset + 8192].log_softmax(-1)
    return logp.gather(1, targets[:, None])[:, 0]


@torch.no_grad()
def test_token_logprobs_matches_direct_computation(bb):
    n = bb.grid[0] * bb.grid[1]
    codes = torch.randint(0, 8192, (1, n), generator=torch.Generator().manual_seed(3))
    visible = torch.ones(1, n, dtype=torch.bool)
    visible[0, 2] = False                                   # all slots visible except one
    got = token_logprobs(bb, bb.tokenize(["a red cube"]), codes, visible).logp[0]
    want = direct_image_logprobs(bb, "a red cube", codes[0].masked_fill(~visible[0], -1), codes[0])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_single_and_batched_forward_agree(bb):
    n = bb.grid[0] * bb.grid[1]
    texts = ["a red cube", "photo of two blue dogs"]
    codes = torch.randint(0, 8192, (2, n), generator=torch.Generator().manual_seed(4))
    codes[0, ::2] = -1
    codes[1, 1::3] = -1
    prompts = bb.tokenize(texts)
    batched = bb.image_logits(prompts, codes)
    assert batched.shape == (2, n, 8192) and batched.dtype == torch.float32
    for i in range(2):
        alone = bb.image_logits(bb.tokenize([texts[i]]), codes[i:i + 1])
        torch.testing.assert_close(batched[i], alone[0], atol=1e-5, rtol=1e-5)
    # the CFG forward re-pads cond and uncond together; each half must still equal its own forward
    both = bb.image_logits(concat_prompts(prompts, bb.uncond(2)), torch.cat([codes, codes]))
    torch.testing.assert_close(both[:2], batched, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[2:], bb.image_logits(bb.uncond(2), codes), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_padding_never_makes_attention_causal(bb):
    n = bb.grid[0] * bb.grid[1]
    prompts = bb.tokenize(["a red cube", "photo of two blue dogs"])     # both layouts carry padding here
    assert not prompts.attn.all()
    codes = torch.full((2, n), -1)
    base = bb.image_logits(prompts, codes)
    later = codes.clone()
    later[:, -1] = 7                                                     # the last slot: after every other
    changed = bb.image_logits(prompts, later)
    assert (changed[:, 0] - base[:, 0]).abs().max() > 1e-4               # slot 0 sees the later token
    ids, key_mask, _ = bb.build_inputs(prompts, codes)
    first_real = key_mask.long().argmax(1)
    h0 = bb.llada.hidden_states(ids, key_mask)
    ids2 = ids.clone()
    last_real = key_mask.shape[1] - 1 - key_mask.flip(1).long().argmax(1)
    ids2[torch.arange(2), last_real] = 1001                               # change each row's last real token
    h1 = bb.llada.hidden_states(ids2, key_mask)
    rows = torch.arange(2)
    assert ((h1[rows, first_real] - h0[rows, first_real]).abs().amax(-1) > 1e-4).all()
    # and pads are invisible: changing a pad token's id changes no real position
    pad_at = (~key_mask).nonzero()[0]
    ids3 = ids.clone()
    ids3[pad_at[0], pad_at[1]] = 1002
    h3 = bb.llada.hidden_states(ids3, key_mask)
    torch.testing.assert_close(h3[key_mask], h0[key_mask])


def test_sampler_runs_two_steps(bb):
    preset = "mmada" if bb.name == "mmada" else "lumina-dimoo"
    prompts = bb.tokenize(["a red cube", "two dogs"])
    a = sample(bb, prompts, sampler_config(preset, steps=2), seed=5)
    b = sample(bb, prompts, sampler_config(preset, steps=2), seed=5)
    n = bb.grid[0] * bb.grid[1]
    assert a.codes.shape == (2, n) and a.codes.min() >= 0 and a.codes.max() < 8192
    assert (a.commit_step >= 0).all() and torch.equal(a.codes, b.codes)


def test_encode_decode_shapes(bb):
    n = bb.grid[0] * bb.grid[1]
    codes = torch.randint(0, 8192, (2, n))
    images = bb.decode(codes)
    assert images.shape == (2, 3, *bb.image_size) and images.min() >= 0 and images.max() <= 1
    back = bb.encode(images)
    assert back.shape == (2, n) and back.dtype == torch.long and back.min() >= 0 and back.max() < 8192
    with pytest.raises(ValueError, match="encode"):
        bb.encode(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="codes"):
        bb.decode(torch.full((1, n), -1))


def test_lfq_code_is_sum_of_bit_powers():
    q = LFQuantizer(13)
    z = -torch.ones(1, 13, 1, 3)
    z[0, 0, 0, 0] = 0.5                  # channel 0 is the top bit: 2^12
    z[0, 12, 0, 1] = 2.0                 # channel 12 is the bottom bit: 2^0
    z[0, :, 0, 2] = 1.0                  # all bits
    assert q.codes_of(z).tolist() == [[4096, 1, 8191]]
    every = torch.arange(8192).view(1, -1)
    assert torch.equal(q.codes_of(q.latents_of(every, (64, 128))), every)


# --- LoRA ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def test_lora_wraps_block_linears_and_disable_adapter_restores_base(dirs, tmp_path):
    bb = load_mmada(dirs["mmada"], dtype="float32", resolution=64)
    prompts = bb.tokenize(["a red cube"])
    codes = torch.full((1, 16), -1)
    codes[0, :5] = 9
    base = bb.image_logits(prompts, codes)
    apply_lora(bb, r=2, alpha=4, dropout=0.0, targets=list(bb.lora_targets))
    assert has_lora(bb.module)
    wrapped = {name.split("base_model.model.")[-1] for name, m in bb.module.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {f"model.transformer.blocks.{i}.{t}" for i in range(2)
                       for t in ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")}
    assert all("lora_" in n for n, p in bb.module.named_parameters() if p.requires_grad)
    torch.testing.assert_close(bb.image_logits(prompts, codes), base)   # lora_B starts at zero
    for name, p in bb.module.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    adapted = bb.image_logits(prompts, codes)
    assert (adapted - base).abs().max() > 1e-3
    with bb.module.disable_adapter():
        torch.testing.assert_close(bb.image_logits(prompts, codes), base)
    bb.save(tmp_path / "adapter.safetensors")
    again = load_mmada(dirs["mmada"], dtype="float32", resolution=64, lora=tmp_path / "adapter.safetensors")
    torch.testing.assert_close(again.image_logits(prompts, codes), adapted)
    with pytest.raises(ValueError, match="not Linear modules"):
        apply_lora(load_mmada(dirs["mmada"], dtype="float32", resolution=64), targets=["o_proj"])


# --- loading ------------------------------------------------------------------------------------------------

def test_missing_weights_are_a_clear_error(tmp_path, dirs):
    with pytest.raises(FileNotFoundError, match="Gen-Verse/MMaDA-8B-Base") as e:
        load_mmada(tmp_path / "nowhere")
    assert "config.json" in str(e.value) and "showlab/magvitv2" in str(e.value)
    with pytest.raises(FileNotFoundError, match="Alpha-VLLM/Lumina-DiMOO") as e:
        load_lumina_dimoo(tmp_path / "nowhere")
    assert "vqvae" in str(e.value)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text((dirs["mmada"] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_mmada(tmp_path / "half")


def test_backbones_meet_the_protocol_and_registry(mm, dm):
    assert isinstance(mm, Backbone) and isinstance(dm, Backbone)
    assert registry.get("backbones", "mmada") is load_mmada
    assert registry.get("backbones", "lumina-dimoo") is load_lumina_dimoo
    assert mm.text_mask_id == dm.text_mask_id == 126336 and mm.codebook_size == dm.codebook_size == 8192


def test_bf16_weights_give_fp32_logits_close_to_fp32(dirs, mm):
    half = load_mmada(dirs["mmada"], dtype="bfloat16", resolution=64)
    assert half.llada.model.transformer.wte.weight.dtype == torch.bfloat16
    prompts = mm.tokenize(["a red cube"])
    codes = torch.full((1, 16), -1)
    with torch.no_grad():
        got, want = half.image_logits(prompts, codes), mm.image_logits(prompts, codes)
    assert got.dtype == torch.float32
    assert (got - want).abs().max() < 0.1 * want.abs().max()


def test_lora_gradients_flow_with_gradient_checkpointing(dirs):
    bb = load_lumina_dimoo(dirs["dimoo"], dtype="float32", height=32, width=48,
                           lora={"r": 2, "alpha": 4, "dropout": 0.0}, gradient_checkpointing=True)
    with torch.no_grad():
        for name, p in bb.module.named_parameters():
            if "lora_B" in name:
                p.fill_(0.1)
    bb.module.train()
    codes = torch.randint(0, 8192, (1, 6), generator=torch.Generator().manual_seed(6))
    token_logprobs(bb, bb.tokenize(["a red cube"]), codes, torch.zeros(1, 6, dtype=torch.bool)).logp.sum().backward()
    grads = {n: p.grad for n, p in bb.module.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert bb.llada.model.transformer.wte.weight.grad is None            # the base stays frozen
