"""hyper_connections ("hc", "mhc") and attn_residuals ("full", "block"): what each computes at init (the pre-LN
model), against independent implementations (the hyper-connections package, DeepSeek-V4's in transformers), the
known answers of their parts, and the project's promises: KV cache, compile, checkpointing, resume, two ranks."""

import functools
import math

import pytest
import torch
from conftest import metrics_records, needs_cpu_fsdp, needs_muon
from test_model import all_logits, make_model, prompt

import train
from gpt_residual import checkpoint, hf_export, optim, pretrained, streams
from gpt_residual.engine import generate
from model import GPT, GPTConfig

SHAPE = dict(n_layer=3, n_head=2, n_embd=32, block_size=16, vocab_size=50)
KINDS = {
    "hc": dict(hyper_connections="hc"),
    "mhc": dict(hyper_connections="mhc"),
    "full": dict(attn_residuals="full"),
    "block": dict(attn_residuals="block", attn_residual_blocks=2),
}


def eps_free(model: GPT) -> GPT:
    """Norms without eps are exactly scale-invariant: norm(c * x) = norm(x) for c > 0."""
    for m in model.modules():
        if isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
            m.eps = 0.0
    return model


def pair(kind: str, **overrides) -> tuple[GPT, GPT]:
    """The plain pre-LN model and the switched one with the same weights (the switch's own at their init)."""
    torch.manual_seed(0)
    plain = GPT(GPTConfig(**SHAPE, **overrides))
    switched = GPT(GPTConfig(**SHAPE, **KINDS[kind], **overrides))
    missing = switched.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(streams.owns(k) for k in missing)
    return plain, switched


def moved(model: GPT, seed: int = 1) -> GPT:
    """The connections' parameters moved off their init, so that each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if streams.owns(name) and ".norm." not in name:
                fan_in = p.size(0) if name.endswith("dynamic") else 1
                p.add_(torch.randn(p.shape, generator=g) * (0.3 if fan_in == 1 else 2.0 / fan_in**0.5))
    return model


def switched_model(kind: str, sharp: float = 1.0, seed: int = 0) -> GPT:
    return moved(make_model(seed=seed, sharp=sharp, **KINDS[kind]), seed + 1)


def stream_hooks(model: GPT) -> list[torch.Tensor]:
    """The stream leaving each block, filled by forward hooks."""
    out = []
    for block in model.transformer.h:
        block.register_forward_hook(lambda m, args, output: out.append(output.detach()))
    return out


# ----------------------------------------------------------------------------- at init: the pre-LN model


@pytest.mark.parametrize("kind", KINDS)
def test_at_init_it_computes_the_pre_ln_model(kind):
    """HC/mHC: every stream is the plain stream after every block; AttnRes (zero queries): the sources sum to the
    plain stream. With eps-free norms the logits are the plain model's (the final norm reads n x, or the mean)."""
    plain, switched = (eps_free(m) for m in pair(kind))
    idx = prompt(2, 16)
    a, b = stream_hooks(plain), stream_hooks(switched)
    with torch.no_grad():
        torch.testing.assert_close(all_logits(switched, idx), all_logits(plain, idx), rtol=0, atol=2e-5)
    for x, s in zip(a, b, strict=True):
        if kind in ("hc", "mhc"):
            assert s.shape == (2, 16, 4, 32)
            torch.testing.assert_close(s, x.unsqueeze(2).expand_as(s), rtol=0, atol=1e-5)
        else:
            torch.testing.assert_close(s.sum(2), x, rtol=0, atol=1e-5)
    moved(switched)  # once they learn, they differ
    with torch.no_grad():
        assert (all_logits(switched, idx) - all_logits(plain, idx)).abs().max() > 1e-2


@pytest.mark.parametrize("kind", KINDS)
def test_skipping_a_block_is_returning_its_input(kind):
    """interfaces.md: a forward hook that returns args[0] turns block i into the identity. At init that is
    the plain model with block i skipped."""
    plain, switched = (eps_free(m) for m in pair(kind))
    for model in (plain, switched):
        model.transformer.h[1].register_forward_hook(lambda m, args, output: args[0])
    idx = prompt(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(all_logits(switched, idx), all_logits(plain, idx), rtol=0, atol=2e-5)


def test_defaults_add_nothing():
    c = GPTConfig()
    assert (c.hyper_connections, c.n_streams, c.attn_residuals, c.attn_residual_blocks) == ("none", 4, "none", 8)
    model = make_model()
    assert model.streams is None and all(b.res_attn is None and b.res_mlp is None for b in model.transformer.h)
    assert not any(streams.owns(n) for n, _ in model.named_parameters())


# ----------------------------------------------------------------------------- independent implementations


def branch_fn(C: int, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, C, generator=g) / C**0.5
    return lambda h: torch.nn.functional.gelu(h @ w)


def test_hc_equals_the_hyper_connections_package():
    """lucidrains' HyperConnections (pip hyper-connections, the HC paper's Algorithm 2) on our weights: the same
    streams out. One difference by design: the package normalises the dynamic features with its own RMSNorm
    (F.normalize * sqrt(d) * (1 + gamma)); ours uses the model's norm, as the paper's LayerNorm. The test gives
    the package our norm module. Its layout: streams folded into the batch, '(b s) t d'; static_alpha (n, 1 + n)
    = [A_m | A_r] with A_r[j, i] = our H_res[i, j]; dynamic_alpha_fn = [W_m | W_r], dynamic_beta_fn = W_b."""
    hc_pkg = pytest.importorskip("hyper_connections.hyper_connections", reason="pip install hyper-connections")
    n, C, B, T = 4, 32, 2, 5
    ours = moved(make_model(n_embd=C, **KINDS["hc"]), 3).transformer.h[1].res_mlp  # sub-layer k = 3
    mix = ours.mix
    theirs = hc_pkg.HyperConnections(n, dim=C, layer_index=3, tanh=True)
    assert torch.equal(theirs.static_alpha[:, 0], streams._one_hot(n, 3))  # the same init of A_m
    with torch.no_grad():
        theirs.static_alpha.copy_(torch.cat((mix.static_pre[:, None], mix.static_res.T), dim=1))
        theirs.dynamic_alpha_fn.copy_(torch.cat((mix.dynamic[:, :1], mix.dynamic[:, 2:]), dim=1))
        theirs.dynamic_beta_fn.copy_(mix.dynamic[:, 1])
        theirs.dynamic_alpha_scale.copy_(mix.scale[0])
        theirs.dynamic_beta_scale.copy_(mix.scale[1])
        theirs.static_beta.copy_(mix.static_post)
    theirs.norm = mix.norm
    x = torch.randn(B, T, n, C, generator=torch.Generator().manual_seed(2))
    f = branch_fn(C)
    with torch.no_grad():
        branch_input, add_residual = theirs(x.transpose(1, 2).reshape(B * n, T, C))
        expected = add_residual(f(branch_input)).view(B, n, T, C).transpose(1, 2)
        torch.testing.assert_close(ours(x, f), expected, rtol=1e-5, atol=1e-6)


def test_mhc_equals_deepseek_v4s_in_transformers():
    """transformers' DeepseekV4HyperConnection (DeepSeek's released mHC) on our weights, random enough that
    Sinkhorn-Knopp has work to do: the same H_post, H_res (theirs is 'comb' = H_res transposed: new_k =
    sum_j comb[j, k] x_j), sub-layer input and streams out. hc_eps = 0: DeepSeek adds 1e-6 to H_pre and to
    every Sinkhorn step; the paper and we do not. Their fn (2n + n^2, nC) = our dynamic transposed, with the
    res block's (j, k) order; their base = our b_pre | b_post | b_res transposed; their scale = ours."""
    v4 = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4",
                             reason="DeepSeek-V4 needs a newer transformers")  # fmt: skip
    n, C, B, T = 4, 32, 2, 5
    ours = moved(make_model(n_embd=C, **KINDS["mhc"]), 4).transformer.h[0].res_attn
    mix = ours.mix
    with torch.no_grad():
        mix.scale.copy_(torch.tensor([1.0, 0.7, 1.5]))
    config = v4.DeepseekV4Config(hidden_size=C, hc_mult=n, hc_eps=0.0, rms_norm_eps=streams.EPS,
                                 hc_sinkhorn_iters=streams.SINKHORN_ITERS)  # fmt: skip
    theirs = v4.DeepseekV4HyperConnection(config)
    res = mix.dynamic[:, 2 * n :].unflatten(-1, (n, n)).transpose(1, 2).flatten(1)
    with torch.no_grad():
        theirs.fn.copy_(torch.cat((mix.dynamic[:, : 2 * n], res), dim=1).T)
        theirs.base.copy_(torch.cat((mix.static_pre, mix.static_post, mix.static_res.T.flatten())))
        theirs.scale.copy_(mix.scale)
    x = torch.randn(B, T, n, C, generator=torch.Generator().manual_seed(2))
    f = branch_fn(C)
    with torch.no_grad():
        post, comb, collapsed = theirs(x)
        h_pre, h_post, h_res = mix(x)
        assert (h_res - h_res.mean()).abs().max() > 0.1  # far from uniform: Sinkhorn did something
        torch.testing.assert_close(h_post, post, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(h_res, comb.transpose(-1, -2), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close((h_pre.unsqueeze(-1) * x).sum(2), collapsed, rtol=1e-5, atol=1e-6)
        expected = post.unsqueeze(-1) * f(collapsed).unsqueeze(-2) + comb.transpose(-1, -2) @ x
        torch.testing.assert_close(ours(x, f), expected, rtol=1e-5, atol=1e-5)


def test_mhc_equals_the_hyper_connections_package_where_they_agree():
    """The package's ManifoldConstrainedHyperConnections differs from the paper (and us) by design in three places:
    (1) each stream's coefficients (its row of [H_pre | H_res^T] and its H_post) are read from that stream alone,
    RMS-normalised over C; the paper reads all of them from the flattened n x C streams; (2) its Sinkhorn
    normalises rows first and columns last (the paper's eq. 9 order), DeepSeek-V4's code and we columns first;
    (3) its init: A_m one-hot, logits I for H_res, 1 for H_post (H_post = 2 sigmoid(1) = 1.46). On streams of
    equal RMS, with our phi made block-diagonal (stream j's block feeds only stream j's coefficients) and small
    H_res logits (where Sinkhorn converges in either order), the two compute the same thing."""
    mhc_pkg = pytest.importorskip("hyper_connections.manifold_constrained_hyper_connections",
                                  reason="pip install hyper-connections")  # fmt: skip
    n, C, B, T = 4, 32, 2, 5
    theirs = mhc_pkg.ManifoldConstrainedHyperConnections(n, dim=C, layer_index=1)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        theirs.norm.gamma.zero_()
    mix = streams.ManifoldMix(n, C, k=1)
    w_alpha, w_beta = theirs.dynamic_alpha_fn[0], theirs.dynamic_beta_fn  # (C, 1 + n), (C,)
    with torch.no_grad():
        mix.dynamic.zero_()
        for j in range(n):
            rows = slice(j * C, (j + 1) * C)  # stream j's features
            mix.dynamic[rows, j] = w_alpha[:, 0]
            mix.dynamic[rows, n + j] = w_beta
            for i in range(n):
                mix.dynamic[rows, 2 * n + i * n + j] = w_alpha[:, 1 + i]
        mix.static_pre.copy_(theirs.static_alpha[:, 0])
        mix.static_post.copy_(theirs.static_beta)
        mix.static_res.copy_(theirs.static_alpha[:, 1:].T)
        mix.scale.copy_(torch.cat((theirs.pre_branch_scale, theirs.h_post_scale[None], theirs.residual_scale)))
    base = torch.randn(B, T, 1, C, generator=g)
    x = base * torch.tensor([1.0, -1.0, 1.0, -1.0]).view(1, 1, n, 1)  # streams of equal RMS
    x[:, :, 2:] = x[:, :, 2:].flip(-1)
    f = branch_fn(C)
    with torch.no_grad():
        branch_input, add_residual = theirs(x.transpose(1, 2).reshape(B * n, T, C))
        expected = add_residual(f(branch_input)).view(B, n, T, C).transpose(1, 2)
        torch.testing.assert_close(streams.HyperConnection(mix)(x, f), expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- known answers of the parts


def test_sinkhorn_is_doubly_stochastic():
    logits = 2 * torch.randn(1000, 4, 4, generator=torch.Generator().manual_seed(0))
    m = streams.sinkhorn(logits)
    assert (m > 0).all()
    torch.testing.assert_close(m.sum(-1), torch.ones(1000, 4), rtol=0, atol=1e-6)  # rows: exact, by the order
    assert (m.sum(-2) - 1).abs().max() < 0.05  # columns: up to 20 iterations' convergence
    small = streams.sinkhorn(0.3 * logits)
    torch.testing.assert_close(small.sum(-2), torch.ones(1000, 4), rtol=0, atol=1e-5)
    torch.testing.assert_close(streams.sinkhorn(torch.zeros(3, 3)), torch.full((3, 3), 1 / 3))


def test_mhc_mixing_matrices_in_a_forward_pass():
    """block.res_attn.mix returns (H_pre, H_post, H_res) for its input: H_res doubly stochastic, H_pre in (0, 1),
    H_post in (0, 2); HC's H_res is unconstrained."""
    seen = {}
    for kind in ("mhc", "hc"):
        model = switched_model(kind)
        model.transformer.h[1].res_mlp.mix.register_forward_hook(lambda m, a, out, k=kind: seen.update({k: out}))
        with torch.no_grad():
            model(prompt(2, 9), prompt(2, 9))
    pre, post, res = seen["mhc"]
    assert pre.shape == post.shape == (2, 9, 4) and res.shape == (2, 9, 4, 4)
    assert ((0 < pre) & (pre < 1)).all() and ((0 < post) & (post < 2)).all() and (res > 0).all()
    torch.testing.assert_close(res.sum(-1), torch.ones(2, 9, 4), rtol=0, atol=1e-5)
    torch.testing.assert_close(res.sum(-2), torch.ones(2, 9, 4), rtol=0, atol=1e-3)
    assert (seen["hc"][2].sum(-1) - 1).abs().max() > 0.1


def test_composite_gain():
    """max row sum of |prod_k H_res^(k)|: mHC's stays 1 however the weights move; HC's is what the product says."""
    model = switched_model("mhc")
    assert math.isclose(streams.composite_gain(model), 1.0, abs_tol=1e-5)
    hc = make_model(**KINDS["hc"])
    assert streams.composite_gain(hc) == 1.0  # A_r = I
    attn, mlp = 2 * torch.eye(4), torch.eye(4)
    attn[1, 0], attn[3, 0], mlp[0, 1] = 1.0, 3.0, -0.5  # they do not commute: the order matters (17.5, not 22.75)
    with torch.no_grad():
        for block in hc.transformer.h:
            block.res_attn.mix.static_res.copy_(attn)
            block.res_mlp.mix.static_res.copy_(mlp)
    expected = torch.eye(4)
    for _ in hc.transformer.h:
        expected = mlp @ attn @ expected  # x' = H_res x, attention first
    assert math.isclose(streams.composite_gain(hc), expected.abs().sum(-1).max().item(), rel_tol=1e-6)
    assert streams.composite_gain(make_model()) is None


def test_readings():
    hc = make_model(**KINDS["hc"]).transformer.h[0].res_mlp.readings()
    assert hc["h_res"] == torch.eye(4).tolist() and hc["h_pre"] == [0.0, 1.0, 0.0, 0.0] and hc["h_post"] == [1.0] * 4
    mhc = make_model(**KINDS["mhc"]).transformer.h[0].res_attn.readings()
    assert mhc["h_res"] == [[0.25] * 4] * 4 and mhc["h_post"] == [1.0] * 4 and mhc["h_pre"][0] > mhc["h_pre"][1]
    model = switched_model("full")
    assert model.transformer.h[0].res_attn.readings()["query_norm"] > 0
    assert make_model(**KINDS["full"]).streams.out.readings() == {"query_norm": 0.0}


@pytest.mark.parametrize("kind", ["full", "block"])
def test_attn_residual_weights_at_init_are_uniform_over_the_sources(kind):
    """res_attn.depth returns alpha over the sources; zero queries give 1/S. full: block l's attention reads
    1 + 2l sources; block (2 blocks of 2 layers in 4): the embedding, the finished blocks and the running sum."""
    model = make_model(n_layer=4, **KINDS[kind])
    counts = []
    for block in model.transformer.h:
        for conn in (block.res_attn, block.res_mlp):
            conn.depth.register_forward_hook(lambda m, a, out: counts.append(out))
    with torch.no_grad():
        model(prompt(2, 9), prompt(2, 9))
    sizes = [w.size(-1) for w in counts]
    assert sizes == ([1, 2, 3, 4, 5, 6, 7, 8] if kind == "full" else [1, 2, 2, 2, 2, 3, 3, 3])
    for w in counts:
        torch.testing.assert_close(w, torch.full_like(w, 1 / w.size(-1)))


def test_block_boundaries_hold_whole_layers():
    c = GPTConfig(n_layer=12, attn_residuals="block")
    assert [i for i in range(12) if streams.opens_block(c, i)] == [0, 2, 3, 5, 6, 8, 9, 11]  # 8 blocks
    labels = streams.source_labels(c)
    assert labels[:3] == ["embedding", "layers 0-1", "layers 2-2"] and len(labels) == 9
    model = make_model(n_layer=3, **KINDS["full"])
    seen = []
    model.streams.out.depth.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        model(prompt(1, 4), prompt(1, 4))
    assert seen[0].size(-1) == len(streams.source_labels(model.config)) == 7  # embedding + 3 x (attn, mlp)
    c = GPTConfig(n_layer=4, attn_residuals="block", attn_residual_blocks=4)
    assert all(streams.opens_block(c, i) for i in range(4))


def test_a_planted_query_reads_one_source():
    """w along channel c, and a source that is all channel c: the sub-layer reads that source alone."""
    C = 16
    conn = streams.DepthAttention(C, opens=True)
    e = torch.zeros(C)
    e[3] = 1.0
    sources = torch.stack((torch.randn(C), 5 * e, -e + 0.1 * torch.randn(C)))[None, None]  # (1, 1, 3, C)
    with torch.no_grad():
        conn.depth.query.copy_(100 * e)
        alpha = conn.depth(sources)
        assert alpha[0, 0, 1] > 0.999
        torch.testing.assert_close(conn.read(sources)[0, 0], 5 * e, rtol=0, atol=1e-3)
        out = conn(sources, lambda h: 2 * h)
    assert out.shape == (1, 1, 4, C) and torch.equal(out[:, :, :3], sources)
    running = streams.DepthAttention(C, opens=False)(sources, lambda h: torch.ones_like(h))
    assert running.shape == sources.shape and torch.allclose(running[0, 0, 2], sources[0, 0, 2] + 1)


# ----------------------------------------------------------------------------- refusals, help, export, optimizer


@pytest.mark.parametrize(
    "bad, needle",
    [
        (dict(hyper_connections="hyper"), "hyper_connections"),
        (dict(attn_residuals="some"), "attn_residuals"),
        (dict(hyper_connections="hc", n_streams=0), "n_streams"),
        (dict(hyper_connections="hc", attn_residuals="full"), "choose one"),
        (dict(hyper_connections="mhc", norm_position="post"), "norm_position='pre'"),
        (dict(attn_residuals="full", norm_position="peri"), "norm_position='pre'"),
        (dict(hyper_connections="hc", residual=False), "residual"),
        (dict(attn_residuals="block", residual_scalars=True), "residual_scalars"),
        (dict(attn_residuals="block", n_layer=4, attn_residual_blocks=5), "attn_residual_blocks"),
    ],
)
def test_refused_combinations(bad, needle):
    with pytest.raises(ValueError, match=needle) as e:
        GPTConfig(**bad)
    assert "\n" not in str(e.value)


def test_help_lines_and_exports_refused():
    from gpt_residual import config

    helps = config.field_help(config.TrainConfig)
    for key in ("hyper_connections", "n_streams", "attn_residuals", "attn_residual_blocks"):
        assert helps.get(key), key
    for kind in KINDS.values():
        key = next(iter(kind))
        with pytest.raises(hf_export.ExportError, match=key):
            hf_export.check_exportable(GPTConfig(**kind))
        with pytest.raises(pretrained.PretrainedError, match=key):
            pretrained.check_compatible(GPTConfig(**kind))


@pytest.mark.parametrize("optimizer", [pytest.param("adamw"), pytest.param("muon", marks=needs_muon)])
@pytest.mark.parametrize("kind", ["hc", "mhc", "block"])
def test_connection_weights_take_no_decay(kind, optimizer):
    model = make_model(**KINDS[kind])
    opt = optim.build(model, 0.1, 1e-3, (0.9, 0.95), "cpu", optimizer=optimizer)
    ours = {id(p) for n, p in model.named_parameters() if streams.owns(n)}
    inside = [m for n, m in model.named_modules() if n.endswith(("res_attn", "res_mlp")) or n == "streams"]
    assert ours == {id(p) for m in inside for p in m.parameters()}
    groups = [g for g in opt.param_groups if any(id(p) in ours for p in g["params"])]
    assert ours and len(groups) == 1 and groups[0]["weight_decay"] == 0.0 and "lr_scale" not in groups[0]
    assert ours <= {id(p) for p in groups[0]["params"]}
    if optimizer == "muon":
        assert not ours & {id(p) for g in opt.optimizers[1].param_groups for p in g["params"]}


# ----------------------------------------------------------------------------- KV cache, compile, checkpointing


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch,length,new", [(1, 3, 10), (2, 6, 37)], ids=["within", "past-block"])
def test_cache_equals_no_cache(kind, batch, length, new):
    """The streams are per token: each block's attention keeps its own keys and values, nothing else is cached."""
    model = switched_model(kind, sharp=30)
    idx = prompt(batch, length)
    cached = generate(model, idx, new, temperature=0, use_cache=True)
    assert torch.equal(cached, generate(model, idx, new, temperature=0, use_cache=False))


def loss_and_grads(model: GPT, idx, targets):
    model.zero_grad(set_to_none=True)
    _, loss = model(idx, targets)
    loss.backward()
    params = getattr(model, "_orig_mod", model).named_parameters()
    return loss.detach(), {n: p.grad.clone() for n, p in params}


def assert_same(a, b, grad_atol: float = 1e-7):
    torch.testing.assert_close(b[0], a[0], rtol=1e-6, atol=1e-6)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(b[1][name], a[1][name], rtol=1e-5, atol=grad_atol, msg=name)


@pytest.mark.parametrize(
    "kind, scope", [("hc", "blocks"), ("mhc", "blocks"), ("mhc", "model"), ("full", "blocks"), ("full", "model"),
                    ("block", "blocks")],
)  # fmt: skip
def test_compiled_equals_eager(kind, scope, monkeypatch):
    """compile_scope="blocks" (each block compiled in place: the stream between blocks is one tensor, (B, T, n, C)
    or the growing (B, T, S, C)) and the whole model compiled: the eager loss and gradients. (aot_eager: Dynamo and
    AOTAutograd without Inductor's code generation; 3 Sinkhorn iterations instead of 20 only to trace faster.)"""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    monkeypatch.setattr(streams, "SINKHORN_ITERS", 3)
    torch._dynamo.reset()
    idx, targets = prompt(2, 16), prompt(2, 16, seed=5)
    expected = loss_and_grads(switched_model(kind), idx, targets)
    compiled = switched_model(kind)
    if scope == "blocks":
        compiled.compile_regions()
    else:
        compiled = torch.compile(compiled)
    # compiled for a CPU, GPT-2's GELU is written x * sigmoid(2u) (model.gelu): the same function, rounded otherwise
    # (gradients of order 1 differ by up to ~4e-6; a wrong stream differs by far more)
    assert_same(expected, loss_and_grads(compiled, idx, targets), grad_atol=2e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", KINDS)
def test_activation_checkpointing_changes_nothing(kind):
    idx, targets = prompt(2, 16), prompt(2, 16, seed=5)
    expected = loss_and_grads(switched_model(kind), idx, targets)
    ckpt = switched_model(kind)
    ckpt.config.activation_checkpointing = True
    calls = [0]
    ckpt.transformer.h[0].register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    assert_same(expected, loss_and_grads(ckpt, idx, targets))
    assert calls[0] == 2  # the block ran again in the backward pass


# ----------------------------------------------------------------------------- training, resume, telemetry


@pytest.mark.parametrize("kind", KINDS)
def test_trains_and_resumes_exactly(tiny_cfg, tmp_path, kind):
    """The loss falls; 6 steps straight == 3 steps + resume + 3 (weights and optimizer state bit for bit)."""
    switch = {**KINDS[kind], "attn_residual_blocks": 2}
    cfg = tiny_cfg(max_iters=60, eval_interval=60, eval_iters=2, log_interval=1, checkpoint_interval=0,
                   out_dir=str(tmp_path / "long"), **switch)  # fmt: skip
    train.train(cfg)
    losses = [r["loss"] for r in metrics_records(cfg.out_dir) if "loss" in r and "step" in r]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    common = dict(lr_decay_iters=6, checkpoint_interval=0, eval_interval=100, eval_iters=1, **switch)
    train.train(tiny_cfg(max_iters=6, out_dir=str(tmp_path / "straight"), **common))
    train.train(tiny_cfg(max_iters=3, out_dir=str(tmp_path / "split"), **common))
    train.train(tiny_cfg(max_iters=6, out_dir=str(tmp_path / "split"), init_from="resume", **common))
    a, b = checkpoint.load(tmp_path / "straight/ckpt.pt"), checkpoint.load(tmp_path / "split/ckpt.pt")
    assert a["model"].keys() == b["model"].keys() and any(streams.owns(k) for k in a["model"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and len(sa) == len(a["model"]) - 1
    for name in sa:
        for key in sa[name]:
            assert torch.equal(torch.as_tensor(sa[name][key]), torch.as_tensor(sb[name][key])), (name, key)


@pytest.mark.parametrize("kind", ["hc", "full"])
def test_telemetry_reads_the_summed_stream(kind):
    """Telemetry's rms is of the streams' sum: at init n times the plain stream's (HC), the plain stream's (AttnRes)."""
    from gpt_residual import telemetry

    plain, switched = (eps_free(m) for m in pair(kind))
    idx = prompt(2, 16)
    got = []
    for model in (plain, switched):
        tele = telemetry.Telemetry(model)
        with torch.no_grad(), tele.capture_rms() as rms:
            model(idx, idx)
        got.append(rms)
    factor = 4.0 if kind == "hc" else 1.0
    for a, b in zip(*got, strict=True):
        assert math.isclose(b, factor * a, rel_tol=1e-5), (a, b)


def test_telemetry_logs_the_composite_gain(tiny_cfg):
    cfg = tiny_cfg(max_iters=4, telemetry_interval=2, hyper_connections="hc")
    train.train(cfg)
    recs = [r for r in metrics_records(cfg.out_dir) if "grad_attn" in r]
    assert [r["step"] for r in recs] == [0, 2]
    assert all(isinstance(r["hc_gain"], float) for r in recs) and recs[-1]["hc_gain"] != 1.0  # A_r has moved


# ----------------------------------------------------------------------------- two processes


@pytest.mark.parametrize(
    "parallel, kind",
    [pytest.param("ddp", "block", id="ddp-block"), pytest.param("fsdp", "mhc", marks=needs_cpu_fsdp, id="fsdp-mhc")],
)
def test_two_ranks_reach_the_single_process_weights(char_data, tmp_path, parallel, kind):
    """torchrun with 2 ranks x 2 micro-batches == 1 process x 4, the connections' weights too: DDP with the final
    norm's pseudo-query outside the blocks, FSDP sharding the blocks' mixing matrices (HC shares mHC's code)."""
    from test_distributed import TINY as DIST_TINY
    from test_distributed import launch

    switch = [f"--{k}={v}" for k, v in {**KINDS[kind], "attn_residual_blocks": 2}.items()]
    args = [*DIST_TINY, f"--data_dir={char_data}", "--max_iters=3", "--eval_iters=2", "--eval_interval=100",
            "--checkpoint_interval=0", *switch]  # fmt: skip
    single = launch("train.py", [*args, "--gradient_accumulation_steps=4", f"--out_dir={tmp_path / 'one'}"], 1)
    multi = launch("train.py", [*args, "--gradient_accumulation_steps=2", f"--parallel={parallel}",
                                f"--out_dir={tmp_path / 'two'}"], 2)  # fmt: skip
    for proc in (single, multi):
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = checkpoint.load(tmp_path / "one/ckpt.pt")["model"], checkpoint.load(tmp_path / "two/ckpt.pt")["model"]
    assert a.keys() == b.keys() and any(streams.owns(k) for k in a)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-5), (k, (a[k] - b[k]).abs().max())
