"""What train.py measures at its eval steps: the loss of each split, in nats per token and in bits per byte
(estimate_losses), and a short sample from a fixed prompt (TrainingSampler).

Bits per byte is the summed loss in bits over the summed UTF-8 bytes of the target tokens, special tokens
(GPT-2's <|endoftext|>) left out of both sums. Unlike nats per token it does not depend on the tokenizer:
a char model and a BPE model of the same text can be compared, and with published figures. For a char
model of ASCII text every token is one byte, and bpb = loss / ln 2.
"""

import math
import textwrap

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gpt_residual import dataset, runtime
from gpt_residual.engine import generate


def byte_table(meta: dict, vocab_size: int, device) -> torch.Tensor:
    """(vocab_size,) float: the UTF-8 bytes of each token id (dataset.Tokenizer.token_bytes), 0 for special
    tokens and for the padded ids beyond the tokenizer's vocabulary (never targets)."""
    lengths = dataset.Tokenizer(meta).token_bytes()
    table = torch.zeros(vocab_size)
    table[: len(lengths)] = torch.tensor(lengths, dtype=torch.float32)
    return table.to(device)


@torch.no_grad()
def estimate_losses(model, samplers: dict, cfg, rt: runtime.Runtime, stop: runtime.GracefulStop, token_bytes=None):
    """Mean loss over the same samples of each split every time: eval_iters batches, or the whole split
    when it holds fewer windows (BatchSampler.estimate_samples); ranks share the work. With token_bytes
    (byte_table), also "<split>_bpb": bits per byte over the same targets. The sums stay on the device
    until the end: one read-back for all splits. Returns None, abandoning the estimate, as soon as a stop
    is requested (checked between batches)."""
    model.eval()
    try:
        totals = {}
        for split, sampler in samplers.items():
            samples = sampler.estimate_samples(cfg.eval_iters)
            batches = -(-samples // sampler.B)  # the last may be partial
            total = torch.zeros(4, device=rt.device)  # sums of: loss weighted by rows, rows, nats, bytes
            for i in range(-(-batches // rt.world_size)):  # the same number of forwards on every rank
                if stop.agreed():  # under DDP every rank checks at the same batch, so all abandon together
                    return None
                g = min(i * rt.world_size + rt.rank, batches - 1)  # (FSDP: every rank must run each forward)
                rows = min(sampler.B, samples - g * sampler.B)
                x, y = pad_rows(*sampler.get(g, rt.device, rows), sampler.B)
                with rt.autocast():
                    logits, loss = model(x, y)
                if i * rt.world_size + rt.rank < batches:  # a batch beyond the last only kept this rank in step
                    total += batch_sums(logits, loss, y, rows, token_bytes)
            if rt.ddp:
                dist.all_reduce(total)
            totals[split] = total
        return summarize(totals, token_bytes is not None)
    finally:
        model.train()


def pad_rows(x: torch.Tensor, y: torch.Tensor, B: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A partial last batch padded to B rows, the compile warm-up's shape, so a compiled model sees no new shape
    (and compiles nothing) at evaluation; the padded rows' targets are -1, which the loss ignores."""
    rows, T = y.shape
    if rows >= B:
        return x, y
    padded = []
    for t, fill in ((x, 0), (y, -1)):  # views of a (B, T + 1) buffer: the strides of a batch as the sampler gives it
        out = torch.full((B, T + 1), fill, dtype=t.dtype, device=t.device)[:, :T]
        out[:rows] = t
        padded.append(out)
    return padded[0], padded[1]


def batch_sums(logits, loss, y, rows: int, token_bytes) -> torch.Tensor:
    """(loss x rows, rows, nats over the targets that have bytes, their bytes) of one batch, on the device."""
    weighted = loss.float() * rows
    if token_bytes is None:
        zero = torch.zeros((), device=y.device)
        return torch.stack([weighted, torch.full_like(zero, rows), zero, zero])
    nats = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none", ignore_index=-1)
    nbytes = torch.where(y.flatten() >= 0, token_bytes[y.flatten().clamp(min=0)], 0)  # a padded row has no bytes
    counted = torch.where(nbytes > 0, nats, 0.0).sum()  # special tokens have no bytes: out of both sums
    return torch.stack([weighted, torch.full_like(weighted, rows), counted, nbytes.sum()])


def summarize(totals: dict, with_bpb: bool) -> dict:
    """{split: mean loss, split_bpb: bits per byte (None where the targets had no bytes)}, from one read-back."""
    values = torch.stack(list(totals.values())).tolist()
    out = {}
    for split, (weighted, rows, nats, nbytes) in zip(totals, values):
        out[split] = weighted / rows
        if with_bpb:
            out[f"{split}_bpb"] = nats / math.log(2) / nbytes if nbytes else None
    return out


class TrainingSampler:
    """sample_interval > 0: at those eval steps (and the last), sample_tokens tokens after sample_prompt, drawn
    on rank 0 through the KV-cached engine (engine.generate) from the unwrapped model, printed and logged as
    {"step", "sample"}. The draw is seeded by cfg.seed inside a forked RNG, so it is the same every time and the
    training's random streams (dropout) are untouched: the losses equal those of a run without samples. Blocks
    compiled in place (compile_scope="blocks") run eagerly here: generation's shapes would make them recompile."""

    TEMPERATURE = 0.8  # sample.py's default

    def __init__(self, cfg, rt: runtime.Runtime, meta: dict):
        self.cfg, self.rt, self.active = cfg, rt, cfg.sample_interval > 0 and rt.master
        if cfg.sample_interval > 0:  # a prompt outside a char vocabulary fails here, in setup, on every rank
            self.tokenizer = dataset.Tokenizer(meta)
            self.prompt = self.tokenizer.encode(cfg.sample_prompt.replace("\\n", "\n").replace("\\t", "\t"))

    def due(self, step: int) -> bool:
        return self.active and (step % self.cfg.sample_interval == 0 or step >= self.cfg.max_iters)

    def __call__(self, model, step: int, logger) -> str | None:
        """The sample at this step (printed and logged), or None when none is due."""
        if not self.due(step):
            return None
        rt, was_training = self.rt, model.training
        devices = [rt.device] if rt.device_type != "cpu" else []
        idx = torch.tensor([self.prompt], dtype=torch.long, device=rt.device)
        model.eval()
        try:
            with torch.random.fork_rng(devices=devices, device_type=rt.device_type), rt.autocast():
                torch.manual_seed(self.cfg.seed)
                with torch.compiler.set_stance("force_eager"):
                    out = generate(model, idx, self.cfg.sample_tokens, temperature=self.TEMPERATURE)
        finally:
            model.train(was_training)
        text = self.tokenizer.decode(out[0, len(self.prompt) :].tolist())
        shown = textwrap.indent(text, "  | ", lambda _: True)  # every line marked, blank ones too
        rt.print(f"step {step}: sample after {self.cfg.sample_prompt!r}:\n{shown}")
        logger.log({"step": step, "sample": text})
        return text
