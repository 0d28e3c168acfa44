"""Sampling side by side with transformers' generate: the same weights, greedy, in one process, one after the
other, every measurement alternating; and the peak memory of sample.py against transformers loading the same
model and generating, each in a fresh process. Run through bench.py:

    python -m scripts.bench configs/shakespeare_char.py --dataset=shakespeare --vs_transformers --new_tokens=200
    python -m scripts.bench --vs_transformers --out_dir=out-shakespeare --repeats=5     # a run's checkpoint

The weights are the checkpoint's (--out_dir), else the config's model randomly initialised (the dataset's
vocabulary when it is prepared, else GPT-2's). transformers runs the same weights as a GPT2LMHeadModel
(hf_export.to_hf, the export's own conversion); both sides decode PROMPT random tokens per row for
--new_tokens tokens (transformers: min_new_tokens too, so no row stops early) and must give identical tokens.
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
from gpt_residual import checkpoint, config, dataset, hf_export, pretrained, runtime
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
    """(our model in eval mode, its tokenizer's meta, where the weights come from)."""
    if out_dir:
        state = checkpoint.load(Path(out_dir) / "ckpt.pt", mmap=True)
        return pretrained.from_checkpoint(state).eval(), json.loads(state["tokenizer"]), f"{out_dir}/ckpt.pt"
    folder = dataset.dataset_dir(cfg.dataset, cfg.data_dir)
    if not synthetic and dataset.is_prepared(folder):
        meta = dataset.read_meta(folder)
        cfg.vocab_size = -(-meta["vocab_size"] // 64) * 64  # padded, as train.py pads it
    elif cfg.vocab_size >= token_files.gpt2_meta()["vocab_size"]:
        meta = token_files.gpt2_meta()
    else:  # a char vocabulary of that size, for sample.py to decode
        itos = [chr(c) for c in range(ord("a"), ord("a") + cfg.vocab_size)]
        meta = {"tokenizer": "char", "vocab_size": cfg.vocab_size, "itos": itos}
    torch.manual_seed(cfg.seed)
    return GPT(cfg.model_config()).eval(), meta, "randomly initialised"


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
    print(f"{source}: {c.n_layer} x {c.n_embd}, vocabulary {meta['vocab_size']}, greedy, {PROMPT} + "
          f"{opts.new_tokens} tokens, CPU float32, {torch.get_num_threads()} thread(s), median of {opts.repeats}")
    if opts.json:
        Path(opts.json).write_text(json.dumps({"mode": "vs_transformers", "source": source, "figures": figures}) + "\n")
    title = "sampling: transformers' generate vs this project (ratio: ours / theirs)"
    return title, ["transformers", "this project"], list(figures.items())
