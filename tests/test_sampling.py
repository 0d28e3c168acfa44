"""The sampling engine: static KV cache, batches, compiled and graphed decode steps, sample.py's output.

GPU-only tests (CUDA graphs, no host sync) skip with a reason on a machine without CUDA."""

import contextlib
import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, assert_one_line_error, run

import sample
from data import token_files
from gpt_residual import config, dataset, engine
from gpt_residual.engine import generate, generate_stream, precast_copy
from gpt_residual.kv_cache import KVCache
from model import GPT, GPTConfig


def CUDA(test):
    """Marked gpu (`pytest -m gpu`), and skipped with the reason shown where no CUDA GPU is visible."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))
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
    meta = token_files.char_meta(TEXT)
    model = sharp_model(vocab_size=meta["vocab_size"])
    config_ = dataclasses.asdict(model.config)
    torch.save({"model": model.state_dict(), "model_config": config_, "tokenizer": json.dumps(meta)}, out / "ckpt.pt")
    return out


def sample_here(out, *flags) -> tuple[list[str], str, str]:
    """sample.sample in this process: the samples, what went to stdout, what went to stderr."""
    cfg = config.parse_args(sample.SampleConfig, [f"--out_dir={out}", "--device=cpu", *flags], allow_file=False)
    stdout, stderr = io.StringIO(), io.StringIO()
    samples = sample.sample(cfg, out=stdout, log=stderr)
    return samples, stdout.getvalue(), stderr.getvalue()


# ----------------------------------------------------------------------------- the static cache


def test_cache_is_allocated_once_and_written_in_place():
    model = sharp_model()
    idx = prompts(2, 3)
    stream = generate_stream(model, idx, 40, temperature=0)  # 40 tokens: slides past block_size 16
    next(stream)
    (decoder,) = model.decoders.values()
    cache = decoder.cache
    buffers = [t.data_ptr() for t in cache.k + cache.v + [cache.pos, cache.filled]]
    assert cache.k[0].shape == (2, 2, 16, 16)  # (B, nh, block_size, hs) from the start
    positions = []
    for _ in range(30):
        next(stream)
        positions.append(int(cache.pos))
    assert [t.data_ptr() for t in cache.k + cache.v + [cache.pos, cache.filled]] == buffers
    # 3 prompt tokens, then one slot per token; past block_size the context restarts from its last 8 tokens
    assert positions[:15] == list(range(4, 17)) + [8, 9]
    assert int(cache.filled.sum()) == positions[-1]


@pytest.mark.parametrize("length,new", [(3, 10), (5, 40), (20, 9)], ids=["within", "past-block", "long-prompt"])
def test_batch_rows_equal_each_row_alone(length, new):
    """Greedy decoding of a batch gives every row the tokens it gets alone, with and without the cache."""
    model = sharp_model()
    idx = prompts(4, length)
    batch = generate(model, idx, new, temperature=0)
    assert torch.equal(batch, generate(model, idx, new, temperature=0, use_cache=False))
    for r in range(4):
        assert torch.equal(batch[r : r + 1], generate(model, idx[r : r + 1], new, temperature=0))
    assert len({tuple(row) for row in batch[:, length:].tolist()}) == 4  # the rows differ: the check has teeth


@pytest.mark.parametrize("top_k,top_p", [(None, None), (5, None), (None, 0.8)])
def test_seeded_sampling_same_with_and_without_cache(top_k, top_p):
    model = sharp_model(seed=1)
    model.transformer.h.apply(lambda m: m.weight.data.div_(30) if isinstance(m, torch.nn.Linear) else None)
    idx = prompts(3, 4)
    texts = []
    for use_cache in (True, False):
        torch.manual_seed(11)
        texts.append(generate(model, idx, 40, temperature=1.0, top_k=top_k, top_p=top_p, use_cache=use_cache))
    assert torch.equal(*texts)
    torch.manual_seed(12)
    assert not torch.equal(texts[0], generate(model, idx, 40, temperature=1.0, top_k=top_k, top_p=top_p))


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (1.0, None), (1.0, 30)])
def test_padded_vocabulary_ids_are_never_chosen(use_cache, temperature, top_k, monkeypatch):
    """A model whose vocabulary is padded (37 real ids of 48) and whose padded rows win every logit:
    vocab_limit masks them before a token is chosen, so they are never sampled nor fed back."""
    model = sharp_model(vocab_size=48)
    monkeypatch.setattr(GPT, "softcap", lambda self, logits: logits + torch.arange(48).ge(37) * 1e4)  # padded win
    idx = prompts(3, 4)
    torch.manual_seed(0)
    free = generate(model, idx, 30, temperature=temperature, top_k=top_k, use_cache=use_cache)
    assert (free[:, 4:] >= 37).float().mean() > 0.5  # without the limit the padded ids win: the test has teeth
    torch.manual_seed(0)
    kept = generate(model, idx, 30, temperature=temperature, top_k=top_k, use_cache=use_cache, vocab_limit=37)
    assert kept.shape == (3, 34) and int(kept.max()) < 37


@pytest.mark.parametrize("rows", [1, 2, 200])
def test_a_cpu_decode_head_is_reordered_and_kept_up_to_date(monkeypatch, rows):
    """On a CPU the cached (eager) generation's head is computed the way the CPU runs fastest (engine.CpuHead:
    one row by a transposed copy of the weight, more by oneDNN's packed copy): F.linear never reads the head's
    weight. The copy follows the weight when it changes in place (an optimizer step): greedy tokens equal the
    uncached model's before and after."""
    model, idx, heads = sharp_model(), prompts(rows, 3), []
    real = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: heads.append(
        w.data_ptr() == model.lm_head.weight.data_ptr()) or real(x, w, b))  # fmt: skip
    cached = generate(model, idx, 12, temperature=0)
    assert heads and not any(heads)  # the blocks' linears ran, the head's never
    assert torch.equal(cached, generate(model, idx, 12, temperature=0, use_cache=False))
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)  # tied: the embedding changes too
    again = generate(model, idx, 12, temperature=0)
    assert torch.equal(again, generate(model, idx, 12, temperature=0, use_cache=False))
    assert not torch.equal(again, cached)


def test_vocab_limit_is_checked():
    model = sharp_model()
    for bad in (0, 38):
        with pytest.raises(ValueError, match="vocab_limit must be between 1 and the model's vocabulary size 37"):
            generate(model, prompts(1, 2), 1, vocab_limit=bad)
    with pytest.raises(ValueError, match="top_k must be between 1 and the vocabulary size 10"):
        generate(model, prompts(1, 2), 1, top_k=20, vocab_limit=10)


def test_sample_passes_the_tokenizers_vocabulary(monkeypatch):
    seen = {}
    monkeypatch.setattr(engine, "generate_stream", lambda model, idx, n, **kw: seen.update(kw) or iter(()))
    tok = dataset.Tokenizer(token_files.gpt2_meta())
    engine.draw(None, tok, torch.zeros(1, 1, dtype=torch.long), 0)
    assert seen["vocab_limit"] == tok.vocab_size == 50257


def test_cache_refuses_an_overrun_and_a_second_prompt():
    """KVCache.claim: never past block_size, and several tokens only from slot 0 (they would attend
    only to themselves, not to the cached prefix)."""
    model = sharp_model()
    cache = KVCache(model.config)
    cache.reset(torch.device("cpu"))
    model(prompts(1, 10), cache=cache)
    with pytest.raises(ValueError, match="cannot take 3 token.s. after 10 of its 16 slots"):
        model(prompts(1, 3), cache=cache)
    for _ in range(6):
        model(prompts(1, 1), cache=cache)
    assert int(cache.pos) == cache.length == 16
    with pytest.raises(ValueError, match="cannot take 1 token.s. after 16 of its 16 slots"):
        model(prompts(1, 1), cache=cache)
    assert int(cache.pos) == 16  # refused before anything was written
    cache.reset(torch.device("cpu"))
    model(prompts(1, 16), cache=cache)  # a whole block from slot 0 fits


def test_a_cached_step_checks_its_length_on_every_engine():
    model = sharp_model()
    decoder = engine.Decoder(model, lambda logits: logits[:, -1].argmax(-1, keepdim=True), "compile", None)
    decoder.prefill(prompts(1, 4))
    with pytest.raises(ValueError, match="a cached step needs a context of 2..16 tokens, got 17"):
        decoder.step(prompts(1, 1), 17)


def test_a_decode_step_makes_one_additive_mask_for_every_layer(monkeypatch):
    """SDPA converts a boolean mask in each call (kernels a decode step is made of): a step passes every layer
    the same 0/-inf mask in the queries' dtype, made once, that masks exactly the unfilled slots."""
    model, seen = sharp_model(n_layer=3), []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append((q.shape[2], attn_mask, q.dtype))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    generate(model, prompts(2, 5), 1, temperature=0)  # makes the decoder
    (decoder,) = model.decoders.values()
    decoder.span_step = 4  # as a graphed step: it reads 8 slots for a context of 6
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    stream = generate_stream(model, prompts(2, 5), 2, temperature=0)
    next(stream)  # the prompt (causal, no mask)
    assert [m for t, m, _ in seen] == [None] * 3
    seen.clear()
    next(stream)  # one step: 6 filled slots
    masks = [m for _, m, _ in seen]
    assert len(masks) == 3 and all(m is masks[0] for m in masks) and masks[0].dtype == seen[0][2]
    assert masks[0].tolist() == [[[[0.0] * 6 + [float("-inf")] * 2]]]


@pytest.mark.parametrize("length,new,spans", [(3, 10, {4, 8, 12}), (5, 40, {8, 12, 16})], ids=["within", "past-block"])
def test_steps_read_only_the_span_they_need(length, new, spans):
    """A step reads the context's length rounded up to a multiple of span_step slots (Decoder.SPAN when
    compiled or graphed, 1 when eager); 4 here, spans 4, 8, 12, 16: stale and empty slots are masked."""
    model = sharp_model()
    idx = prompts(2, length)
    generate(model, idx, 1, temperature=0)  # makes the decoder (one token: the prompt's, no step yet)
    (decoder,) = model.decoders.values()
    decoder.span_step = 4
    cols, spans_read = [], set()
    for col in generate_stream(model, idx, new, temperature=0):
        if cols:  # the first column came from the prompt's forward, not from a step
            spans_read.add(decoder.cache.span)
        cols.append(col)
    assert torch.equal(torch.cat(cols, 1), generate(model, idx, new, temperature=0, use_cache=False)[:, length:])
    assert spans_read == spans  # contexts of 4..12 tokens; of 6..16, then 9..16 after the slide
    stream = generate_stream(model, idx, 6, temperature=0)
    next(stream)  # the prompt; then each step's context is one token longer
    spans = [(next(stream), decoder.cache.span)[1] for _ in range(5)]
    assert spans == [-(-(length + i) // 4) * 4 for i in range(1, 6)]


def test_decoders_are_kept_per_batch_and_settings():
    model = sharp_model()
    generate(model, prompts(2, 3), 5, temperature=0)
    generate(model, prompts(2, 4), 5, temperature=0)  # same batch size and settings: reused
    assert len(model.decoders) == 1
    generate(model, prompts(1, 3), 5, temperature=0)
    generate(model, prompts(1, 3), 5, temperature=0.5)
    assert len(model.decoders) == 3


def test_engine_is_checked():
    model = sharp_model()
    with pytest.raises(ValueError, match="engine must be one of"):
        generate(model, prompts(1, 3), 2, engine="fast")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            generate(model, prompts(1, 3), 2, engine="graph")


def test_precast_copy_computes_what_autocast_computes():
    """The graphed step's weights, pre-cast to bf16, give autocast's logits bit for bit; the model is untouched."""
    model = sharp_model(bias=True)
    twin = precast_copy(model, torch.bfloat16)
    assert twin.lm_head.weight.dtype == torch.bfloat16 and twin.transformer.h[0].mlp.c_fc.bias.dtype == torch.bfloat16
    assert twin.transformer.wte.weight.dtype == torch.float32  # untied: the embedding stays as it was
    assert all(p.dtype == torch.float32 for p in model.parameters())
    idx = prompts(2, 7)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(twin(idx, torch.zeros_like(idx))[0], model(idx, torch.zeros_like(idx))[0])


def test_compiled_step_equals_eager_on_cpu():
    """engine=compile runs the decode step through torch.compile (inductor on the CPU: ~10-20 s here, the
    one slow test of this file): greedy tokens equal eager's, within and past block_size, batched."""
    model = sharp_model()
    idx = prompts(2, 3)
    compiled = generate(model, idx, 40, temperature=0, engine="compile")
    assert torch.equal(compiled, generate(model, idx, 40, temperature=0, engine="eager"))
    assert torch.equal(compiled, generate(model, idx, 40, temperature=0, use_cache=False))
    (decoder,) = [d for key, d in model.decoders.items() if key[1] == "compile"]
    assert decoder.setup_seconds > 0


class FakeGraph:
    """torch.cuda.CUDAGraph and torch.cuda.graph on a CPU: recording runs the step, then puts the cache
    back (a real capture runs nothing); replay runs the step again into the recorded output."""

    decoder = None  # the Decoder capturing now

    def __enter__(self):
        self.d, self.span = FakeGraph.decoder, FakeGraph.decoder.cache.span
        self.state = [t.clone() for t in self.tensors()]

    def __exit__(self, *exc):
        for t, saved in zip(self.tensors(), self.state):
            t.copy_(saved)

    def tensors(self):
        c = self.d.cache
        return c.k + c.v + [c.pos, c.filled]

    def replay(self):
        assert self.d.cache.span == self.span  # the graph of the span the step needs
        self.d.outs[self.span].copy_(self.d.fn(self.d.tok))


@pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")  # the capture's CUDA autocast, faked
def test_graph_engine_logic_runs_on_cpu_with_a_fake_cuda(monkeypatch):
    """The graph engine's bookkeeping (one graph per span, one input buffer, warm-up runs that put the
    cache's position back) with CUDA faked; the real graphs are tested by the CUDA tests below."""
    stream = type("FakeStream", (), {"wait_stream": lambda self, other: None})
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph: graph)
    capture = engine.Decoder._capture

    def fake_capture(decoder, tok):
        FakeGraph.decoder = decoder
        return capture(decoder, tok)

    monkeypatch.setattr(engine.Decoder, "_capture", fake_capture)
    monkeypatch.setattr(engine.Decoder, "SPAN", 4)
    model = sharp_model()
    monkeypatch.setattr(engine, "check_generate_args", lambda *args: None)  # engine=graph needs CUDA otherwise
    idx = prompts(3, 3)
    for new in (10, 40):  # within block_size, then past it (the graphs of the first call are replayed)
        graphed = generate(model, idx, new, temperature=0, engine="graph")
        assert torch.equal(graphed, generate(model, idx, new, temperature=0, use_cache=False))
    (decoder,) = [d for key, d in model.decoders.items() if key[1] == "graph"]
    assert sorted(decoder.graphs) == [4, 8, 12, 16] and decoder.setup_seconds > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the graphed step on pre-cast weights: autocast's tokens
        graphed = generate(model, idx, 40, temperature=0, engine="graph")
        assert torch.equal(graphed, generate(model, idx, 40, temperature=0, engine="eager"))
    (decoder,) = [d for key, d in model.decoders.items() if key[1] == "graph" and key[-1] == torch.bfloat16]
    assert decoder.model is not model and decoder.model.lm_head.weight.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- CUDA: graphs and compile


@CUDA
@pytest.mark.parametrize("engine", ["graph", "compile"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_engines_greedy_equal_eager(engine, dtype, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # full float32: exact comparisons
    model = sharp_model().cuda()
    idx = prompts(3, 3).cuda()
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        fast = generate(model, idx, 40, temperature=0, engine=engine)  # 40 tokens: slides past block_size 16
        again = generate(model, idx, 40, temperature=0, engine=engine)  # the captured graph, replayed again
        eager = generate(model, idx, 40, temperature=0, engine="eager")
        plain = generate(model, idx, 40, temperature=0, use_cache=False)
    assert torch.equal(fast, again)
    if dtype == torch.float32:
        assert torch.equal(fast, eager) and torch.equal(fast, plain)
    elif engine == "graph":  # the same kernels on pre-cast weights: the numbers eager autocast computes
        assert torch.equal(fast, eager)
    # bf16 with the cache and without, or fused by inductor, rounds differently: no exact equality to test


@CUDA
def test_cuda_graph_rows_equal_alone_and_sampling_runs(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # train.py's runtime may have set it
    model = sharp_model().cuda()
    idx = prompts(4, 5).cuda()
    batch = generate(model, idx, 30, temperature=0, engine="graph")
    for r in range(4):
        assert torch.equal(batch[r : r + 1], generate(model, idx[r : r + 1], 30, temperature=0, engine="graph"))
    torch.manual_seed(0)
    drawn = generate(model, idx, 30, temperature=1.0, top_k=10, top_p=0.9, engine="graph")
    assert drawn.shape == (4, 35) and drawn.min() >= 0 and drawn.max() < 37
    assert not torch.equal(drawn, batch)


@CUDA
def test_cuda_graph_decode_never_syncs_with_the_host():
    model = sharp_model(block_size=64).cuda()
    idx = prompts(2, 3).cuda()
    stream = generate_stream(model, idx, 50, temperature=1.0, top_k=5, engine="graph")
    cols = [next(stream), next(stream)]  # prefill and the capture (which synchronizes once)
    torch.cuda.set_sync_debug_mode("error")
    try:
        cols += list(stream)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.cat(cols, dim=1).shape == (2, 50)


# ----------------------------------------------------------------------------- sample.py


def test_stdout_is_only_the_samples(char_ckpt):
    flags = ["--num_samples=3", "--max_new_tokens=30", "--start=First", "--seed=5"]
    proc = run(["sample.py", f"--out_dir={char_ckpt}", "--device=cpu", *flags])
    assert proc.returncode == 0, proc.stderr
    samples, stdout, stderr = sample_here(char_ckpt, *flags)
    assert proc.stdout == stdout == "".join(s + "\n" for s in samples)
    assert len(samples) == 3 and all(s.startswith("First") and len(s) == 35 for s in samples)
    assert len(set(samples)) == 3
    assert "3 sample(s) x 30 tokens" in proc.stderr and "tok/s" in proc.stderr


def test_one_sample_streams_the_same_text(char_ckpt):
    flags = ["--num_samples=1", "--max_new_tokens=40", "--start=Be", "--temperature=0"]
    (s,), stdout, _ = sample_here(char_ckpt, *flags)
    assert stdout == s + "\n" and len(s) == 42
    (u,), _, _ = sample_here(char_ckpt, *flags, "--use_cache=False")
    assert u == s


def test_compile_engine_prints_its_one_time_cost(char_ckpt):
    flags = ["--num_samples=2", "--max_new_tokens=6", "--temperature=0", "--engine=compile"]
    compiled, stdout, log = sample_here(char_ckpt, *flags)
    assert compiled == sample_here(char_ckpt, *flags[:-1])[0]
    assert "engine=compile: one-time setup (compilation / graph capture)" in log and "engine=compile" not in stdout


def test_max_batch_splits_the_samples(char_ckpt):
    flags = ["--num_samples=5", "--max_new_tokens=20", "--start=Be", "--temperature=0"]
    whole, _, log = sample_here(char_ckpt, *flags)
    split, _, log2 = sample_here(char_ckpt, *flags, "--max_batch=2")
    assert whole == split and len(whole) == 5
    assert log.count("sample(s) x") == 1 and log2.count("sample(s) x") == 3


PEAK_RSS = """import sys, torch
from gpt_residual.pretrained import load_model
model, _ = load_model(sys.argv[1], "cpu")
model(torch.zeros(1, 1, dtype=torch.long))
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""  # VmHWM: this process's own peak (ru_maxrss would start from the forking parent's)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak memory from Linux's /proc")
def test_a_checkpoint_loads_its_weights_only_into_a_model_never_initialised(char_ckpt, tmp_path, monkeypatch):
    """pretrained.load_model (sample.py, scripts.eval, bench): the model is built on the meta device and takes
    the checkpoint's tensors (torch.nn.init never fills a real tensor), the head tied to the embedding; the file is
    memory-mapped, so an optimizer state of 256 MB is never read: the loading process's peak memory grows by
    far less than that."""
    inits, real = [], torch.nn.init.normal_

    def spy_init(*args, **kwargs):
        inits.append((args[0] if args else kwargs["tensor"]).device.type)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "normal_", spy_init)
    model, tok = sample.load_model(str(char_ckpt), "cpu")
    assert set(inits) <= {"meta"} and model.lm_head.weight is model.transformer.wte.weight and not model.training
    saved = torch.load(char_ckpt / "ckpt.pt", weights_only=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in saved["model"].items())
    big = tmp_path / "big"
    big.mkdir()
    torch.save({**saved, "optimizer": {"state": {0: {"exp_avg": torch.ones(64 * 2**20)}}}}, big / "ckpt.pt")
    peaks = {}
    for name, folder in (("small", char_ckpt), ("big", big)):
        proc = run(["-c", PEAK_RSS, str(folder)], timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        peaks[name] = int(proc.stdout.split()[-1]) / 1024  # MiB
    assert peaks["big"] - peaks["small"] < 64, peaks


class ScriptedModel:
    """Stands in for GPT in engine.draw: yields the given columns and counts how many were taken."""

    def __init__(self, rows: list[list[int]]):
        self.cols, self.taken = torch.tensor(rows).T.unsqueeze(-1), 0

    def generate_stream(self, idx, n, **kwargs):
        for col in self.cols[:n]:
            self.taken += 1
            yield col


def test_rows_stop_at_end_of_text(monkeypatch):
    monkeypatch.setattr(engine, "generate_stream", lambda model, idx, n, **kw: model.generate_stream(idx, n, **kw))
    tok = dataset.Tokenizer(token_files.gpt2_meta())
    eot, a, b = tok.enc.eot_token, tok.encode(" a")[0], tok.encode(" b")[0]
    rows = [[a, eot] + [a] * 38, [b] * 20 + [eot] + [b] * 19]
    model = ScriptedModel(rows)
    new, steps = engine.draw(model, tok, torch.zeros(2, 1, dtype=torch.long), 40)
    assert new == [[a], [b] * 20]
    assert model.taken == steps == 32  # every row ended within the second chunk of 16: no further steps


def test_a_stop_request_ends_the_draw_at_once(monkeypatch):
    """stopped() is asked before every step: the draw ends there, with the tokens drawn so far read back."""
    monkeypatch.setattr(engine, "generate_stream", lambda model, idx, n, **kw: model.generate_stream(idx, n, **kw))
    tok = dataset.Tokenizer(token_files.gpt2_meta())
    model = ScriptedModel([list(range(100, 140))])
    asked = []
    new, steps = engine.draw(model, tok, torch.zeros(1, 1, dtype=torch.long), 40, stopped=lambda: len(asked) > 20
                             or asked.append(1))  # fmt: skip
    assert new == [list(range(100, 121))] and steps == model.taken == 21


def test_engine_rule_and_errors(char_ckpt, capsys):
    assert sample.choose_engine("auto", "cuda", 500) == "graph"
    assert sample.choose_engine("auto", "cuda", sample.GRAPH_MIN_TOKENS - 1) == "eager"
    assert sample.choose_engine("auto", "cpu", 500) == "eager"
    assert sample.choose_engine("compile", "cpu", 5) == "compile"
    base = [f"--out_dir={char_ckpt}", "--device=cpu", "--max_new_tokens=5"]
    for flag, needle in [("--engine=fast", "engine"), ("--max_batch=0", "max_batch"), ("--engine=graph", "CUDA")]:
        assert sample.main([*base, flag]) == 2
        err = capsys.readouterr().err
        assert_one_line_error(Result(err), needle)


@dataclasses.dataclass
class Result:
    stderr: str
    stdout: str = ""
    returncode: int = 2


def test_readme_documents_the_engine():
    readme = (ROOT / "README.md").read_text()
    assert "--engine" in readme and "--max_batch" in readme
