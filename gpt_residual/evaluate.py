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
from gpt_residual.engine import draw


def byte_table(meta: dict, vocab_size: int, device) -> torch.Tensor:
    """(vocab_size,) float: the UTF-8 bytes of each token id (dataset.Tokenizer.token_bytes), 0 for special
    tokens and for the padded ids beyond the tokenizer's vocabulary (never targets)."""
    lengths = dataset.Tokenizer(meta).token_bytes()
    table = torch.zeros(vocab_size)
    table[: len(lengths)] = torch.tensor(lengths, dtype=torch.float32)
    return table.to(device)


class Stopped(Exception):
    """The ranks agreed to stop in the middle of lockstep's work: it is abandoned."""


def lockstep(count: int, rt: runtime.Runtime, stop: runtime.GracefulStop | None = None):
    """The units 0..count-1 of some work strided over the ranks (rank r: r, r + W, ...), as (unit, keep): every
    rank gets the same number, so every rank runs the same number of forwards (under FSDP each forward
    gathers weights from every rank). A rank past its last unit gets the last one again with keep False: run
    it, drop its result. Before each, the ranks agree on the stop flag (stop.agreed(): at the same point on
    every rank) and raise Stopped together."""
    for i in range(-(-count // rt.world_size)):
        if stop is not None and stop.agreed():
            raise Stopped
        g = i * rt.world_size + rt.rank
        yield min(g, count - 1), g < count


@torch.no_grad()
def estimate_losses(model, samplers: dict, cfg, rt: runtime.Runtime, stop: runtime.GracefulStop, token_bytes=None):
    """Mean loss over the same samples of each split every time: eval_iters batches, or the whole split
    when it holds fewer windows (BatchSampler.estimate_samples); ranks share the work (lockstep). With
    token_bytes (byte_table), also "<split>_bpb": bits per byte over the same targets. The sums stay on the
    device until the end: one read-back for all splits. Returns None, abandoning the estimate, as soon as the
    ranks agree that a stop was requested (checked between batches)."""
    model.eval()
    try:
        totals = {}
        for split, sampler in samplers.items():
            samples = sampler.estimate_samples(cfg.eval_iters)
            batches = -(-samples // sampler.B)  # the last may be partial
            total = torch.zeros(4, device=rt.device)  # sums of: loss weighted by rows, rows, nats, bytes
            for g, keep in lockstep(batches, rt, stop):
                rows = min(sampler.B, samples - g * sampler.B)
                x, y = pad_rows(*sampler.get(g, rt.device, rows), sampler.B)
                with rt.autocast():
                    logits, loss = model(x, y)
                if keep:
                    total += batch_sums(logits, loss, y, rows, token_bytes)
            if rt.ddp:
                dist.all_reduce(total)
            totals[split] = total
        return summarize(totals, token_bytes is not None)
    except Stopped:
        return None
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
    """sample_interval > 0: at those eval steps (and the last), up to sample_tokens tokens after sample_prompt,
    drawn on rank 0 by sample.py's code (engine.draw: KV-cached, never a padded-vocabulary id, ending at
    end-of-text) from the unwrapped model, printed and logged as {"step", "sample"}. Every rank checks the
    prompt when this is made (a prompt outside a char vocabulary is a one-line DataError everywhere, not only
    on rank 0). The draw is seeded by cfg.seed inside a forked RNG, so it is the same every time and the
    training's random streams (dropout) are untouched: the losses equal those of a run without samples. Blocks
    compiled in place (compile_scope="blocks") run eagerly here: generation's shapes would make them recompile.
    A stop request (stop.requested, this rank's own flag: only rank 0 draws) ends the draw within a token."""

    TEMPERATURE = 0.8  # sample.py's default

    def __init__(self, cfg, rt: runtime.Runtime, meta: dict):
        self.cfg, self.rt, self.active = cfg, rt, cfg.sample_interval > 0 and rt.master
        if cfg.sample_interval > 0:  # a prompt outside a char vocabulary fails here, in setup, on every rank
            self.tokenizer = dataset.Tokenizer(meta)
            self.prompt = self.tokenizer.encode(cfg.sample_prompt.replace("\\n", "\n").replace("\\t", "\t"))

    def due(self, step: int) -> bool:
        return self.active and (step % self.cfg.sample_interval == 0 or step >= self.cfg.max_iters)

    def __call__(self, model, step: int, logger, stop=None) -> str | None:
        """The sample at this step (printed and logged); None when none is due, or when a stop was requested
        before or while drawing (nothing is printed or logged then)."""
        stopped = (lambda: stop.requested is not None) if stop is not None else None
        if not self.due(step) or (stopped and stopped()):
            return None
        rt, was_training = self.rt, model.training
        devices = [rt.device] if rt.device_type != "cpu" else []
        idx = torch.tensor([self.prompt], dtype=torch.long, device=rt.device)
        model.eval()
        try:
            with torch.random.fork_rng(devices=devices, device_type=rt.device_type), rt.autocast():
                torch.manual_seed(self.cfg.seed)
                with torch.compiler.set_stance("force_eager"):
                    rows, _ = draw(model, self.tokenizer, idx, self.cfg.sample_tokens, stopped=stopped,
                                   temperature=self.TEMPERATURE)  # fmt: skip
        finally:
            model.train(was_training)
        if stopped and stopped():
            return None
        text = self.tokenizer.decode(rows[0])
        shown = textwrap.indent(text, "  | ", lambda _: True)  # every line marked, blank ones too
        rt.print(f"step {step}: sample after {self.cfg.sample_prompt!r}:\n{shown}")
        logger.log({"step": step, "sample": text})
        return text
