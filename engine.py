"""The decode machinery behind GPT.generate_stream's KV cache: a static-shape step that runs eager,
through torch.compile, or replayed as a CUDA graph.

Each generated token is one forward pass of one position per row. Run eagerly, that is hundreds of
small kernel launches per token, and on a GPU the launches, not the arithmetic, set the speed. The
KV cache is allocated once to block_size and written in place at a position tensor, so every decode
step has the same shapes and touches the same memory: it can be captured once as a CUDA graph and
replayed with one launch per token, with sampling on the device and no host sync.
"""

import time
from contextlib import nullcontext

import torch
import torch.nn as nn

from model import GPT, KVCache


class Decoder:
    """Cached generation for one batch shape. prefill runs a context through the model (SDPA over the
    prompt) into a fresh KV cache; step runs one token per row at the cache's position tensor and
    picks the next token on the device. Every step has the same shapes, so engine "compile" runs it
    through torch.compile, "graph" captures it as a CUDA graph on its first call and then replays it
    (one launch instead of hundreds), and "compile" on CUDA does both. Under autocast the compiled or
    graphed step uses a copy of the model whose matmul weights are pre-cast to the autocast dtype: the
    same numbers autocast would compute, without a cast per weight per step. setup_seconds is the
    one-time cost (compilation, capture) measured on the first step of each span; 0 when eager.

    A step reads the first `span` slots of the cache: eager, the context's length; compiled or
    graphed, that length rounded up to a multiple of SPAN (at most block_size), and each span gets its
    own graph or compilation, at most block_size / SPAN of them. With a batch of 64 GPT-2 rows the
    cache is 2.4 GB in bf16: reading all of it at every step would cost more than reading the weights."""

    SPAN = 256  # compiled or graphed steps: granularity of the slots a step reads

    def __init__(self, model: GPT, pick, engine: str, lowp: torch.dtype | None):
        graphed = engine == "graph" or (engine == "compile" and model.lm_head.weight.is_cuda)
        self.model = precast_copy(model, lowp) if lowp is not None and engine != "eager" else model
        self.pick, self.graphed, self.lowp = pick, graphed, lowp
        self.cache = KVCache(model.config)
        self.fn = torch.compile(self._step, dynamic=False) if engine == "compile" else self._step
        self.graphs, self.outs, self.seen, self.setup_seconds = {}, {}, set(), 0.0  # per span
        self.span_step = 1 if engine == "eager" else self.SPAN

    def _step(self, tok: torch.Tensor) -> torch.Tensor:
        logits, _ = self.model(tok, cache=self.cache)  # (B, 1, vocab)
        return self.pick(logits)  # (B, 1)

    def prefill(self, ctx: torch.Tensor) -> torch.Tensor:
        """Start the cache over with the context ctx (B, T); the next token of each row (B, 1)."""
        self.cache.reset(ctx.device)
        logits, _ = self.model(ctx, cache=self.cache)
        return self.pick(logits)

    def step(self, tok: torch.Tensor, length: int) -> torch.Tensor:
        """Feed the last token of each row (B, 1), the context being `length` tokens long with it;
        the next token (B, 1)."""
        span = self.cache.span = min(self.cache.block_size, -(-length // self.span_step) * self.span_step)
        if span in self.graphs:
            self.tok.copy_(tok)
            self.graphs[span].replay()
            return self.outs[span].clone()  # the next replay overwrites it
        if span in self.seen or self.span_step == 1:  # eager: nothing to set up
            return self.fn(tok)
        t0 = time.perf_counter()  # a new span: its compilation or capture is timed
        out = self._capture(tok) if self.graphed else self.fn(tok)
        if tok.is_cuda:
            torch.cuda.synchronize(tok.device)
        self.setup_seconds += time.perf_counter() - t0
        self.seen.add(span)
        return out

    def _capture(self, tok: torch.Tensor) -> torch.Tensor:
        """Warm up (compilation, cuBLAS workspaces) on a side stream, as CUDA graphs require, putting
        the cache's position back after each run; then record one step as a CUDA graph and replay it
        for this step. Autocast's cast cache is off while recording: a cached cast made outside the
        graph could be freed while the graph still reads it (the pre-cast weights need no casts)."""
        pos, filled = self.cache.pos.clone(), self.cache.filled.clone()
        self.tok = tok.clone() if not self.graphs else self.tok.copy_(tok)  # one input for every graph
        side = torch.cuda.Stream(tok.device)
        no_cast_cache = torch.autocast("cuda", self.lowp, cache_enabled=False) if self.lowp else nullcontext()
        side.wait_stream(torch.cuda.current_stream(tok.device))
        with torch.cuda.stream(side), no_cast_cache:
            for _ in range(2):  # each writes the keys and values the real step writes, at its slot
                self.fn(self.tok)
                self.cache.pos.copy_(pos)
                self.cache.filled.copy_(filled)
        torch.cuda.current_stream(tok.device).wait_stream(side)
        graph = self.graphs[self.cache.span] = torch.cuda.CUDAGraph()
        with no_cast_cache, torch.cuda.graph(graph):
            out = self.outs[self.cache.span] = self.fn(self.tok)
        graph.replay()
        return out.clone()


def precast_copy(model: GPT, dtype: torch.dtype) -> GPT:
    """A copy of model sharing its tensors, except that every Linear's weight and bias are cast to
    dtype (the head untied from the token embedding, which stays as it is)."""
    with torch.device("meta"):
        twin = GPT(model.config)
    twin.load_state_dict(model.state_dict(), assign=True)  # separate Parameters: wte and lm_head untied
    for module in twin.modules():
        if isinstance(module, nn.Linear):
            module.to(dtype)
    return twin.eval()
