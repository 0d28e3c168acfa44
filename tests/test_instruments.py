"""The instruments (gpt_residual/instruments.py) on models whose answers are known: a planted massive activation, a
block that is the identity, the logit lens of the last block, an independent forward pass block by block, and stand-in
modules that follow the switches' contract (interfaces.md); and the telemetry's act_top / act_median."""

import copy
import math
import sys
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt_residual import instruments, telemetry
from model import GPT, GPTConfig

V, T = 50, 16


def tiny(n_layer=3, seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=n_layer, n_head=2, n_embd=32, block_size=T, vocab_size=V, **overrides)).eval()


def batches(n=2, rows=4, seed=1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(V, (rows, T), generator=g), torch.randint(V, (rows, T), generator=g)) for _ in range(n)]


@torch.no_grad()
def streams(model: GPT, x) -> list[torch.Tensor]:
    """The stream entering block 0 and leaving each block, computed block by block (no hooks)."""
    pos = torch.arange(x.size(1))
    h = model.transformer.wte(x) + model.transformer.wpe(pos)
    out = [h]
    for block in model.transformer.h:
        h = block(h, None, pos)
        out.append(h)
    return out


def plant(model: GPT, layer: int, position: int, channel: int, key: int = 3):
    """Make block `layer`'s MLP write ~1e4 into `channel` at token `position` only: a position embedding marks the
    position in channel `key` (10, against ~0.02 elsewhere), and one hidden unit fires only where ln_2 reads it."""
    with torch.no_grad():
        model.transformer.wpe.weight[position, key] = 10.0
        mlp = model.transformer.h[layer].mlp
        for p in (mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight, mlp.c_proj.bias):
            p.zero_()
        mlp.c_fc.weight[0, key] = 10.0  # ln_2 reads the marked channel as ~sqrt(C - 1) = 5.6, others as |z| < 4.5
        mlp.c_fc.bias[0] = -45.0
        mlp.c_proj.weight[channel, 0] = 1000.0


def test_planted_massive_activation_is_found_at_its_layer_position_and_channel():
    model, data = tiny(n_layer=4), batches()
    plant(model, layer=2, position=5, channel=7)
    layers = instruments.measure(model, data)["layers"]
    tops = [r["top_abs"][0] for r in layers]
    assert tops[0] < 20 and tops[1] < 20 and tops[2] > 5000 and tops[3] > 5000, tops  # born in block 2, carried on
    for r in layers[2:]:
        assert (r["max_position"], r["max_channel"]) == (5, 7), r
        assert r["median_abs"] < 1  # massive: four orders of magnitude above the median
    assert (layers[0]["max_position"], layers[0]["max_channel"]) == (5, 3)  # before: the marker itself


def test_numbers_equal_an_independent_forward_block_by_block():
    model, data = tiny(), batches(rows=3)
    got = instruments.measure(model, data)
    per_batch = [streams(model, x) for x, _ in data]
    loss = sum(model(x, y)[1].item() for x, y in data) / len(data)
    assert got["val_loss"] == pytest.approx(loss, abs=1e-6) and got["n_layer"] == 3
    for i, r in enumerate(got["layers"]):
        out = torch.stack([s[i + 1] for s in per_batch])  # (batches, B, T, C)
        top = out.abs().flatten().topk(3)
        _, _, t, c = torch.unravel_index(top.indices[0], out.shape)
        assert r["top_abs"] == pytest.approx(top.values.tolist(), rel=1e-6)
        assert (r["max_position"], r["max_channel"]) == (int(t), int(c))
        medians = [s[i + 1].abs().median().item() for s in per_batch]
        assert r["median_abs"] == pytest.approx(sum(medians) / len(medians), rel=1e-6)
        cos = torch.cat([F.cosine_similarity(s[i].double(), s[i + 1].double(), dim=-1).flatten() for s in per_batch])
        assert r["angular_distance"] == pytest.approx((cos.clamp(-1, 1).acos() / math.pi).mean().item(), abs=1e-5)
        lens = [model.head(s[i + 1], y)[1].item() for s, (_, y) in zip(per_batch, data)]
        assert r["logit_lens_loss"] == pytest.approx(sum(lens) / len(lens), abs=1e-6)
        skipped = copy.deepcopy(model)
        skipped.transformer.h[i] = Passthrough()
        skip_loss = sum(skipped(x, y)[1].item() for x, y in data) / len(data)
        assert r["skip_loss_delta"] == pytest.approx(skip_loss - loss, abs=1e-6)
        assert r["skip_loss_delta"] != 0 and r["angular_distance"] > 0.01  # a trained-looking block does something


class Passthrough(nn.Module):
    def forward(self, x, *rest):
        return x


def test_an_identity_block_is_worth_nothing_and_turns_nothing():
    model = tiny()
    block = model.transformer.h[1]
    with torch.no_grad():
        for p in (block.attn.c_proj.weight, block.attn.c_proj.bias, block.mlp.c_proj.weight, block.mlp.c_proj.bias):
            p.zero_()  # x + 0 + 0: the identity
    layers = instruments.measure(model, batches())["layers"]
    assert layers[1]["skip_loss_delta"] == 0.0 and layers[1]["angular_distance"] == 0.0
    for i in (0, 2):  # the others do something
        assert layers[i]["skip_loss_delta"] != 0.0 and layers[i]["angular_distance"] > 0.01
    assert layers[1]["logit_lens_loss"] == layers[0]["logit_lens_loss"]  # the same stream, read the same way


@pytest.mark.parametrize("position", ["pre", "post"])  # post-LN: no ln_f, the last block's norm ends the stream
def test_logit_lens_of_the_last_block_is_the_models_loss(position):
    model = tiny(n_layer=3, norm_position=position)
    got = instruments.measure(model, batches())
    lens = [r["logit_lens_loss"] for r in got["layers"]]
    assert lens[-1] == pytest.approx(got["val_loss"], abs=1e-6)
    assert all(v != got["val_loss"] for v in lens[:-1])  # earlier streams read as other losses
    assert model.training is False  # measure leaves the mode as it found it
    model.train()
    instruments.measure(model, batches())
    assert model.training


# ----------------------------------------------------------------------------- the switches' contract (interfaces.md)


class Gate(nn.Module):
    """Gated attention's gate stand-in: sigmoid(x @ W_g), one per head."""

    def __init__(self, C, H):
        super().__init__()
        self.proj, self.seen = nn.Linear(C, H), []

    def forward(self, x):
        out = torch.sigmoid(self.proj(x))
        self.seen.append(out.mean().item())
        return out


class DyT(nn.Module):
    """gamma * tanh(alpha x) + beta; records the fraction of its units past 0.99."""

    def __init__(self, C, alpha):
        super().__init__()
        self.alpha, self.weight, self.bias = nn.Parameter(torch.tensor(alpha)), nn.Parameter(torch.ones(C)), None
        self.seen = []

    def squash(self, x):
        return torch.tanh(self.alpha * x)

    def forward(self, x):
        u = self.squash(x)
        self.seen.append((u.abs() > 0.99).float().mean().item())
        return self.weight * u

    def readings(self):
        return {"alpha": self.alpha.item()}


class Derf(DyT):
    """gamma * erf(alpha x + s) + beta."""

    def __init__(self, C, alpha):
        super().__init__(C, alpha)
        self.s = nn.Parameter(torch.tensor(0.3))

    def squash(self, x):
        return torch.erf(self.alpha * x + self.s)

    def readings(self):
        return {"alpha": self.alpha.item(), "s": self.s.item()}


class Mixing(nn.Module):
    """HC stand-in: forward returns (h_pre, h_post, h_res) for the streams (B, T, n, C), static + dynamic."""

    def __init__(self, n, C):
        super().__init__()
        self.static, self.dynamic, self.seen = nn.Parameter(torch.eye(n) * 1.5), nn.Linear(C, n * n), []

    def forward(self, x):
        B, T, n, _ = x.shape
        h_res = self.static + 0.1 * torch.tanh(self.dynamic(x.mean(2))).view(B, T, n, n)
        h_pre, h_post = torch.softmax(x.mean(-1), -1), torch.sigmoid(x.sum(-1))
        self.seen.append([t.flatten(0, 1).mean(0) for t in (h_pre, h_post, h_res)])
        return h_pre, h_post, h_res

    def readings(self):
        return {"h_res": self.static.tolist()}


class DepthWeights(nn.Module):
    """Attention Residuals stand-in: softmax weights (B, T, k) over the k earlier layers, by a pseudo-query."""

    def __init__(self, C, k):
        super().__init__()
        self.query, self.keys, self.seen = nn.Parameter(torch.randn(C)), nn.Parameter(torch.randn(k, C)), []

    def forward(self, x):
        w = torch.softmax((x * self.query) @ self.keys.T, dim=-1)
        self.seen.append(w.flatten(0, 1).mean(0))
        return w

    def readings(self):
        return {"query_norm": self.query.norm().item()}


class StandInBlock(nn.Module):
    def __init__(self, C, H, n, layer):
        super().__init__()
        self.ln_1 = (DyT if layer % 2 == 0 else Derf)(C, alpha=2.0)
        self.attn = nn.Module()
        self.attn.gate = Gate(C, H)
        self.attn.c_proj = nn.Linear(C, C)
        self.mix, self.depth = Mixing(n, C), DepthWeights(C, layer + 1)

    def forward(self, x, *rest):  # x: (B, T, n, C)
        h_pre, h_post, h_res = self.mix(x)
        inner = self.ln_1((h_pre.unsqueeze(-1) * x).sum(2))
        gate = self.attn.gate(inner).repeat_interleave(inner.size(-1) // self.attn.gate.proj.out_features, dim=-1)
        y = self.attn.c_proj(inner) * gate * self.depth(inner)[..., :1]
        return torch.einsum("btij,btjc->btic", h_res, x) + h_post.unsqueeze(-1) * y.unsqueeze(2)


class StandInModel(nn.Module):
    """A multi-stream model of the contract's shape: transformer.h, head(x, targets), config.hyper_connections."""

    def __init__(self, C=16, H=2, n=3, layers=3):
        super().__init__()
        torch.manual_seed(0)
        self.config = types.SimpleNamespace(hyper_connections="hc", n_layer=layers, value_residual=False)
        self.n = n
        blocks = nn.ModuleList([StandInBlock(C, H, n, i) for i in range(layers)])
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(V, C), h=blocks, ln_f=nn.LayerNorm(C)))
        self.lm_head = nn.Linear(C, V)

    def forward(self, idx, targets):
        x = self.transformer.wte(idx).unsqueeze(2).expand(-1, -1, self.n, -1)  # the embedding enters every stream
        for block in self.transformer.h:
            x = block(x)
        return self.head(x.sum(2), targets)

    def head(self, x, targets):
        logits = self.lm_head(self.transformer.ln_f(x))
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


@torch.no_grad()
def summed_streams(model: StandInModel, x) -> list[torch.Tensor]:
    """The sum over the streams leaving each block of the stand-in, block by block."""
    h, out = model.transformer.wte(x).unsqueeze(2).expand(-1, -1, model.n, -1), []
    for block in model.transformer.h:
        h = block(h)
        out.append(h.sum(2))
    return out


def composite_gain(model) -> float:
    """streams.composite_gain's stand-in: max row sum of |prod of the static H_res|."""
    product = torch.eye(model.n)
    for block in model.transformer.h:
        product = block.mix.static.detach() @ product
    return product.abs().sum(1).max().item()


@pytest.fixture
def fake_streams(monkeypatch):
    """gpt_residual.streams (the streams helper's module) as far as the instruments use it."""
    fake = types.ModuleType("gpt_residual.streams")
    fake.composite_gain = composite_gain
    monkeypatch.setitem(sys.modules, "gpt_residual.streams", fake)


def test_switch_modules_are_read_as_the_contract_says(fake_streams):
    model = StandInModel()
    got = instruments.measure(model, batches(n=2))
    model_loss = sum(model(x, y)[1].item() for x, y in batches(n=2)) / 2
    assert got["layers"][-1]["logit_lens_loss"] == pytest.approx(model_loss, abs=1e-6)  # the streams' sum, read
    assert got["hc_gain"] == pytest.approx(1.5**3)
    after = [summed_streams(model, x) for x, _ in batches(n=2)]
    for i, r in enumerate(got["layers"]):  # the massive activations of the streams' sum
        assert r["top_abs"][0] == pytest.approx(max(s[i].abs().max().item() for s in after), rel=1e-6)
    sw = got["switches"]
    for i, block in enumerate(model.transformer.h):  # each stand-in kept what it saw; [:2]: measure's first pass

        def mean_seen(seen):
            return (seen[0] + seen[1]) / 2

        gate = sw[f"transformer.h.{i}.attn.gate"]
        assert gate["gate_mean"] == pytest.approx(mean_seen(block.attn.gate.seen), rel=1e-6)
        norm = sw[f"transformer.h.{i}.ln_1"]
        assert norm["alpha"] == 2.0 and ("s" in norm) == (i % 2 == 1)  # readings(), DyT and Derf
        assert 0 < norm["saturated"] < 1  # alpha = 2: some units past 0.99, not all
        assert norm["saturated"] == pytest.approx(mean_seen(block.ln_1.seen), rel=1e-6)
        mix = sw[f"transformer.h.{i}.mix"]
        assert mix["h_res"] == block.mix.static.tolist()  # readings(): the static part, as a nested list
        for k, key in enumerate(("h_pre_mean", "h_post_mean", "h_res_mean")):
            want = mean_seen([seen[k] for seen in block.mix.seen])
            assert torch.tensor(mix[key]).allclose(want, rtol=1e-5, atol=1e-7), key
        depth = sw[f"transformer.h.{i}.depth"]
        assert torch.tensor(depth["weights_mean"]).allclose(mean_seen(block.depth.seen), rtol=1e-5, atol=1e-7)
        assert len(depth["weights_mean"]) == i + 1
        assert depth["query_norm"] == pytest.approx(block.depth.query.norm().item())


# ----------------------------------------------------------------------------- telemetry (telemetry_interval)


def test_telemetry_reads_the_largest_and_median_activation_of_every_block():
    model, (x, y) = tiny(n_layer=4), batches(n=1)[0]
    plant(model, layer=2, position=5, channel=7)
    tele = telemetry.Telemetry(model)
    with tele.capture_rms():
        model(x, y)
    got = tele.learned()
    after = streams(model, x)[1:]
    assert got["act_top"] == pytest.approx([h.abs().max().item() for h in after], rel=1e-6)
    assert got["act_median"] == pytest.approx([h.abs().median().item() for h in after], rel=1e-6)
    assert got["act_top"][2] > 5000 > 20 > got["act_top"][1]  # the planted one, from block 2 on
    assert "hc_gain" not in got


def test_telemetry_reads_the_sum_of_the_streams_and_the_composite_gain(fake_streams):
    model, (x, y) = StandInModel(), batches(n=1)[0]
    tele = telemetry.Telemetry(model)
    with tele.capture_rms():
        model(x, y)
    got = tele.learned()
    want = [h.abs() for h in summed_streams(model, x)]
    assert got["act_top"] == pytest.approx([w.max().item() for w in want], rel=1e-6)
    assert got["act_median"] == pytest.approx([w.median().item() for w in want], rel=1e-6)
    assert got["hc_gain"] == pytest.approx(1.5**3)
