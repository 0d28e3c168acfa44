"""model.py: causality, the KV cache, sampling, initialisation, parameter groups and that every variant trains."""

import itertools
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import metrics_records

import train
from gpt_residual import optim
from gpt_residual.dataset import load_tokens
from gpt_residual.engine import filter_logits, generate, generate_stream, next_token
from model import GPT, GPTConfig

# the norms with statistics at the four single placements (DyT, Derf and Mix-LN: below, and tests/test_frontier.py)
NORMS, NORM_POSITIONS = ("layernorm", "rmsnorm"), ("pre", "post", "peri", "reordered")
# every such norm at every position, with and without bias; then DeepNorm and the no-residual ablation
VARIANTS = [
    dict(norm=norm, norm_position=pos, bias=bias)
    for norm, pos, bias in itertools.product(NORMS, NORM_POSITIONS, (True, False))
]
VARIANTS += [
    dict(norm="layernorm", norm_position="post", bias=True, deepnorm=True),
    dict(norm="rmsnorm", norm_position="post", bias=False, deepnorm=True),
    dict(norm="layernorm", norm_position="pre", bias=True, residual=False),
    dict(norm="rmsnorm", norm_position="post", bias=False, residual=False),
]
# the point-wise norms where they may sit, and Mix-LN (one post-LN block of the two, then pre-LN)
VARIANTS += [
    dict(norm="dyt", norm_position="pre", bias=True),
    dict(norm="derf", norm_position="pre", bias=False),
    dict(norm="derf", norm_position="peri", bias=True),
    dict(norm="dyt", norm_position="reordered", bias=False),
    dict(norm="layernorm", norm_position="mix", bias=True, mix_ln_frac=0.5),
    dict(norm="rmsnorm", norm_position="mix", bias=False, mix_ln_frac=0.5),
]


def variant_id(v: dict) -> str:
    extra = "-deepnorm" if v.get("deepnorm") else "-noresidual" if v.get("residual") is False else ""
    return f"{v['norm']}-{v['norm_position']}-{'bias' if v['bias'] else 'nobias'}{extra}"


VARIANT_IDS = [variant_id(v) for v in VARIANTS]


def make_model(seed=0, sharp=1.0, **overrides) -> GPT:
    """A small random model. sharp scales every matrix: a freshly initialised model's greedy text
    falls into a short loop whatever the context, so tests that need the context to matter (which
    tokens the sliding window keeps) use sharp=30."""
    values = dict(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    values.update(overrides)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**values))
    # random norm gains/biases, so a bug hidden by ones/zeros (e.g. a missing norm) still shows
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or name.startswith("transformer.ln_f"):
                p.add_(0.3 * torch.randn_like(p))
            elif p.dim() == 2:
                p.mul_(sharp)
    return model.eval()


def all_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    logits, _ = model(idx, torch.zeros_like(idx))  # targets make forward return every position
    return logits


# ----------------------------------------------------------------------------- causality


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_causal_every_variant(variant):
    model = make_model(**variant)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 37, (2, 16), generator=g)
    with torch.no_grad():
        base = all_logits(model, idx)
        for t in (0, 1, 7, 15):
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 5) % 37
            new = all_logits(model, changed)
            assert torch.allclose(new[:, :t], base[:, :t], atol=1e-6, rtol=0), f"position < {t} saw token {t}"
            assert (new[:, t] - base[:, t]).abs().max() > 1e-4, f"position {t} ignores its own token"


def test_forward_rejects_sequence_longer_than_block_size():
    model = make_model()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_forward_without_targets_is_last_position():
    model = make_model()
    idx = torch.randint(0, 37, (3, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = all_logits(model, idx)
        last, loss = model(idx)
    assert loss is None
    assert last.shape == (3, 1, 37)
    assert torch.allclose(last[:, 0], full[:, -1], atol=1e-6, rtol=0)


def test_forward_loss_is_cross_entropy():
    model = make_model()
    g = torch.Generator().manual_seed(3)
    idx, targets = torch.randint(0, 37, (2, 9), generator=g), torch.randint(0, 37, (2, 9), generator=g)
    with torch.no_grad():
        logits, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 37), targets.reshape(-1))
    assert torch.allclose(loss, expected, atol=1e-6)


# ----------------------------------------------------------------------------- KV cache and generation


def prompt(batch: int, length: int, seed: int = 4) -> torch.Tensor:
    return torch.randint(0, 37, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize(
    "batch,length,new",
    [(1, 3, 10), (1, 1, 15), (1, 5, 40), (2, 4, 12), (2, 6, 37), (1, 20, 9)],
    ids=["within", "fills-block", "past-block", "batch2-within", "batch2-past", "prompt-longer-than-block"],
)
def test_cache_equals_no_cache(variant, batch, length, new):
    model = make_model(sharp=30, **variant)
    idx = prompt(batch, length)
    cached = generate(model, idx, new, temperature=0, use_cache=True)
    plain = generate(model, idx, new, temperature=0, use_cache=False)
    assert cached.shape == (batch, length + new)
    assert torch.equal(cached[:, :length], idx)
    assert torch.equal(cached, plain)


def naive_nanogpt(model: GPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    """nanoGPT's generate: crop to the last block_size tokens, run the whole context, take the argmax."""
    bs = model.config.block_size
    for _ in range(n):
        logits, _ = model(idx[:, -bs:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def naive_sliding(model: GPT, idx: torch.Tensor, n: int, keep: int | None = None) -> torch.Tensor:
    """The docstring's policy: when the text outgrows block_size, cut the context to its last
    block_size // 2 tokens and let it fill up again; each step runs the whole context."""
    bs = model.config.block_size
    keep = bs // 2 if keep is None else keep
    start = 0
    for _ in range(n):
        if idx.size(1) - start > bs:
            start = idx.size(1) - keep
        logits, _ = model(idx[:, start:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("batch", [1, 2])
def test_cached_greedy_equals_naive_reference(variant, batch):
    model = make_model(sharp=30, **variant)
    idx = prompt(batch, 3, seed=5)
    with torch.no_grad():
        # within block_size the policy is plain nanoGPT generation
        cached = generate(model, idx, 13, temperature=0, use_cache=True)
        assert torch.equal(cached, naive_nanogpt(model, idx, 13))
        # past block_size: the documented sliding window
        cached = generate(model, idx, 45, temperature=0, use_cache=True)
        assert torch.equal(cached, naive_sliding(model, idx, 45))


@pytest.mark.parametrize("use_cache", [True, False])
def test_sliding_window_is_observable(use_cache):
    """For this model the context matters: keeping other tokens than the policy's changes the text,
    so the comparisons with naive_sliding above can fail."""
    model = make_model(sharp=30, norm_position="pre")
    idx = prompt(2, 3, seed=5)
    with torch.no_grad():
        out = generate(model, idx, 45, temperature=0, use_cache=use_cache)
        assert torch.equal(out, naive_sliding(model, idx, 45))
        assert not torch.equal(out, naive_sliding(model, idx, 45, keep=9))
        assert not torch.equal(out, naive_nanogpt(model, idx, 45))  # crop to the last block_size tokens
    assert all(len(set(row.tolist())) >= 5 for row in out[:, 3:])


def test_generate_zero_tokens_returns_prompt():
    model = make_model()
    idx = prompt(2, 5)
    assert torch.equal(generate(model, idx, 0), idx)
    assert list(generate_stream(model, idx, 0)) == []


def test_generate_stream_yields_columns():
    model = make_model()
    idx = prompt(2, 4)
    cols = list(generate_stream(model, idx, 21, temperature=0))
    assert len(cols) == 21
    assert all(c.shape == (2, 1) and c.dtype == torch.long for c in cols)
    assert torch.equal(torch.cat([idx, *cols], dim=1), generate(model, idx, 21, temperature=0))


def test_greedy_is_deterministic():
    model = make_model()
    idx = prompt(2, 4)
    torch.manual_seed(0)
    a = generate(model, idx, 30, temperature=0)
    torch.manual_seed(123)
    b = generate(model, idx, 30, temperature=0)
    assert torch.equal(a, b)


@pytest.mark.parametrize("use_cache", [True, False])
def test_sampling_reproducible_with_seed(use_cache):
    model = make_model()
    idx = prompt(2, 4)
    torch.manual_seed(7)
    a = generate(model, idx, 30, temperature=1.0, use_cache=use_cache)
    torch.manual_seed(7)
    b = generate(model, idx, 30, temperature=1.0, use_cache=use_cache)
    torch.manual_seed(8)
    c = generate(model, idx, 30, temperature=1.0, use_cache=use_cache)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # a near-uniform model over 37 tokens: 60 draws cannot all agree
    assert a.min() >= 0 and a.max() < 37


def test_top_k_1_and_tiny_top_p_are_greedy():
    model = make_model()
    idx = prompt(2, 4)
    greedy = generate(model, idx, 30, temperature=0)
    torch.manual_seed(0)
    assert torch.equal(generate(model, idx, 30, temperature=1.0, top_k=1), greedy)
    torch.manual_seed(0)
    assert torch.equal(generate(model, idx, 30, temperature=1.0, top_p=1e-6), greedy)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_next_token_draws_follow_the_distribution(temperature):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = probs.log().expand(40_000, -1)  # 40k independent rows, one draw each
    torch.manual_seed(0)
    draws = next_token(logits, temperature, None, None)
    assert draws.shape == (40_000, 1)
    freq = torch.bincount(draws.flatten(), minlength=5).float() / 40_000
    expected = F.softmax(probs.log() / temperature, dim=-1)
    assert torch.allclose(freq, expected, atol=0.01), (freq, expected)  # ~4 standard errors
    assert freq[4] == 0  # a zero-probability token is never drawn
    assert torch.equal(next_token(logits[:3], 0.0, None, None), torch.zeros(3, 1, dtype=torch.long))


def test_filter_logits_top_k():
    logits = torch.tensor([[0.1, 2.0, -1.0, 3.0, 0.5, 1.5], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    out = filter_logits(logits, 2, None)
    kept = torch.isfinite(out)
    assert kept.sum(dim=1).tolist() == [2, 2]
    assert kept[0].nonzero().flatten().tolist() == [1, 3]
    assert kept[1].nonzero().flatten().tolist() == [0, 1]
    assert torch.equal(out[kept], logits[kept])  # kept logits are unchanged
    assert torch.isneginf(out[~kept]).all()
    assert torch.equal(filter_logits(logits, 6, None), logits)


@pytest.mark.parametrize(
    "top_p,nucleus", [(0.4, [2]), (0.7, [2, 0]), (0.9, [2, 0, 3]), (0.99, [2, 0, 3, 1]), (1.0, [0, 1, 2, 3])]
)
def test_filter_logits_top_p(top_p, nucleus):
    probs = torch.tensor([[0.3, 0.05, 0.5, 0.15]])  # sorted: 0.5 (2), 0.3 (0), 0.15 (3), 0.05 (1)
    out = filter_logits(probs.log(), None, top_p)
    kept = torch.isfinite(out)[0].nonzero().flatten().tolist()
    assert sorted(kept) == sorted(nucleus)
    assert torch.allclose(out[0, kept], probs.log()[0, kept])


def test_filter_logits_top_k_then_top_p():
    probs = torch.tensor([[0.3, 0.05, 0.5, 0.15]])
    out = filter_logits(probs.log(), 3, 0.9)
    assert torch.isfinite(out)[0].nonzero().flatten().tolist() == [0, 2, 3]
    out = filter_logits(probs.log(), 1, 0.9)
    assert torch.isfinite(out)[0].nonzero().flatten().tolist() == [2]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_new_tokens=-1),
        dict(top_k=38),
        dict(top_k=0),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_p=-0.1),
        dict(temperature=-1.0),
    ],
)
def test_generate_rejects_bad_arguments(kwargs):
    model = make_model()
    kwargs = {"max_new_tokens": 3, "temperature": 1.0, **kwargs}
    n = kwargs.pop("max_new_tokens")
    with pytest.raises(ValueError):
        generate(model, prompt(1, 3), n, **kwargs)
    with pytest.raises(ValueError):
        next(generate_stream(model, prompt(1, 3), n, **kwargs))


def test_generate_accepts_boundary_arguments():
    model = make_model()
    out = generate(model, prompt(1, 3), 4, temperature=1.0, top_k=37, top_p=1.0)
    assert out.shape == (1, 7)


# ----------------------------------------------------------------------------- structure and init


def test_init_std():
    torch.manual_seed(0)
    n_layer = 4
    model = GPT(GPTConfig(block_size=64, vocab_size=512, n_layer=n_layer, n_head=4, n_embd=128))
    resid = 0.02 / math.sqrt(2 * n_layer)
    seen_proj = seen_other = 0
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert abs(p.std().item() - resid) < 0.05 * resid, name
            assert abs(p.mean().item()) < 0.1 * resid, name
            seen_proj += 1
        elif p.dim() == 2:  # c_attn, c_fc, wte (= lm_head), wpe
            assert abs(p.std().item() - 0.02) < 0.05 * 0.02, name
            seen_other += 1
        elif name.endswith(".bias") and "ln_" not in name:
            assert torch.equal(p, torch.zeros_like(p)), name
    assert seen_proj == 2 * n_layer
    assert seen_other == 2 * n_layer + 2
    assert abs(model.lm_head.weight.std().item() - 0.02) < 0.001


def test_weight_tying():
    model = make_model()
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert sum(1 for n in names if n in ("lm_head.weight", "transformer.wte.weight")) == 1


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("position", NORM_POSITIONS)
def test_final_norm_except_post_ln(norm, position):
    """Post-LN blocks end in a norm, so there is no final one (ln_f is Identity); pre- and peri-LN have one."""
    model = make_model(norm=norm, norm_position=position)
    norm_cls = nn.RMSNorm if norm == "rmsnorm" else nn.LayerNorm
    if position == "post":
        assert isinstance(model.transformer.ln_f, nn.Identity)
    else:
        assert isinstance(model.transformer.ln_f, norm_cls)
    for block in model.transformer.h:
        assert isinstance(block.ln_1, norm_cls) and isinstance(block.ln_2, norm_cls)
    kinds = [type(m) for m in model.modules()]
    other = nn.LayerNorm if norm == "rmsnorm" else nn.RMSNorm
    assert other not in kinds  # rmsnorm: no LayerNorm anywhere, and the reverse
    per_block = 4 if position == "peri" else 2
    assert sum(k is norm_cls for k in kinds) == 2 * per_block + (position != "post")


def test_layernorm_bias_switch():
    with_bias, without = make_model(bias=True), make_model(bias=False)
    assert with_bias.transformer.h[0].ln_1.bias is not None
    assert without.transformer.h[0].ln_1.bias is None
    assert without.transformer.h[0].attn.c_attn.bias is None
    assert with_bias.transformer.h[0].mlp.c_fc.bias is not None


def test_post_ln_differs_from_pre_ln():
    """Same weights, different norm position -> different function (the switch is wired)."""
    pre = make_model(norm_position="pre")
    post = make_model(norm_position="post")
    post.load_state_dict({k: v for k, v in pre.state_dict().items() if not k.startswith("transformer.ln_f")})
    idx = prompt(1, 8)
    with torch.no_grad():
        assert not torch.allclose(all_logits(pre, idx), all_logits(post, idx), atol=1e-3)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("position", NORM_POSITIONS)
def test_block_follows_the_documented_formula(norm, position):
    """pre: x + f(norm(x)); post: norm(x + f(x)); peri: x + norm_out(f(norm(x))); reordered: x + norm(f(x)),
    for attention then MLP."""
    model = make_model(norm=norm, norm_position=position)
    block = model.transformer.h[0]
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        if position == "pre":
            h = x + block.attn(block.ln_1(x))
            expected = h + block.mlp(block.ln_2(h))
        elif position == "post":
            h = block.ln_1(x + block.attn(x))
            expected = block.ln_2(h + block.mlp(h))
        elif position == "peri":
            h = x + block.ln_1_out(block.attn(block.ln_1(x)))
            expected = h + block.ln_2_out(block.mlp(block.ln_2(h)))
        else:  # reordered (OLMo 2)
            h = x + block.ln_1(block.attn(x))
            expected = h + block.ln_2(block.mlp(h))
        assert torch.allclose(block(x), expected, atol=1e-6, rtol=0)


def test_bad_config_rejected():
    for bad in (dict(n_embd=30, n_head=4), dict(norm="batchnorm"), dict(norm_position="middle"), dict(n_layer=0)):
        with pytest.raises(ValueError):
            GPTConfig(**bad)


# ----------------------------------------------------------------------------- counting and the optimizer


def test_num_params():
    model = make_model()
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=False) == total
    assert model.num_params(non_embedding=True) == total - model.transformer.wpe.weight.numel()
    assert model.num_params() == total - 16 * 32
    # hand count for bias=False layernorm: wte 37*32, wpe 16*32, per layer 2 norms + attn + mlp, ln_f
    nobias = make_model(bias=False)
    c = 32
    per_layer = 2 * c + (c * 3 * c) + (c * c) + (c * 4 * c) + (4 * c * c)
    assert nobias.num_params(non_embedding=False) == 37 * c + 16 * c + 2 * per_layer + c


def test_configure_optimizer_groups():
    model = make_model(bias=True)
    opt = optim.build(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and len(decay["params"]) > 0
    assert all(p.dim() < 2 for p in no_decay["params"]) and len(no_decay["params"]) > 0
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids))  # each parameter once (the tied head/embedding too)
    assert set(ids) == {id(p) for p in model.parameters()}
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.param_groups[0]["betas"] == (0.9, 0.95)


def counted_flops_per_token(model: GPT, batch_size: int) -> float:
    """FLOPs of one training step (forward + backward of a full-length batch) as torch's FlopCounterMode counts
    them, per token. The math SDPA kernel computes attention as matmuls the counter sees; it has no formula for
    the fused CPU kernel, and would count attention as free."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    T = model.config.block_size
    device = next(model.parameters()).device
    idx = torch.randint(0, model.config.vocab_size, (batch_size, T), device=device)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss = model(idx, idx)
        loss.backward()
    return counter.get_total_flops() / (batch_size * T)


# flops_per_token's 6N counts every parameter; the counter counts only matmuls, so the biases and norm gains
# (elementwise work) are the whole gap: 0.3% of the tiny bias-free model's parameters, 0.09% of GPT-2 small's.
# Dropping the attention term would be 7% and 13% off; counting 4N or 8N instead of 6N, ~33%.
@pytest.mark.parametrize(
    "cfg, device, rel_tol",
    [
        (dict(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=65, bias=False), "cpu", 5e-3),
        (dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304), "meta", 1e-3),
    ],
    ids=["tiny", "gpt2-small-on-meta"],
)
def test_flops_per_token_matches_flop_counter(cfg, device, rel_tol):
    torch.manual_seed(0)
    with torch.device(device):  # meta: shapes only, so GPT-2 small is counted in seconds without its memory
        model = GPT(GPTConfig(**cfg, dropout=0.0))
    counted = counted_flops_per_token(model, batch_size=2 if device == "cpu" else 1)
    assert math.isclose(model.flops_per_token(), counted, rel_tol=rel_tol), (model.flops_per_token(), counted)


def test_mfu_is_flops_per_second_over_peak():
    model = make_model()
    assert math.isclose(model.estimate_mfu(1000.0, 1e12), model.flops_per_token() * 1000.0 / 1e12)
    assert math.isclose(model.estimate_mfu(2000.0, 1e12), 2 * model.estimate_mfu(1000.0, 1e12))


# ----------------------------------------------------------------------------- training


def unigram_entropy(folder) -> float:
    """The loss (nats per token) of predicting each token from the training split's token frequencies alone."""
    meta = json.loads((folder / "meta.json").read_text())
    counts = torch.bincount(torch.from_numpy(load_tokens(folder, "train", meta).astype("int64")))
    p = counts[counts > 0].double() / counts.sum()
    return float(-(p * p.log()).sum())


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("position", NORM_POSITIONS)
def test_every_variant_trains(tiny_cfg, char_data, norm, position):
    """Training must really learn: from about chance on the fixture's own character vocabulary (not
    TrainConfig's default vocab_size of 50304) at step 0 to below what token frequencies alone give,
    so the model uses its context."""
    cfg = tiny_cfg(norm=norm, norm_position=position, max_iters=150, eval_interval=50, eval_iters=8)
    result = train.train(cfg)
    chance = math.log(json.loads((char_data / "meta.json").read_text())["vocab_size"])
    initial = next(r for r in metrics_records(cfg.out_dir) if "val_loss" in r and r["step"] == 0)
    assert result["step"] == 150
    assert initial["val_loss"] > 0.95 * chance, (initial, chance)  # untrained: about chance
    for split in ("val", "train"):
        assert result[f"{split}_loss"] < unigram_entropy(char_data), (result, initial)
