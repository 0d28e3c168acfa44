"""Generation: the sampling loop (generate, generate_stream), how a token is picked, and the decode machinery of
the KV cache: a static-shape step that runs eager, through torch.compile, or replayed as a CUDA graph.

Each generated token is one forward pass of one position per row. Run eagerly, that is hundreds of
small kernel launches per token, and on a GPU the launches, not the arithmetic, set the speed. The
KV cache (gpt_residual/kv_cache.py) is allocated once to block_size and written in place at a position tensor. A
compiled or graphed decode step reads the first `span` slots of it, the context's length rounded up to a
multiple of Decoder.SPAN, so every step within a span has the same shapes and touches the same memory: it
is captured once per span as a CUDA graph and replayed with one launch per token, with sampling on the
device and no host sync. An eager step reads exactly the context's length of slots.
"""

import time
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt_residual.kv_cache import KVCache
from gpt_residual.pretrained import assemble
from model import GPT

ENGINES = ("eager", "compile", "graph")  # how a cached decode step runs: see Decoder
CHUNK = 16  # draw: tokens read back from the device at a time


@torch.inference_mode()
def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """idx (B, T) followed by max_new_tokens generated tokens; see generate_stream."""
    return torch.cat([idx, *generate_stream(model, idx, max_new_tokens, **kwargs)], dim=1)


@torch.inference_mode()
def generate_stream(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
    engine: str = "eager",
    vocab_limit: int | None = None,
):
    """Continue each row of idx (B, T) by max_new_tokens tokens; yields each new (B, 1) column,
    on the device (reading it back is the caller's sync: read a few columns at a time).

    temperature=0 is greedy decoding. With use_cache, keys and values are kept so each step runs
    one token through the model: engine "eager" as is, "compile" through torch.compile, "graph"
    (CUDA only) replayed as a CUDA graph; see Decoder. When the text outgrows block_size, the
    context is cut to its last block_size // 2 tokens (one forward pass refills the cache) and
    fills up again; the uncached path uses exactly the same contexts, so both give the same tokens.
    vocab_limit (the tokenizer's vocabulary size) drops the logits of ids at or above it before a token
    is chosen: a vocabulary padded for speed (GPT-2: 50257 -> 50304) has rows that are no real token.
    """
    check_generate_args(model, max_new_tokens, temperature, top_k, top_p, engine, idx.device, vocab_limit)
    choose_token = lambda logits: next_token(logits[:, -1, :vocab_limit].float(), temperature, top_k, top_p)
    sampling = (temperature, top_k, top_p, vocab_limit)
    decoder = decoder_for(model, idx.size(0), engine, sampling, choose_token) if use_cache else None
    bs = model.config.block_size
    start = max(0, idx.size(1) - bs)  # where the current context begins
    fresh = True  # the cache does not hold the current context yet
    for _ in range(max_new_tokens):
        if idx.size(1) - start > bs:
            start, fresh = idx.size(1) - max(1, bs // 2), True  # slide: keep the last half of the window
        if decoder is None:
            nxt = choose_token(model(idx[:, start:])[0])
        elif fresh:
            nxt, fresh = decoder.prefill(idx[:, start:]), False
        else:
            nxt = decoder.step(nxt, idx.size(1) - start)  # the last token (B, 1), the context's length
        idx = torch.cat((idx, nxt), dim=1)
        yield nxt


def draw(model: GPT, tok, idx: torch.Tensor, max_new_tokens: int, engine: str = "eager", stream=None,
         stopped=None, **sampling) -> tuple[list[list[int]], int]:
    """Generate for every row of idx (B, T) with generate_stream (sampling: temperature, top_k, top_p,
    use_cache), never a padded-vocabulary id (vocab_limit is the tokenizer's, a dataset.Tokenizer); a row ends
    at the tokenizer's end-of-text token (if it has one) or after max_new_tokens. Reads the tokens back CHUNK
    at a time and stops when every row has ended, or, before any step, when stopped() is true (a stop was
    requested: what was drawn is returned). Writes row 0's text to stream as it comes. Returns each row's
    new token ids and the number of steps run."""
    eot = tok.enc.eot_token if tok.kind == "gpt2" else None
    rows, done = [[] for _ in range(idx.size(0))], [False] * idx.size(0)
    decode, cols, steps = tok.stream_decoder(), [], 0
    tokens = generate_stream(model, idx, max_new_tokens, engine=engine, vocab_limit=tok.vocab_size, **sampling)
    while steps < max_new_tokens and not all(done):
        if stopped is not None and stopped():
            max_new_tokens = steps  # read back what was drawn, then stop
        else:
            cols.append(next(tokens))
            steps += 1
        if cols and (len(cols) == CHUNK or steps == max_new_tokens):
            for r, new in enumerate(torch.cat(cols, dim=1).tolist()):  # one host sync per chunk
                for t in new:
                    done[r] = done[r] or t == eot
                    if done[r]:
                        break
                    rows[r].append(t)
                    if stream is not None and r == 0:
                        stream.write(decode(t))
            cols = []
            if stream is not None:
                stream.flush()
    return rows, steps


def check_generate_args(model: GPT, max_new_tokens, temperature, top_k, top_p, engine, device, vocab_limit=None):
    vocab = model.config.vocab_size
    if vocab_limit is not None and not 1 <= vocab_limit <= vocab:
        raise ValueError(f"vocab_limit must be between 1 and the model's vocabulary size {vocab}, got {vocab_limit}")
    vocab = vocab_limit or vocab
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if top_k is not None and not 1 <= top_k <= vocab:
        raise ValueError(f"top_k must be between 1 and the vocabulary size {vocab}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    if engine == "graph" and device.type != "cuda":
        raise ValueError(f"engine='graph' replays CUDA graphs and needs a CUDA device, not {device.type}")


def decoder_for(model: GPT, batch: int, engine: str, sampling: tuple, choose_token) -> "Decoder":
    """The Decoder for this batch size, engine, sampling settings and autocast state, made once and
    kept in model.decoders: its cache, compiled code and CUDA graphs are reused by later calls. (A
    compiled or graphed one under autocast holds pre-cast weights: clear model.decoders after
    changing the weights.)"""
    device = model.lm_head.weight.device
    low_precision = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    key = (batch, engine, sampling, device, low_precision)
    if not hasattr(model, "decoders"):
        model.decoders = {}
    if key not in model.decoders:
        model.decoders[key] = Decoder(model, choose_token, engine, low_precision)
    return model.decoders[key]


def next_token(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None):
    """One token per row of logits (B, vocab): the most likely at temperature 0, else a random draw."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = F.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
    # argmax of p / Exp(1) noise is a draw from p (the exponential race); faster than torch.multinomial
    noise = torch.empty_like(probs).exponential_().clamp_(min=1e-30)  # never 0: 0/0 would be NaN
    return (probs / noise).argmax(dim=-1, keepdim=True)


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Keep the top_k most likely tokens and the smallest set whose probability reaches top_p."""
    if top_k is not None:
        v, _ = torch.topk(logits, top_k)
        logits = logits.masked_fill(logits < v[:, -1:], float("-inf"))  # a slice: no index tensor to copy
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = F.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - F.softmax(sorted_logits, dim=-1) >= top_p  # tokens after the nucleus is full
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    return logits


class Decoder:
    """Cached generation for one batch shape. prefill runs a context through the model (SDPA over the
    prompt) into a fresh KV cache; step runs one token per row at the cache's position tensor and
    picks the next token on the device. Every step of a span has the same shapes, so "compile" runs it
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

    def __init__(self, model: GPT, choose_token, engine: str, low_precision: torch.dtype | None):
        graphed = engine == "graph" or (engine == "compile" and model.lm_head.weight.is_cuda)
        self.model = precast_copy(model, low_precision) if low_precision is not None and engine != "eager" else model
        if engine == "eager" and not model.lm_head.weight.is_cuda:
            self.model = cpu_head_copy(self.model)  # the head as this CPU runs it fastest: see CpuHead
        self.choose_token, self.graphed, self.low_precision = choose_token, graphed, low_precision
        self.cache = KVCache(model.config)
        self.fn = torch.compile(self._step, dynamic=False) if engine == "compile" else self._step
        self.graphs, self.outs, self.seen, self.setup_seconds = {}, {}, set(), 0.0  # per span
        self.span_step = 1 if engine == "eager" else self.SPAN

    def _step(self, tok: torch.Tensor) -> torch.Tensor:
        logits, _ = self.model(tok, cache=self.cache)  # (B, 1, vocab)
        return self.choose_token(logits)  # (B, 1)

    def prefill(self, ctx: torch.Tensor) -> torch.Tensor:
        """Start the cache over with the context ctx (B, T); the next token of each row (B, 1)."""
        self.cache.reset(ctx.device)
        logits, _ = self.model(ctx, cache=self.cache)
        return self.choose_token(logits)

    def step(self, tok: torch.Tensor, length: int) -> torch.Tensor:
        """Feed the last token of each row (B, 1), the context being `length` tokens long with it;
        the next token (B, 1)."""
        if not 1 < length <= self.cache.block_size:  # compiled and graphed steps skip KVCache.claim's check
            raise ValueError(f"a cached step needs a context of 2..{self.cache.block_size} tokens, got {length}")
        self.cache.length = length - 1  # the tokens before this one
        out = self._run(tok, length)
        self.cache.length = length
        return out

    def _run(self, tok: torch.Tensor, length: int) -> torch.Tensor:
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
        pos, filled, length = self.cache.pos.clone(), self.cache.filled.clone(), self.cache.length
        self.tok = tok.clone() if not self.graphs else self.tok.copy_(tok)  # one input for every graph
        side = torch.cuda.Stream(tok.device)
        lp = self.low_precision
        no_cast_cache = torch.autocast("cuda", lp, cache_enabled=False) if lp else nullcontext()
        side.wait_stream(torch.cuda.current_stream(tok.device))
        with torch.cuda.stream(side), no_cast_cache:
            for _ in range(2):  # each writes the keys and values the real step writes, at its slot
                self.fn(self.tok)
                self.cache.pos.copy_(pos)
                self.cache.filled.copy_(filled)
                self.cache.length = length
        torch.cuda.current_stream(tok.device).wait_stream(side)
        graph = self.graphs[self.cache.span] = torch.cuda.CUDAGraph()
        with no_cast_cache, torch.cuda.graph(graph):
            out = self.outs[self.cache.span] = self.fn(self.tok)
        graph.replay()
        return out.clone()


def precast_copy(model: GPT, dtype: torch.dtype) -> GPT:
    """A copy of model sharing its tensors, except that every Linear's weight and bias are cast to
    dtype (the head untied from the token embedding, which stays as it is)."""
    twin = assemble(model.config, model.state_dict(), tie=False)  # wte and lm_head: Parameters of their own
    for module in twin.modules():
        if isinstance(module, nn.Linear):
            module.to(dtype)
    return twin.eval()


class CpuHead(nn.Module):
    """The head on a CPU (a decode step's, multiple-choice scoring's): F.linear's logits x W^T, computed the way
    this CPU runs fastest for the rows at hand: one row, x @ W^T with W^T a contiguous (n_embd, vocab) copy of
    W (MKL); more rows, oneDNN's linear with W packed in its blocked layout (the layout torch.compile's CPU
    backend packs weights into). With one thread (AMD EPYC, AVX-512), for W of GPT-2's vocabulary by 384 and
    768: 1.4-2x F.linear's speed for one row, 2.7-2.9x for 8, 1.7x for 100 (docs/benchmarks.md). The copy is
    made on first use and again when W changes (its version counter moves with every in-place update, as an
    optimizer step's). Without oneDNN (more than one row), or in another dtype than float32, F.linear."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.source, self.key, self.copy = weight, None, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.flatten(0, -2)  # (B * T, n_embd)
        w = self.source
        packed = len(rows) > 1
        if x.dtype != torch.float32 or w.dtype != torch.float32 or (packed and not ONEDNN_LINEAR):
            return F.linear(x, w)
        key = (w.data_ptr(), w._version, packed)
        if key != self.key:
            w, self.key = w.detach(), key
            pack = torch.ops.mkldnn._reorder_linear_weight
            self.copy = pack(w, batch_size=len(rows)) if packed else w.t().contiguous()
        if packed:
            return torch.ops.mkldnn._linear_pointwise(rows, self.copy, None, "none", [], "").view(*x.shape[:-1], -1)
        return x @ self.copy


ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def cpu_head_copy(model: GPT) -> GPT:
    """A copy of model sharing its tensors, its head a CpuHead of model's head weight."""
    twin = assemble(model.config, model.state_dict(), tie=False)
    twin.lm_head = CpuHead(model.lm_head.weight)
    return twin.eval()
