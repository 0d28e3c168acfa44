"""Telemetry (per-layer gradient norms, update ratios, stream RMS), probe_init, and the init switch."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import metrics_records

import train
from gpt_residual import telemetry
from model import GPT, GPTConfig


def test_telemetry_records_every_interval(tiny_cfg):
    cfg = tiny_cfg(max_iters=12, telemetry_interval=4, n_layer=3)
    train.train(cfg)
    recs = metrics_records(cfg.out_dir)
    tele = [r for r in recs if "grad_attn" in r]
    assert [r["step"] for r in tele] == [0, 4, 8]
    for r in tele:
        for key in ("grad_attn", "grad_mlp", "update_attn", "update_mlp"):
            assert len(r[key]) == 3 and all(v > 0 and math.isfinite(v) for v in r[key]), key
        assert len(r["rms"]) == 4 and all(v > 0 for v in r["rms"])
        assert all(u < 1 for u in r["update_attn"])  # an update is a small fraction of the weights
        assert len(r["act_top"]) == len(r["act_median"]) == 3  # massive activations (test_instruments: the values)
        for top, median, rms in zip(r["act_top"], r["act_median"], r["rms"][1:]):
            assert top >= rms > 0 and top > median > 0


SUBLAYERS = {"attn": ("ln_1", "attn", "ln_1_out"), "mlp": ("ln_2", "mlp", "ln_2_out")}  # as telemetry.py documents


@pytest.fixture
def step_grads(monkeypatch):
    """Every optimizer step's gradients, by parameter name, as train.py clips them (after unscaling): the
    step's telemetry record is measured at exactly that point."""
    models, steps = [], []

    class Recording(telemetry.Telemetry):
        def __init__(self, model):
            models.append(model)
            super().__init__(model)

    real_clip = torch.nn.utils.clip_grad_norm_

    def clip(params, *args, **kwargs):
        params = list(params)
        names = {id(p): n for n, p in models[-1].named_parameters()}
        steps.append({names[id(p)]: p.grad.detach().clone() for p in params if p.grad is not None})
        return real_clip(params, *args, **kwargs)

    monkeypatch.setattr(telemetry, "Telemetry", Recording)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    return steps


def sublayer_grad_norm(grads: dict, layer: int, sublayer: str) -> float:
    """The norm of all gradients of one block's sub-layer (its weights and the norms that belong to it)."""
    prefixes = tuple(f"transformer.h.{layer}.{m}." for m in SUBLAYERS[sublayer])
    chosen = [g for name, g in grads.items() if name.startswith(prefixes)]
    assert chosen, (layer, sublayer)
    return math.sqrt(sum(g.double().pow(2).sum().item() for g in chosen))


@pytest.mark.parametrize("position", ["pre", "peri"])  # peri: the sub-layers' output norms count too
def test_grad_norms_are_each_sublayers_gradient_norm(tiny_cfg, step_grads, position):
    cfg = tiny_cfg(max_iters=4, telemetry_interval=2, n_layer=2, norm_position=position, eval_interval=100)
    train.train(cfg)
    records = [r for r in metrics_records(cfg.out_dir) if "grad_attn" in r]
    assert [r["step"] for r in records] == [0, 2] and len(step_grads) == 4
    for r in records:
        grads = step_grads[r["step"]]
        for name in SUBLAYERS:
            want = [sublayer_grad_norm(grads, i, name) for i in range(cfg.n_layer)]
            assert r[f"grad_{name}"] == pytest.approx(want, rel=1e-5), name
        # attention and MLP norms differ by far more than the tolerance, so a record with them swapped fails
        assert all(abs(a - m) > 1e-3 * max(a, m) for a, m in zip(r["grad_attn"], r["grad_mlp"])), r


def test_probe_init_measures_and_exits(tiny_cfg):
    cfg = tiny_cfg(probe_init=True, n_layer=4, eval_iters=3)
    record = train.train(cfg)
    assert record["probe_init"] is True and len(record["grad_mlp"]) == 4 and len(record["rms"]) == 5
    assert len(record["act_top"]) == len(record["act_median"]) == 4  # averaged over the batches like the rest
    vocab = json.loads((Path(cfg.data_dir) / "meta.json").read_text())["vocab_size"]
    assert abs(record["loss"] - math.log(vocab)) < 0.5  # an untrained model is near uniform
    assert not list(Path(cfg.out_dir).glob("ckpt*.pt"))  # probing trains nothing and saves nothing


def test_post_ln_stream_is_renormalised_at_every_block(tiny_cfg):
    record = train.train(tiny_cfg(probe_init=True, norm_position="post", n_layer=3))
    assert record["rms"][1:] == pytest.approx([1.0] * 3, abs=1e-3)  # LayerNorm output, weight 1, bias 0


@pytest.mark.parametrize("init", ["gpt2", "xavier"])
def test_init_switch(init):
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=16, vocab_size=50, init=init))
    w = m.transformer.h[0].mlp.c_fc.weight  # (512, 128)
    want = 0.02 if init == "gpt2" else math.sqrt(2 / (128 + 512))
    assert w.std().item() == pytest.approx(want, rel=0.05)
    x = torch.randint(0, 50, (2, 16))
    logits, _ = m(x, x)
    y = x.clone()
    y[:, 10] = (y[:, 10] + 1) % 50
    assert torch.equal(m(y, y)[0][:, :10], logits[:, :10])  # causal whatever the init


def test_xavier_trains(tiny_cfg, char_data):
    vocab = json.loads((char_data / "meta.json").read_text())["vocab_size"]
    result = train.train(tiny_cfg(init="xavier", max_iters=30))
    assert result["val_loss"] < math.log(vocab) - 0.3  # clearly better than uniform


def test_compiled_blocks_train_with_telemetry_and_compile_once(tiny_cfg, tmp_path):
    """compile_scope="blocks" (the default): the blocks share one compiled graph whatever n_layer, also with
    the switches whose code branches on the layer (value_residual: layer 0 differs). Telemetry steps run
    eagerly, so their hooks neither recompile the blocks nor change what is measured: the records equal
    an uncompiled run's."""
    from torch._dynamo.utils import counters

    switches = dict(max_iters=4, telemetry_interval=2, n_layer=4, value_residual=True, positions="rope")
    records = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        cfg = tiny_cfg(**switches, compile=compiled, out_dir=str(tmp_path / f"compiled-{compiled}"))
        train.train(cfg)
        records[compiled] = [r for r in metrics_records(cfg.out_dir) if "grad_attn" in r]
    # block and head, each in eval mode (the evaluation) and in train mode; layer 0 of value_residual twice
    assert counters["stats"]["unique_graphs"] <= 6, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])  # each region is one whole graph
    assert [r["step"] for r in records[True]] == [0, 2]
    for eager, compiled in zip(records[False], records[True]):
        for key in ("rms", "grad_attn", "grad_mlp", "v_lambda", "attn_logit_max"):
            assert compiled[key] == pytest.approx(eager[key], rel=1e-3, abs=1e-6), key
