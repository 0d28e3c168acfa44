"""Sampling speed, run through bench.py, which prints the table:

    python -m scripts.bench configs/small.py --sample --out_dir=out --repeats=3   # KV cache or not (cache_speeds)
    python -m scripts.bench configs/shakespeare_char.py --dataset=shakespeare --vs_transformers --new_tokens=200
    python -m scripts.bench --vs_transformers --out_dir=out-shakespeare --repeats=5     # a run's checkpoint

--sample times one sequence and a batch with the KV cache and without. --vs_transformers runs beside
transformers' generate: the same weights, greedy, in one process, one after the other, every measurement
alternating; and the peak memory of sample.py against transformers loading the same model and generating, each in
a fresh process. The weights (weights()) are the checkpoint's (--out_dir), else the config's model randomly
initialised (the dataset's vocabulary when it is prepared, else the config's). transformers runs the same weights
as a GPT2LMHeadModel (hf_export.to_hf, the export's own conversion); both sides decode PROMPT random tokens per row
for --new_tokens tokens (transformers: min_new_tokens too, so no row stops early) and must give identical tokens.
"""

import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import sample
from data import token_files
from gpt_residual import config, dataset, hf_export, pretrained, runtime
from gpt_residual.engine import generate
from model import GPT

PROMPT = 16  # prompt tokens per row
# wall time, and the CPU time of this thread (all of each side's work with one thread): on a shared machine the
# second is what the other jobs disturb least
CLOCKS = {"wall": time.perf_counter, "CPU": time.thread_time}

PEAK = """import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    if e.code:
        raise
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")), file=sys.stderr)
"""  # VmHWM (kB): this process's own peak resident memory; ru_maxrss would start from the forking parent's

HF_SAMPLE = """import sys, torch, transformers
folder, n = sys.argv[1], int(sys.argv[2])
model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
idx = torch.zeros(1, 1, dtype=torch.long)
with torch.inference_mode():
    model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                   pad_token_id=0)
"""


def weights(cfg: config.TrainConfig, out_dir: str | None, synthetic: bool) -> tuple[GPT, dict, str]:
    """(our model in eval mode on the CPU, its tokenizer's meta, where the weights come from): the checkpoint's,
    else the config's model randomly initialised, with the dataset's vocabulary as train.py pads it when the
    dataset is prepared (else the config's vocab_size, and GPT-2's BPE or a char vocabulary of that size)."""
    if out_dir:
        model, tok = pretrained.load_model(out_dir, "cpu")
        return model, tok.meta, f"{out_dir}/ckpt.pt"
    folder = dataset.dataset_dir(cfg.dataset, cfg.data_dir)
    if not synthetic and dataset.is_prepared(folder):
        meta = dataset.read_meta(folder)
        cfg.vocab_size = dataset.padded_vocab(meta)
    elif cfg.vocab_size >= token_files.gpt2_meta()["vocab_size"]:
        meta = token_files.gpt2_meta()
    else:  # a char vocabulary of that size, for sample.py to decode
        itos = [chr(c) for c in range(ord("a"), ord("a") + cfg.vocab_size)]
        meta = {"tokenizer": "char", "vocab_size": cfg.vocab_size, "itos": itos}
    torch.manual_seed(cfg.seed)
    return GPT(cfg.model_config()).eval(), meta, "randomly initialised"


def cache_speeds(cfg: config.TrainConfig, opts, out_dir: str | None) -> dict:
    """--sample: tokens/s of one sequence and of a batch, with the KV cache (engine as sample.py's) and without;
    each measurement alternates with the others, so drifting machine load hits all of them."""
    rt = runtime.init_runtime(cfg.device, cfg.dtype)
    model, _, source = weights(cfg, out_dir, opts.synthetic)
    model = model.to(rt.device)
    engine = sample.choose_engine(opts.engine, rt.device_type, opts.new_tokens)
    rows = opts.batch or (64 if rt.device_type == "cuda" else 8)
    plain_batch = opts.batch_uncached if opts.batch_uncached is not None else rt.device_type == "cuda"
    runs = [(1, True), (1, False)] + [(rows, True)] * (rows > 1) + [(rows, False)] * (rows > 1 and plain_batch)

    def tokens_per_s(batch: int, use_cache: bool, n: int) -> float:
        torch.manual_seed(cfg.seed)
        t0 = time.perf_counter()
        prompt = torch.zeros((batch, 1), dtype=torch.long, device=rt.device)
        out = generate(model, prompt, n, use_cache=use_cache, engine=engine)
        out[0, -1].item()  # .item() waits for the device
        return batch * n / (time.perf_counter() - t0)

    speeds = {run: [] for run in runs}
    with rt.autocast():
        for batch, use_cache in runs:  # warm-up: allocator; compilation or capture of every span the runs read
            tokens_per_s(batch, use_cache, opts.new_tokens if use_cache else 8)
        for _ in range(opts.repeats):
            for run in runs:
                speeds[run].append(tokens_per_s(*run, opts.new_tokens))
    setup = {key[0]: d.setup_seconds for key, d in model.decoders.items() if engine != "eager"}  # eager: none
    info = (
        f"{source}, {model.num_params() / 1e6:.2f}M params, block_size {model.config.block_size}, "
        f"{opts.new_tokens} new tokens, engine={engine}, {rt.device} {str(rt.dtype).removeprefix('torch.')}, "
        f"{torch.get_num_threads()} threads, median of {opts.repeats}"
    )
    return {"info": info, **sampling_rows(speeds, rows, setup)}


def sampling_rows(speeds: dict, rows: int, setup: dict) -> dict:
    """The --sample table: medians, and ratios of runs that ran back to back (None: not measured)."""
    med = {run: statistics.median(v) for run, v in speeds.items()}
    ratio = lambda a, b, k=1.0: statistics.median(k * x / y for x, y in zip(speeds[a], speeds[b])) if b in med else None
    batched = rows > 1
    return {
        "tokens/s with KV cache": med[(1, True)],
        "tokens/s without": med[(1, False)],
        "speed-up": ratio((1, True), (1, False)),
        f"batch of {rows}: tokens/s with KV cache": med.get((rows, True)) if batched else None,
        f"batch of {rows}: tokens/s without": med.get((rows, False)) if batched else None,
        f"batch of {rows}: speed-up": ratio((rows, True), (rows, False)) if batched else None,
        f"batch of {rows}: time / one sequence's": ratio((1, True), (rows, True), rows) if batched else None,
        "engine setup s, one sequence (once)": setup.get(1),
        f"engine setup s, batch of {rows} (once)": setup.get(rows) if batched else None,
    }


def speeds(model: GPT, hf, meta: dict, opts, rows: int) -> tuple[dict, bool]:
    """{(side, batch, clock): [tokens per second of that clock, per repeat]} for batch 1 and rows, alternating,
    and whether the tokens agree."""
    vocab, n = meta["vocab_size"], opts.new_tokens
    engine = sample.choose_engine(opts.engine, "cpu", n)
    prompts = {b: torch.randint(vocab, (b, PROMPT), generator=torch.Generator().manual_seed(b)) for b in (1, rows)}
    eos = hf.config.eos_token_id or 0

    def ours(idx):
        return generate(model, idx, n, temperature=0, vocab_limit=vocab, engine=engine)

    def theirs(idx):
        with torch.inference_mode():
            mask = torch.ones_like(idx)
            return hf.generate(idx, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=eos)  # fmt: skip

    sides = {"ours": ours, "transformers": theirs}
    same = all(torch.equal(ours(idx), theirs(idx)) for idx in prompts.values())  # also the warm-up
    times = {(side, b, clock): [] for side in sides for b in prompts for clock in CLOCKS}
    for _ in range(opts.repeats):
        for b, idx in prompts.items():
            for side, fn in sides.items():
                t0 = {clock: f() for clock, f in CLOCKS.items()}
                fn(idx)
                for clock, f in CLOCKS.items():
                    times[side, b, clock].append(b * n / (f() - t0[clock]))
    return times, same


def peak_rss(args: list[str]) -> float:
    """Peak resident memory (MiB) of a fresh python process running args (a script and its flags)."""
    proc = subprocess.run([sys.executable, "-c", PEAK, *args], capture_output=True, text=True)
    if proc.returncode:
        raise config.ConfigError(f"{args[0]} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return int(proc.stderr.split()[-1]) / 1024


def peaks(model: GPT, hf, meta: dict, out_dir: str | None, new_tokens: int) -> dict:
    """Peak memory of sample.py (greedy, one sample) and of transformers loading the same weights from an
    export and generating as many tokens, each in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        run = out_dir
        if run is None:  # a checkpoint of the random weights, as train.py writes one (without an optimizer)
            run = f"{tmp}/run"
            Path(run).mkdir()
            state = {"model": model.state_dict(), "model_config": dataclasses.asdict(model.config)}
            torch.save({**state, "tokenizer": json.dumps(meta)}, f"{run}/ckpt.pt")
        hf.save_pretrained(f"{tmp}/hf", safe_serialization=True)
        flags = [f"--out_dir={run}", "--device=cpu", "--num_samples=1", "--temperature=0", "--start=a"]
        ours = peak_rss(["sample.py", *flags, f"--max_new_tokens={new_tokens}"])
        Path(f"{tmp}/hf_sample.py").write_text(HF_SAMPLE)
        theirs = peak_rss([f"{tmp}/hf_sample.py", f"{tmp}/hf", str(new_tokens)])
    return {"ours": ours, "transformers": theirs}


def run(cfg: config.TrainConfig, opts, out_dir: str | None) -> tuple[str, list[str], list[tuple[str, list]]]:
    """Measure; print what was measured; write opts.json; return the table (title, columns: transformers and
    this project, rows) for bench.print_table (whose ratio column is ours / theirs)."""
    pretrained._transformers()  # the one-line error when transformers is missing
    rt = runtime.init_runtime(cfg.device, "float32")
    if rt.device_type != "cpu":
        raise config.ConfigError("--vs_transformers measures a CPU (transformers' generate eagerly); add --device=cpu")
    model, meta, source = weights(cfg, out_dir, opts.synthetic)
    if PROMPT + opts.new_tokens > model.config.block_size:
        raise config.ConfigError(
            f"{PROMPT} prompt tokens + new_tokens={opts.new_tokens} exceed block_size {model.config.block_size} "
            "(transformers' generate cannot slide its context); lower --new_tokens"
        )
    hf = hf_export.to_hf(model, meta)
    rows = opts.batch or 8
    times, same = speeds(model, hf, meta, opts, rows)
    memory = peaks(model, hf, meta, out_dir, opts.new_tokens)
    med = {key: statistics.median(v) for key, v in times.items()}
    figures = {}
    for b in dict.fromkeys((1, rows)):
        for clock in CLOCKS:
            name = f"batch {b}: tokens/s" + (" (wall)" if clock == "wall" else " of CPU time")
            figures[name] = [med["transformers", b, clock], med["ours", b, clock]]
            ratios = [o / t for o, t in zip(times["ours", b, clock], times["transformers", b, clock])]
            figures[f"batch {b}: ours / theirs, median of the pairs ({clock})"] = ["", statistics.median(ratios)]
    figures["peak memory, MiB (fresh process: load + sample)"] = [memory["transformers"], memory["ours"]]
    figures["tokens identical"] = ["", "yes" if same else "NO"]
    c = model.config
    print(
        f"{source}: {c.n_layer} x {c.n_embd}, vocabulary {meta['vocab_size']}, greedy, {PROMPT} + "
        f"{opts.new_tokens} tokens, CPU float32, {torch.get_num_threads()} thread(s), median of {opts.repeats}"
    )
    if opts.json:
        Path(opts.json).write_text(json.dumps({"mode": "vs_transformers", "source": source, "figures": figures}) + "\n")
    title = "sampling: transformers' generate vs this project (ratio: ours / theirs)"
    return title, ["transformers", "this project"], list(figures.items())
