"""Issue 26's switches, each against its formula: attn_gate (gated attention), norm_scaling (LayerNorm Scaling),
norm_position="mix" (Mix-LN), norm="dyt"|"derf" and depth_scaling (depth-muP, CompleteP) with the optimizer's
rules; Muon's q, k, v split; the refusals; torch.compile. (KV cache, training, exact resume, two ranks: the
FRONTIER and STACKS cases of test_switches.py.)"""

import functools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_one_line_error, needs_muon, run
from test_model import all_logits, make_model, prompt
from test_switches import FRONTIER, STACKS

import model as model_module
from gpt_residual import config, norms, optim
from gpt_residual.engine import generate
from model import GPT, ForwardContext, GPTConfig

SHAPE = dict(block_size=16, vocab_size=37, n_head=2, n_embd=32, dropout=0.0)


def block_input(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The stream entering block 0."""
    seen = {}
    handle = model.transformer.h[0].register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    with torch.no_grad():
        model(idx, idx)
    handle.remove()
    return seen["x"]


def test_defaults_are_off_and_add_nothing():
    c = GPTConfig()
    assert (c.attn_gate, c.norm_scaling, c.depth_scaling, c.norm, c.norm_position) == (
        "none", False, 0.0, "layernorm", "pre")
    model = make_model()
    assert not hasattr(model, "embed_scale") and c.branch_multiplier == 1.0
    for block in model.transformer.h:  # the exact torch classes: no output scale hides in them
        assert block.attn.gate is None and block.attn.out_scale == block.mlp.out_scale == 1.0
        assert type(block.ln_1) is nn.LayerNorm and type(block.ln_2) is nn.LayerNorm
    std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(4)) < 0.003  # GPT-2's 1/sqrt(2L) init of the projections is kept


# ----------------------------------------------------------------------------- gated attention


@pytest.mark.parametrize("kind", ["head", "elementwise"])
def test_gate_multiplies_sdpa_output_before_c_proj(kind):
    """y = c_proj(SDPA(q, k, v) * sigmoid(x W_g + b_g)), one gate per head or per channel (Qiu et al. 2025)."""
    model = make_model(attn_gate=kind)
    attn, (B, T, C, nh) = model.transformer.h[1].attn, (2, 7, 32, 2)
    x, pos = torch.randn(B, T, C, generator=torch.Generator().manual_seed(3)), torch.arange(T)
    with torch.no_grad():
        q, k, v = attn.project(x, pos, ForwardContext())
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)  # (B, T, nh, hs)
        g = torch.sigmoid(x @ attn.gate.weight.T + attn.gate.bias)
        assert g.shape == (B, T, nh if kind == "head" else C)
        expected = attn.c_proj((y * g.view(B, T, nh, -1)).reshape(B, T, C))
        assert torch.allclose(attn(x, None, pos, ForwardContext()), expected, atol=1e-6, rtol=0)
        # what an instrument's hook on attn.gate reads: the sigmoid values
        seen = {}
        attn.gate.register_forward_hook(lambda m, a, out: seen.update(g=out))
        attn(x, None, pos, ForwardContext())
        assert torch.equal(seen["g"], g) and 0 < g.min() and g.max() < 1


def test_gate_open_is_plain_attention_and_closed_leaves_c_proj_bias():
    """A wide-open gate (bias +30) computes the ungated model; a shut one (-30) zeroes SDPA's output, so the
    sub-layer outputs c_proj's bias alone (a gate after c_proj would output 0)."""
    plain = make_model(seed=2)
    gated = make_model(seed=2, attn_gate="head")
    gated.load_state_dict(plain.state_dict(), strict=False)
    idx = prompt(2, 9)
    with torch.no_grad():
        for block in gated.transformer.h:
            block.attn.gate.weight.zero_()
            block.attn.gate.bias.fill_(30.0)
        assert torch.allclose(all_logits(gated, idx), all_logits(plain, idx), atol=1e-5, rtol=0)
        attn, x = gated.transformer.h[0].attn, torch.randn(1, 5, 32)
        attn.gate.bias.fill_(-30.0)
        out = attn(x, None, torch.arange(5), ForwardContext())
        assert torch.allclose(out, attn.c_proj.bias.expand_as(out), atol=1e-6)


# ----------------------------------------------------------------------------- norm_scaling and Mix-LN


def test_norm_scaling_feeds_block_l_norm_over_sqrt_l():
    """LayerNorm Scaling (Sun et al. 2025): block l (1-based) feeds LN(x) / sqrt(l) to attention and MLP, with
    the norm's own weights; GPT-2's 1/sqrt(2L) projection init is dropped (N(0, 0.02) as every Linear)."""
    model = make_model(n_layer=3, norm_scaling=True)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        for i, block in enumerate(model.transformer.h):
            for ln in (block.ln_1, block.ln_2):
                plain = F.layer_norm(x, (32,), ln.weight, ln.bias, 1e-5)
                assert torch.allclose(ln(x), plain / math.sqrt(i + 1), atol=1e-6, rtol=0)
            h = x + block.attn(block.ln_1(x))
            assert torch.allclose(block(x), h + block.mlp(block.ln_2(h)), atol=1e-6, rtol=0)
    deep = GPT(GPTConfig(**SHAPE, n_layer=12, norm_scaling=True))
    assert abs(deep.transformer.h[5].mlp.c_proj.weight.std().item() - 0.02) < 0.002  # not 0.02 / sqrt(24)


@pytest.mark.parametrize("frac, n_post", [(0.25, 2), (0.5, 4), (0.0, 0), (1.0, 8), (0.3, 2)])
def test_mix_ln_is_post_then_pre(frac, n_post):
    """Mix-LN (Li et al. 2025): post-LN in the first floor(frac * n_layer) blocks, pre-LN after; a final norm
    unless the last block is post-LN."""
    model = GPT(GPTConfig(**SHAPE, n_layer=8, norm_position="mix", mix_ln_frac=frac))
    assert [b.position for b in model.transformer.h] == ["post"] * n_post + ["pre"] * (8 - n_post)
    assert isinstance(model.transformer.ln_f, nn.Identity) == (n_post == 8)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        for block in model.transformer.h:
            if block.position == "post":
                h = block.ln_1(x + block.attn(x))
                expected = block.ln_2(h + block.mlp(h))
            else:
                h = x + block.attn(block.ln_1(x))
                expected = h + block.mlp(block.ln_2(h))
            assert torch.allclose(block(x), expected, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- DyT and Derf


@pytest.mark.parametrize("kind", ["dyt", "derf"])
def test_pointwise_norms_follow_their_formula_with_per_site_alpha(kind):
    """DyT: w * tanh(a x) + b (Zhu et al. 2025); Derf: w * erf(a x + s) + b (Chen et al. 2025); the initial alpha
    per site; the embeddings times a learned scalar from sqrt(n_embd); readings() from the parameters alone."""
    alphas = dict(dyt_alpha_attn=0.7, dyt_alpha_mlp=0.3, dyt_alpha_final=0.1)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SHAPE, n_layer=2, norm=kind, **alphas))
    block = model.transformer.h[1]
    assert [block.ln_1.alpha.item(), block.ln_2.alpha.item(), model.transformer.ln_f.alpha.item()] == pytest.approx(
        [0.7, 0.3, 0.1])
    norm, x = block.ln_2, torch.randn(2, 5, 32)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
        if kind == "derf":
            norm.shift.fill_(0.4)
            inner = torch.erf(0.3 * x + 0.4)
        else:
            inner = torch.tanh(0.3 * x)
        assert torch.allclose(norm(x), norm.weight * inner + norm.bias, atol=1e-6, rtol=0)
        assert torch.equal(norm.squash(x), inner)
    expected = {"alpha": pytest.approx(0.3)} | ({"shift": pytest.approx(0.4)} if kind == "derf" else {})
    assert norm.readings() == expected
    assert model.embed_scale.item() == pytest.approx(math.sqrt(32))
    idx = prompt(2, 6)
    emb = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(6))
    assert torch.allclose(block_input(model, idx), emb * math.sqrt(32), atol=1e-6)
    assert not any(isinstance(m, (nn.LayerNorm, nn.RMSNorm)) for m in model.modules())  # every norm replaced


def test_pointwise_norm_without_affine_or_bias():
    model = make_model(norm="dyt", norm_affine=False)
    assert {n.split(".")[-1] for n, _ in model.named_parameters() if ".ln_" in n} == {"alpha"}
    model = make_model(norm="derf", bias=False)
    assert {n.split(".")[-1] for n, _ in model.named_parameters() if ".ln_" in n} == {"alpha", "shift", "weight"}


# ----------------------------------------------------------------------------- depth_scaling


@pytest.mark.parametrize("position", ["pre", "post", "peri", "reordered"])
def test_depth_scaling_multiplies_every_branch(position):
    """x + m * f(...) with m = (n_layer / base_depth) ** -a, the branch's last part included (its output norm in
    peri-LN and reordered); the same weights without the switch give f."""
    scaled = GPT(GPTConfig(**SHAPE, n_layer=4, norm_position=position, depth_scaling=0.5, base_depth=1))
    plain = GPT(GPTConfig(**SHAPE, n_layer=4, norm_position=position))
    plain.load_state_dict(scaled.state_dict())
    m, x = 0.5, torch.randn(2, 5, 32)  # (4 / 1) ** -0.5
    with torch.no_grad():
        b, p = scaled.transformer.h[2], plain.transformer.h[2]
        if position == "post":
            h = p.ln_1(x + m * p.attn(x))
            expected = p.ln_2(h + m * p.mlp(h))
        elif position == "peri":
            h = x + m * p.ln_1_out(p.attn(p.ln_1(x)))
            expected = h + m * p.ln_2_out(p.mlp(p.ln_2(h)))
        elif position == "reordered":
            h = x + m * p.ln_1(p.attn(x))
            expected = h + m * p.ln_2(p.mlp(h))
        else:
            h = x + m * p.attn(p.ln_1(x))
            expected = h + m * p.mlp(p.ln_2(h))
        assert torch.allclose(b(x), expected, atol=1e-6, rtol=0)
    assert abs(scaled.transformer.h[0].attn.c_proj.weight.std().item() - 0.02) < 0.003  # no 1/sqrt(2L)


@pytest.mark.parametrize("a, lr_factor", [(0.5, 0.5), (1.0, 1.0), (0.0, 1.0)])
@pytest.mark.parametrize("opt", ["adamw", pytest.param("muon", marks=needs_muon)])
def test_depth_scaling_optimizer_rules(a, lr_factor, opt):
    """CompleteP's Table 1 with m = 4 layers / base 1: inside the blocks lr * m^(a-1) and eps * m^-a; outside, the
    embeddings and the final norm as before; the decay where it was; every parameter in exactly one group."""
    model = make_model(n_layer=4, depth_scaling=a, base_depth=1, residual_scalars=True, value_residual=True)
    opt = optim.build(model, 0.1, 1e-3, (0.9, 0.95), "cpu", optimizer=opt, muon_lr=0.02, scalar_lr=0.5)
    where = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert len(where) == sum(1 for g in opt.param_groups for p in g["params"]) == len(list(model.parameters()))
    for name, p in model.named_parameters():
        g = where[id(p)]
        base = {"x0_lambdas": 500.0, "resid_lambdas": 5.0, "v_lambda": 50.0}.get(name.split(".")[-1], 1.0)
        if g.get("momentum") is not None:  # Muon's group
            base = 20.0
        inside = name.startswith("transformer.h.")
        assert g.get("lr_scale", 1.0) == pytest.approx(base * (lr_factor if inside else 1.0)), name
        if "momentum" not in g:
            assert g.get("eps", 1e-8) == pytest.approx(1e-8 * (4**-a if inside else 1.0)), name
        assert g["weight_decay"] == (0.1 if p.dim() == 2 and base in (1.0, 20.0) else 0.0), name


# ----------------------------------------------------------------------------- Muon: q, k and v apart


@needs_muon
def test_muon_steps_q_k_v_as_three_matrices():
    """optim.Muon on c_attn's (3C, C) weight == torch.optim.Muon on three (C, C) parameters with the same
    gradients, bit for bit over steps; whole (torch.optim.Muon) it steps otherwise: the shape rule's sqrt(3)."""
    g = torch.Generator().manual_seed(0)
    whole = nn.Parameter(torch.randn(24, 8, generator=g))
    parts = [nn.Parameter(t.clone()) for t in whole.detach().chunk(3)]
    plain = nn.Parameter(whole.detach().clone())
    split_opt = optim.Muon([whole], {id(whole): 3}, lr=0.02, weight_decay=0.1)
    parts_opt = torch.optim.Muon(parts, lr=0.02, weight_decay=0.1)
    plain_opt = torch.optim.Muon([plain], lr=0.02, weight_decay=0.1)
    for _ in range(3):
        grad = torch.randn(24, 8, generator=g)
        whole.grad, plain.grad = grad.clone(), grad.clone()
        for p, gp in zip(parts, grad.chunk(3)):
            p.grad = gp.clone()
        for o in (split_opt, parts_opt, plain_opt):
            o.step()
    assert torch.equal(whole.detach(), torch.cat([p.detach() for p in parts]))
    assert split_opt.state[whole]["momentum_buffer"].shape == (24, 8)  # one state per parameter, as before
    assert not torch.allclose(whole, plain, atol=1e-3)


@needs_muon
def test_build_splits_c_attn_and_keeps_the_gate_apart():
    model = make_model(attn_gate="elementwise")
    opt = optim.build(model, 0.1, 1e-3, (0.9, 0.95), "cpu", optimizer="muon")
    muon = opt.optimizers[1]
    assert isinstance(muon, optim.Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[k] for k in muon.splits) == [f"transformer.h.{i}.attn.c_attn.weight" for i in (0, 1)]
    assert set(muon.splits.values()) == {3}
    on_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert {"transformer.h.0.attn.gate.weight", "transformer.h.1.attn.gate.weight"} <= on_muon


# ----------------------------------------------------------------------------- refusals, --help


@pytest.mark.parametrize(
    "bad, needle",
    [
        (dict(attn_gate="channel"), "attn_gate"),
        (dict(norm_scaling=True, norm_position="post"), "norm_scaling"),
        (dict(norm_scaling=True, norm_position="peri"), "norm_scaling"),
        (dict(norm_scaling=True, norm_position="mix"), "norm_scaling"),
        (dict(norm="dyt", qk_norm=True), "qk_norm"),
        (dict(norm="derf", embed_norm=True), "embed_norm"),
        (dict(norm="dyt", norm_position="post"), "norm_position"),
        (dict(norm="derf", norm_position="mix"), "norm_position"),
        (dict(norm="dyt", norm_position="post", deepnorm=True), "deepnorm"),
        (dict(depth_scaling=0.5, residual=False), "residual=False"),
        (dict(depth_scaling=0.5, norm_position="post", deepnorm=True), "deepnorm"),
        (dict(depth_scaling=1.5), "depth_scaling"),
        (dict(mix_ln_frac=-0.1), "mix_ln_frac"),
        (dict(mix_ln_frac=float("nan")), "mix_ln_frac"),
        (dict(dyt_alpha_mlp=0.0), "dyt_alpha_mlp"),
        (dict(dyt_alpha_final=float("inf")), "dyt_alpha_final"),
        (dict(base_depth=0), "base_depth"),
    ],
)
def test_refused_combinations(bad, needle):
    with pytest.raises(ValueError, match=needle) as e:
        GPTConfig(**bad)
    assert "\n" not in str(e.value)


def test_refusal_is_one_line_on_the_command_line():
    proc = run(["train.py", "--norm=dyt", "--qk_norm=True", "--device=cpu"], timeout=120)
    assert_one_line_error(proc, "qk_norm", "dyt")


def test_help_lines():
    helps = config.field_help(config.TrainConfig)
    keys = {k for s in FRONTIER.values() for k in s} | {"dyt_alpha_attn", "dyt_alpha_mlp", "dyt_alpha_final"}
    assert keys <= {k for k, v in helps.items() if v}, keys - set(helps)
    assert model_module.NORMS == norms.NORMS and "mix" in model_module.NORM_POSITIONS


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("scope", ["blocks", "model"])
@pytest.mark.parametrize("stack", ["frontier_pre", "frontier_mix"])
def test_compiled_training_step_equals_eager(scope, stack, monkeypatch):
    """Both compile scopes, with activation checkpointing: the same loss and gradients as eager (aot_eager runs
    Dynamo and AOTAutograd; only Inductor's code generation is skipped)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = GPT(GPTConfig(**SHAPE, n_layer=2, **STACKS[stack]))
    other = GPT(GPTConfig(**SHAPE, n_layer=2, **STACKS[stack], activation_checkpointing=True))
    other.load_state_dict(eager.state_dict())
    if scope == "blocks":
        other.compile_regions()
    else:
        other = torch.compile(other)
    idx = prompt(4, 16)
    results = []
    for model in (eager, other):
        _, loss = model(idx, idx)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in getattr(model, "_orig_mod", model).named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    torch._dynamo.reset()


def test_compiled_decode_step_equals_eager():
    """engine=compile (Inductor on the CPU) with the gate, Derf, norm_scaling and CompleteP's multiplier."""
    model = make_model(sharp=30, **STACKS["frontier_pre"])
    idx = prompt(1, 5)
    compiled = generate(model, idx, 20, temperature=0, engine="compile")
    assert torch.equal(compiled, generate(model, idx, 20, temperature=0, use_cache=False))
