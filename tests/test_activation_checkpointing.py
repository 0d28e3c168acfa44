"""activation_checkpointing: each block keeps only its input and runs again in the backward pass. The
losses and gradients are those without it; the blocks really do run twice; it composes with
torch.compile (blocks compiled apart, or the whole model) and survives a resume that toggles it."""

import functools

import pytest
import torch

import train
from gpt_residual import checkpoint
from model import GPT, GPTConfig

SHAPE = dict(n_layer=3, n_head=2, n_embd=32, block_size=16, vocab_size=50)
VARIANTS = {
    "gpt2": {},
    "dropout": dict(dropout=0.2),  # the recomputation must draw the same dropout masks
    "shared-state": dict(positions="rope", value_residual=True, residual_scalars=True, qk_norm=True),
    "post-ln": dict(norm_position="post", norm="rmsnorm"),
    "frontier": dict(attn_gate="elementwise", norm="derf", norm_scaling=True, depth_scaling=1.0),
    "mix-ln": dict(norm_position="mix", mix_ln_frac=0.34, attn_gate="head", depth_scaling=0.5),
}


def loss_and_grads(model: GPT, idx, targets, seed: int = 0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    _, loss = model(idx, targets)
    loss.backward()
    params = getattr(model, "_orig_mod", model).named_parameters()  # (a compiled model's are its original's)
    return loss.detach(), {n: p.grad.clone() for n, p in params}


def pair(**kw) -> tuple[GPT, GPT]:
    """Two models with the same weights, without and with activation checkpointing."""
    torch.manual_seed(0)
    plain = GPT(GPTConfig(**SHAPE, **kw))
    ckpt = GPT(GPTConfig(**SHAPE, **kw, activation_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    return plain, ckpt


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 50, (4, 16), generator=g), torch.randint(0, 50, (4, 16), generator=g)


def count_block_calls(model: GPT) -> list[int]:
    calls = [0]
    for block in model.transformer.h:
        block.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("variant", VARIANTS)
def test_same_loss_and_gradients(variant):
    plain, ckpt = pair(**VARIANTS[variant])
    idx, targets = batch()
    assert_same(loss_and_grads(plain, idx, targets), loss_and_grads(ckpt, idx, targets))


def test_blocks_run_again_in_the_backward_pass():
    plain, ckpt = pair()
    idx, targets = batch()
    for model, runs in ((plain, 1), (ckpt, 2)):
        calls = count_block_calls(model)
        _, loss = model(idx, targets)
        assert calls[0] == SHAPE["n_layer"]  # the forward pass
        loss.backward()
        assert calls[0] == runs * SHAPE["n_layer"]  # ... and, checkpointed, once more each in the backward
        with torch.no_grad():  # evaluation and generation: nothing to recompute, nothing wrapped
            model(idx, targets)
        assert calls[0] == (runs + 1) * SHAPE["n_layer"]


def test_fewer_tensors_kept_for_the_backward():
    plain, ckpt = pair()
    idx, targets = batch()
    kept = []
    for model in (plain, ckpt):
        sizes = []

        def pack(t, sizes=sizes):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(idx, targets)
        kept.append(sum(sizes))
    assert kept[1] < kept[0] / 2, kept  # per block, only its input (and the head's own tensors) stay


@pytest.mark.parametrize("scope", ["blocks", "model"])
def test_composes_with_torch_compile(scope, monkeypatch):
    """Checkpointing around the blocks that compile_regions compiled in place, and inside a whole-model
    compile. (Dynamo and AOTAutograd do the composing; aot_eager skips only Inductor's code generation.)"""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    plain, ckpt = pair(dropout=0.1)
    idx, targets = batch()
    calls = count_block_calls(ckpt)
    if scope == "blocks":
        ckpt.compile_regions()
        compiled = ckpt
    else:
        compiled = torch.compile(ckpt)
    expected = loss_and_grads(plain, idx, targets, seed=3)
    assert_same(expected, loss_and_grads(compiled, idx, targets, seed=3))
    if scope == "blocks":  # the hooks run outside the compiled forward: one more call per block in backward
        assert calls[0] == 2 * SHAPE["n_layer"]
    torch._dynamo.reset()


def test_resume_may_turn_it_on(tiny_cfg, tmp_path):
    """It is how the model runs, not what it is: a resumed run may switch it, and steps exactly as before."""
    train.train(tiny_cfg(out_dir=str(tmp_path / "straight"), lr_decay_iters=20))
    train.train(tiny_cfg(max_iters=10, lr_decay_iters=20))  # the first half of the same schedule
    result = train.train(tiny_cfg(init_from="resume", lr_decay_iters=20, activation_checkpointing=True))
    assert result["step"] == 20
    a, b = checkpoint.load(tmp_path / "straight/ckpt.pt"), checkpoint.load(tmp_path / "out/ckpt.pt")
    assert b["model_config"]["activation_checkpointing"] is True
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-5, atol=1e-7, msg=key)
