"""What makes the CPU training step fast, tested for what it must keep: the fused AdamW computes the same update as
the per-tensor loop, training keeps freed memory for reuse (no page faults for the same buffers at every step),
and a compiled CPU step gives the eager step's losses. No test here asserts a timing (docs/benchmarks.md has them)."""

import ctypes
import resource
import textwrap

import pytest
import torch

from gpt_residual import optim
from model import GPT, GPTConfig
from tests.conftest import run


def train_steps(optimizer_kwargs: dict, steps: int = 20) -> torch.Tensor:
    """The flattened weights of a tiny model after steps of AdamW built by optim.build (or with optimizer_kwargs)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65, bias=True))
    optimizer = optim.build(model, 0.1, 1e-3, (0.9, 0.99), "cpu")
    for group in optimizer.param_groups:
        group.update(optimizer_kwargs)
    g = torch.Generator().manual_seed(1)
    for i in range(steps):
        x = torch.randint(65, (4, 16), generator=g)
        _, loss = model(x, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * (i + 1) / steps
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_adamw_is_fused_on_cpu_and_computes_the_loops_update():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64))
    assert optim.build(model, 0.1, 1e-3, (0.9, 0.95), "cpu").defaults["fused"] is True
    fused, loop = train_steps({}), train_steps({"fused": False, "foreach": False})
    torch.testing.assert_close(fused, loop, rtol=0, atol=1e-5)  # the same update, to rounding, after 20 steps
    assert torch.equal(fused, train_steps({})), "the fused step is deterministic: a resume stays exact"


FAULTS = textwrap.dedent(
    """
    import resource, sys, torch
    import train
    from gpt_residual import config
    values = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=4, max_iters=2, eval_interval=2,
                  eval_iters=1, device="cpu", compile=False, dtype="float32", data_dir=sys.argv[1], out_dir=sys.argv[2])
    if sys.argv[3] == "train":
        train.train(config.parse_args(config.TrainConfig, [], overrides=values))
    faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = torch.empty(16 << 20)  # 64 MB, as a BPE model's logits and their gradient are
    buffer.fill_(1.0)
    del buffer
    before = faults()
    for _ in range(5):
        buffer = torch.empty(16 << 20)
        buffer.fill_(1.0)
        del buffer
    print(faults() - before)
    """
)


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallopt"), reason="glibc only (mallopt)")
def test_training_keeps_freed_memory_for_reuse(char_data, tmp_path):
    """After train.train, a freed 64 MB buffer is reused: five more fault in at most one buffer's pages, where glibc's
    default would map and fault in its 16k pages every time, as it did for every eval forward of a BPE model."""
    script = tmp_path / "faults.py"
    script.write_text(FAULTS)
    counts = {}
    for mode in ("bare", "train"):
        proc = run([str(script), str(char_data), str(tmp_path / mode), mode], env={"PYTHONPATH": "."})
        assert proc.returncode == 0, proc.stderr[-2000:]
        counts[mode] = int(proc.stdout.strip().splitlines()[-1])
    pages = (64 << 20) // resource.getpagesize()
    assert counts["bare"] > 4 * pages, counts  # the default: mapped and faulted in again each time
    # after training: the same heap memory again; at most one new mapping of it (a small allocation between two
    # may split the freed block, and the next 64 MB then extends the heap once), never one every time
    assert counts["train"] < 1.5 * pages, counts


def test_compiled_cpu_gelu_is_gpt2s_tanh_gelu():
    """Compiled for a CPU, model.gelu is written with a sigmoid: the same function and gradient as torch's tanh
    GELU, over the usual range and where exp over- or underflows."""
    import torch.nn.functional as F

    import model

    x = torch.cat([torch.linspace(-12, 12, 4001), torch.tensor([-1e4, -90.0, -30.0, 30.0, 90.0, 1e4])])
    x.requires_grad_(True)
    g = torch.linspace(-1, 1, x.numel())
    compiled = torch.compile(model.gelu, fullgraph=True)
    out = compiled(x)
    (grad,) = torch.autograd.grad(out, x, g)
    x_ref = x.detach().requires_grad_(True)
    ref = F.gelu(x_ref, approximate="tanh")
    (grad_ref,) = torch.autograd.grad(ref, x_ref, g)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(model.gelu(x_ref), ref)  # eager: torch's kernel itself


def test_compiled_cpu_training_gives_the_eager_losses(tiny_cfg, tmp_path):
    """compile=True on a CPU (the whole model, as the step comparison runs it) trains to the eager run's losses:
    the same math, rounded in another order."""
    import train
    from tests.conftest import metrics_records

    losses = {}
    for compiled in (False, True):
        cfg = tiny_cfg(compile=compiled, compile_scope="model", max_iters=8, eval_interval=8, log_interval=1,
                       checkpoint_interval=0, out_dir=str(tmp_path / str(compiled)))
        result = train.train(cfg)
        assert (result["compile_time"] > 0) == compiled
        records = metrics_records(cfg.out_dir)
        losses[compiled] = [r[k] for k in ("loss", "val_loss") for r in records if k in r]
    assert len(losses[True]) == 8 + 2
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=0, atol=1e-5)  # seen 2e-7
