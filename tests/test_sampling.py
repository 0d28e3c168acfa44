"""The sampling engine: static KV cache, batches, compiled and graphed decode steps, sample.py's output.

GPU-only tests (CUDA graphs, no host sync) skip with a reason on a machine without CUDA."""

import dataclasses
import io
import json

import pytest
import torch
from conftest import ROOT, assert_one_line_error, run

import config
import dataset
import sample
from model import GPT, GPTConfig

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n"


def sharp_model(seed=0, **overrides) -> GPT:
    """A tiny random model whose greedy text depends on its context (matrices scaled up, as in test_model)."""
    values = dict(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=False)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**values, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(30)
    return model.eval()


def prompts(batch: int, length: int, vocab: int = 37, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def char_ckpt(tmp_path_factory):
    """out_dir/ckpt.pt of a tiny random char-level model, written as train.py writes one."""
    out = tmp_path_factory.mktemp("ckpt")
    meta = dataset.char_meta(TEXT)
    model = sharp_model(vocab_size=meta["vocab_size"])
    state = {"model": model.state_dict(), "model_config": dataclasses.asdict(model.config), "tokenizer": json.dumps(meta)}
    torch.save(state, out / "ckpt.pt")
    return out


def sample_here(out, *flags) -> tuple[list[str], str, str]:
    """sample.sample in this process: the samples, what went to stdout, what went to stderr."""
    cfg = config.parse_args(sample.SampleConfig, [f"--out_dir={out}", "--device=cpu", *flags], allow_file=False)
    stdout, stderr = io.StringIO(), io.StringIO()
    samples = sample.sample(cfg, out=stdout, log=stderr)
    return samples, stdout.getvalue(), stderr.getvalue()
