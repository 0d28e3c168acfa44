"""The instruments (gpt_residual/instruments.py) on models whose answers are known: a planted massive activation, a
block that is the identity, the logit lens of the last block, an independent forward pass block by block, and stand-in
modules that follow the switches' contract (interfaces.md); and the telemetry's act_top / act_median."""

import copy
import math

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


# ----------------------------------------------------------------------------- the switches' modules


def test_gates_and_point_wise_norms_are_read_where_the_answer_is_known():
    """Gated attention with a constant gate (weight 0, bias b: every gate is sigmoid(b)) and DyT/Derf norms whose alpha
    makes them saturate all units (huge) or none (tiny): the readings say exactly that."""
    for norm in ("dyt", "derf"):
        model = tiny(attn_gate="head", norm=norm, bias=True)
        with torch.no_grad():
            for i, block in enumerate(model.transformer.h):
                block.attn.gate.weight.zero_()
                block.attn.gate.bias.fill_(0.5 * i - 0.5)
                block.ln_1.alpha.fill_(1e4)  # |alpha x| >> 1 wherever x is not ~0: saturated
                block.ln_2.alpha.fill_(1e-4)  # |alpha x| << 1: linear, nothing saturated
        sw = instruments.measure(model, batches())["switches"]
        for i in range(len(model.transformer.h)):
            assert sw[f"transformer.h.{i}.attn.gate"]["gate_mean"] == pytest.approx(torch.sigmoid(torch.tensor(
                0.5 * i - 0.5)).item(), rel=1e-6)  # fmt: skip
            ln_1, ln_2 = sw[f"transformer.h.{i}.ln_1"], sw[f"transformer.h.{i}.ln_2"]
            assert ln_1["saturated"] > 0.99 and ln_2["saturated"] == 0.0
            assert ln_1["alpha"] == pytest.approx(1e4) and ln_2["alpha"] == pytest.approx(1e-4)
            assert ("shift" in ln_1) == (norm == "derf")
        assert "saturated" in sw["transformer.ln_f"]


def test_hyper_connections_mixing_and_gain_are_read_from_the_model():
    """mHC: the mean H_res of every sub-layer is doubly stochastic (Sinkhorn), H_pre and H_post are the mixing's own
    outputs averaged over the tokens, and hc_gain is streams.composite_gain; the massive activations are those of the
    streams' sum (the stream the final norm reads)."""
    from gpt_residual import streams as streams_module

    model = tiny(hyper_connections="mhc", n_streams=3)
    data = batches()
    seen = {}
    hooks = [m.register_forward_hook(lambda m, a, out, name=name: seen.setdefault(name, []).append(out))
             for name, m in model.named_modules() if isinstance(m, streams_module.ManifoldMix)]  # fmt: skip
    got = instruments.measure(model, data)
    for h in hooks:
        h.remove()
    assert got["hc_gain"] == pytest.approx(streams_module.composite_gain(model))
    for i in range(3):
        for sub in ("res_attn", "res_mlp"):
            name = f"transformer.h.{i}.{sub}.mix"
            mix = got["switches"][name]
            h_res = torch.tensor(mix["h_res_mean"])
            assert h_res.shape == (3, 3)
            assert h_res.sum(0).allclose(torch.ones(3), atol=1e-4) and h_res.sum(1).allclose(torch.ones(3), atol=1e-4)
            first = [seen[name][k] for k in range(len(data))]  # measure's first pass over the batches
            want = torch.stack([o[0].flatten(0, 1).mean(0) for o in first]).mean(0)
            assert torch.tensor(mix["h_pre_mean"]).allclose(want, atol=1e-6)
            static = got["switches"][f"transformer.h.{i}.{sub}"]
            assert torch.tensor(static["h_res"]).shape == (3, 3)  # readings(): the static part
    with torch.no_grad():
        lanes = []
        hook = model.transformer.h[1].register_forward_hook(lambda m, a, out: lanes.append(out.sum(2)))
        for x, y in data:
            model(x, y)
        hook.remove()
    assert got["layers"][1]["top_abs"][0] == pytest.approx(max(h.abs().max().item() for h in lanes), rel=1e-6)


def test_attention_residuals_weights_are_uniform_at_init():
    """attn_residuals="full" with its zero-initialised pseudo-queries: every sub-layer's softmax over its sources is
    uniform, 1/S over S = the embedding and the earlier sub-layers' outputs."""
    model = tiny(attn_residuals="full")
    sw = instruments.measure(model, batches())["switches"]
    for i in range(3):
        for k, sub in enumerate(("res_attn", "res_mlp")):
            sources = 2 * i + k + 1
            weights = sw[f"transformer.h.{i}.{sub}.depth"]["weights_mean"]
            assert weights == pytest.approx([1 / sources] * sources)
            assert sw[f"transformer.h.{i}.{sub}"]["query_norm"] == 0.0


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


def test_telemetry_reads_the_sum_of_the_streams_and_the_composite_gain():
    from gpt_residual import streams as streams_module

    model, (x, y) = tiny(hyper_connections="hc", n_streams=3), batches(n=1)[0]
    tele = telemetry.Telemetry(model)
    with tele.capture_rms():
        model(x, y)
    got = tele.learned()
    lanes = []
    hooks = [b.register_forward_hook(lambda m, a, out: lanes.append(out.sum(2).abs())) for b in model.transformer.h]
    with torch.no_grad():
        model(x, y)
    for h in hooks:
        h.remove()
    assert got["act_top"] == pytest.approx([w.max().item() for w in lanes], rel=1e-6)
    assert got["act_median"] == pytest.approx([w.median().item() for w in lanes], rel=1e-6)
    assert got["hc_gain"] == pytest.approx(streams_module.composite_gain(model))
