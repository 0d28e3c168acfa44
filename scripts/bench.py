"""Measure how fast a config trains and samples; every mode prints one table.

    python -m scripts.bench configs/small.py                          # steady-state training throughput
    python -m scripts.bench configs/small.py --synthetic=True --steps=50 --warmup=10   # random tokens, no dataset
    python -m scripts.bench configs/small.py --compare=configs/rmsnorm.py          # two configs side by side
    python -m scripts.bench configs/small.py --time_to_loss --thresholds=2.0,1.88,1.7 --repeats=3
    python -m scripts.bench configs/small.py --sample --out_dir=out --repeats=3   # sampling, cache or not
    python -m scripts.bench configs/gpt2.py --sample --synthetic=True --repeats=2  # on a GPU: CUDA graphs, batch of 64
    python -m scripts.bench configs/small.py --synthetic=True --json=bench.json  # the table's figures as JSON too
    python -m scripts.bench --prepare --nanogpt=PATH/TO/nanoGPT      # data preparation vs nanoGPT's (bench_prepare.py)
    python -m scripts.bench --vs_transformers --out_dir=RUN --new_tokens=200  # sampling vs transformers' generate
    python -m scripts.bench configs/nanogpt_cpu.py --nanogpt=PATH/TO/nanoGPT --steps=200 --repeats=3
                    # the training step beside nanoGPT's train.py (bench_nanogpt.py); add --compile=True for compiled

Throughput runs the real model, optimizer, GradScaler, autocast and torch.compile of train.py in a
tight loop of forward/backward/step and reports tokens/s, ms/step, MFU and the peak memory of the
timed steps alone (CUDA: max allocated; CPU: peak resident set, reset after the warm-up steps).
--time_to_loss runs the whole training (train.train) and reads its metrics.jsonl: the time to reach
each validation loss, with and without the time spent evaluating. Any train.py key (--key=value)
applies to every config. One process only (not under torchrun). --json=FILE writes the figures
behind the table, per config, for other tools to read (python -m scripts.gpu_suite does).
"""

import ctypes
import gc
import json
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import train
from gpt_residual import config, dataset, runlog, runtime
from gpt_residual.engine import ENGINES
from gpt_residual.errors import USER_ERRORS
from scripts import bench_nanogpt, bench_prepare, bench_sampling


@dataclass
class BenchOptions:
    steps: int = 20  # timed optimizer steps (throughput)
    warmup: int = 5  # untimed steps first: compilation, allocator, caches
    synthetic: bool = False  # random tokens instead of the config's dataset (nothing to prepare)
    compare: str = ""  # a second config file, run the same way; the table gets a ratio column
    time_to_loss: bool = False  # run the config's full training and time it to each val-loss threshold
    thresholds: str = ""  # --time_to_loss: val-loss thresholds, e.g. 2.0,1.88,1.7
    repeats: int = 1  # --time_to_loss, --sample: runs of each measurement; the median is reported
    sample: bool = False  # sampling speed with and without the KV cache, one sequence and a batch
    new_tokens: int = 500  # --sample: tokens generated per measurement
    json: str = ""  # also write the table's figures to this file as JSON: {"mode", "title", "configs": [...]}
    engine: str = "auto"  # --sample: the cached decode step, as sample.py's --engine (auto: graph on CUDA)
    batch: int = 0  # --sample: rows of the batched measurement (0: 64 on CUDA, 8 elsewhere; 1: none)
    batch_uncached: bool | None = None  # --sample: time the batch without the cache too (None: on CUDA only)
    vs_transformers: bool = False  # greedy sampling beside transformers' generate, same weights (bench_sampling.py)
    nanogpt: str = ""  # a copy of nanoGPT: its train.py's step beside ours, --steps each, --repeats runs alternating

    def __post_init__(self):
        for key in ("steps", "repeats", "new_tokens"):
            if getattr(self, key) <= 0:
                raise config.ConfigError(f"{key} must be positive, got {getattr(self, key)}")
        if self.warmup < 0:
            raise config.ConfigError(f"warmup must be >= 0, got {self.warmup}")
        if self.batch < 0:
            raise config.ConfigError(f"batch must be >= 0, got {self.batch}")
        config.check_choice("engine", self.engine, ("auto", *ENGINES))
        if self.time_to_loss and self.sample:
            raise config.ConfigError("choose one of --time_to_loss and --sample")
        if self.nanogpt and (self.time_to_loss or self.sample or self.compare):
            raise config.ConfigError("--nanogpt times one config's step: leave out --time_to_loss, --sample, --compare")
        if self.json and not Path(self.json).resolve().parent.is_dir():
            raise config.ConfigError(f"json: the folder of {self.json} does not exist; create it or give another path")
        try:
            self.levels = [float(t) for t in self.thresholds.split(",") if t.strip()]
        except ValueError:
            raise config.ConfigError(
                f"thresholds must be numbers separated by commas, got {self.thresholds!r}"
            ) from None


def parse(argv: list[str]) -> tuple[BenchOptions, list[str]]:
    """Split bench.py's own flags from train.py's (returned as they are). A bool flag may be bare."""
    return config.split_flags(BenchOptions, argv)


# ----------------------------------------------------------------------------- table


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.4f}"


def print_table(title: str, labels: list[str], rows: list[tuple[str, list]], ratio: bool = True):
    """One row per metric, one column per config; with two configs, a ratio column (second / first)."""
    header = ["", *labels] + (["ratio"] if ratio and len(labels) == 2 else [])
    body = []
    for name, values in rows:
        cells = [name, *map(fmt, values)]
        if len(header) > len(cells):  # no ratio of readings that include the other config's run
            a, b = values
            numbers = isinstance(a, float | int) and isinstance(b, float | int) and a and "so far" not in name
            cells.append(fmt(b / a) if numbers else "-")
        body.append(cells)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    print(f"\n{title}")
    for r in [header, *body]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())


# ----------------------------------------------------------------------------- throughput


class SyntheticSampler:
    """Random tokens in the shape of dataset.BatchSampler (a pure function of the sample index), so
    the benchmark runs train.py's own data path, prefetching included, with no dataset to prepare."""

    def __init__(self, vocab_size: int, block_size: int, batch_size: int):
        self.vocab, self.T, self.B = vocab_size, block_size, batch_size

    def read(self, first: int, pin: bool = False) -> torch.Tensor:
        g = torch.Generator().manual_seed(first)
        data = torch.randint(self.vocab, (self.B, self.T + 1), generator=g, dtype=torch.int32)
        return data.pin_memory() if pin else data

    def get(self, g: int, device: str = "cpu"):
        return dataset.to_device(self.read(g * self.B, device.startswith("cuda")), device)


def build(cfg: config.TrainConfig, rt: runtime.Runtime, synthetic: bool):
    """train.py's state (model, optimizer, GradScaler; compiled per cfg.compile) and its batches."""
    if synthetic:
        sampler = SyntheticSampler(cfg.vocab_size, cfg.block_size, cfg.batch_size)
        model_cfg = cfg.model_config()
    else:
        data = train.load_data(cfg, rt)
        sampler, model_cfg = data.train, replace(cfg.model_config(), vocab_size=dataset.padded_vocab(data.meta))
    torch.manual_seed(cfg.seed)
    state = train.build_state(cfg, rt, model_cfg, None, None)
    compile_s = train.compile_model(state, cfg, rt, sampler)
    ahead = 4 if rt.device_type == "cuda" else 0
    return state, dataset.micro_batches(sampler, 0, 0, 1, rt.device, ahead), compile_s


def reset_peak_memory(device_type: str) -> bool:
    """Make the next peak_memory() the peak of what follows alone. CUDA: reset the allocator's statistics.
    CPU (Linux): hand freed heap back to the system (malloc_trim), then reset the process's peak resident
    set, VmHWM, to its current size (/proc/self/clear_refs, Linux 4.0+). False where that cannot be done
    (macOS): peak_memory() then reads the process's peak so far."""
    if device_type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return True
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)  # glibc keeps freed small blocks resident; a run's peak is its own
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory(device_type: str, reset: bool) -> tuple[str, float]:
    """(row name, MiB): the peak since reset_peak_memory; without a reset, the process's peak so far."""
    if device_type == "cuda":
        return "peak memory (MiB)", torch.cuda.max_memory_allocated() / 2**20
    status = Path("/proc/self/status")
    hwm = re.search(r"VmHWM:\s+(\d+) kB", status.read_text()) if status.exists() else None
    if reset and hwm:
        return "peak memory (MiB)", int(hwm.group(1)) / 2**10
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return "peak memory (MiB, process max RSS so far)", rss / (2**20 if sys.platform == "darwin" else 2**10)


def throughput(cfg: config.TrainConfig, opts: BenchOptions) -> dict:
    """Time train.train_step itself: steady-state steps after the warm-up ones, read back once at the end."""
    rt = runtime.init_runtime(cfg.device, cfg.dtype)
    runtime.keep_freed_memory(rt.device_type)  # as train.py does
    cfg = cfg.for_world(1)
    state, batches, compile_s = build(cfg, rt, opts.synthetic)
    step = lambda: train.train_step(state, batches, cfg.learning_rate, cfg, rt)[0]
    for _ in range(opts.warmup):
        step().item()
    reset = reset_peak_memory(rt.device_type)
    t0 = time.perf_counter()
    for _ in range(opts.steps):
        loss = step()
    loss = loss.item()  # waits for the device
    seconds = time.perf_counter() - t0
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    tok_s = tokens_per_step * opts.steps / seconds
    peak = runtime.peak_flops(rt, cfg.peak_flops)
    memory_row, memory = peak_memory(rt.device_type, reset)
    kind = "CUDA max allocated" if rt.device_type == "cuda" else "resident set" if reset else "the process's max RSS"
    model = state.raw_model
    info = (
        f"{model.num_params() / 1e6:.2f}M params, {tokens_per_step:,} tokens/step "
        f"({cfg.batch_size} x {cfg.block_size} x {cfg.gradient_accumulation_steps}), {rt.device} "
        f"{str(rt.dtype).removeprefix('torch.')}, compile={compile_s is not None}, "
        f"{'synthetic tokens' if opts.synthetic else cfg.dataset}, {opts.warmup} warm-up + {opts.steps} timed steps, "
        f"peak memory: {kind}{' of the timed steps' if reset else ' so far'}"
    )
    return {
        "info": info,
        "tokens/s": tok_s,
        "ms/step": seconds * 1000 / opts.steps,
        "MFU (%)": model.estimate_mfu(tok_s, peak) * 100 if peak else None,
        memory_row: memory,
        "compile s": compile_s,
        "loss at the end": loss,
    }


# ----------------------------------------------------------------------------- time to loss


def time_to_loss(cfg: config.TrainConfig, levels: list[float]) -> dict:
    """Train as configured; times from metrics.jsonl. "train s" leaves out the evaluation time."""
    result = train.train(cfg)
    if result["interrupted"]:  # Ctrl-C or SIGTERM stopped the run: stop the benchmark, not just this run
        raise KeyboardInterrupt
    records = runlog.read(cfg.out_dir)
    evals = [r for r in records if "val_loss" in r]
    steps = [r for r in records if "tokens_per_sec" in r][1:] or [r for r in records if "tokens_per_sec" in r]
    out = {}
    for level in levels:
        hit = next((r for r in evals if r["val_loss"] <= level), None)
        out[f"val <= {level:g}: wall s"] = hit["time"] if hit else None
        out[f"val <= {level:g}: train s"] = hit["time"] - hit["eval_time"] if hit else None
        out[f"val <= {level:g}: step"] = float(hit["step"]) if hit else None
        out[f"val <= {level:g}: val bpb"] = hit.get("val_bpb") if hit else None  # bits per byte there
    ms = statistics.median(r["ms_per_step"] for r in steps) if steps else None
    tokens_per_step = json.loads((Path(cfg.out_dir) / "config.json").read_text())["tokens_per_step"]
    out["tokens/s"], out["ms/step"] = (tokens_per_step * 1000 / ms if ms else None), ms
    out["eval s"] = result["eval_time"]
    out["train s"] = result["time"] - result["eval_time"]
    out["total s"] = result["time"]
    out["final val loss"], out["final val bpb"] = result["val_loss"], result.get("val_bpb")
    return out


def median_of(runs: list[dict]) -> dict:
    """Per metric, the median over the runs; None when some run never reached that loss."""
    return {k: None if any(r[k] is None for r in runs) else statistics.median(r[k] for r in runs) for k in runs[0]}


# ----------------------------------------------------------------------------- main


def run(argv: list[str]):
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise config.ConfigError("bench.py measures one process; run it with python, not torchrun")
    if any(a.split("=")[0] == "--suite" for a in argv):
        raise config.ConfigError("the GPU suite is a command of its own: python -m scripts.gpu_suite --nanogpt=PATH")
    if any(a.split("=")[0] == "--prepare" for a in argv):
        return bench_prepare.main(argv, print_table)
    opts, rest = parse(argv)
    flags = [a for a in rest if a.startswith("--")]
    out_dir = next((a.split("=", 1)[1] for a in reversed(flags) if a.startswith("--out_dir=")), None)
    runs = [rest] + ([[opts.compare, *flags]] if opts.compare else [])
    labels = [next((Path(a).stem for a in r if not a.startswith("--")), "defaults") for r in runs]
    if len(labels) == 2 and labels[0] == labels[1]:
        labels = [f"{labels[0]} (1)", f"{labels[1]} (2)"]
    cfgs = [config.parse_args(config.TrainConfig, r) for r in runs]  # every config checked before any run
    if opts.vs_transformers:  # scripts/bench_sampling.py measures; its table is printed here
        return print_table(*bench_sampling.run(cfgs[0], opts, out_dir))
    if opts.sample and out_dir and opts.compare:
        raise config.ConfigError("--sample with --out_dir measures one checkpoint; leave out --compare")
    if opts.nanogpt:  # scripts/bench_nanogpt.py measures; its table is printed here
        *table, problem = bench_nanogpt.run(rest, cfgs[0], opts.nanogpt, opts.steps, opts.warmup, opts.repeats)
        print_table(*table)
        if problem:
            raise bench_nanogpt.LossesDiffer(problem)
        return
    mode, title, results = measure(opts, runs, labels, cfgs, out_dir)
    infos = [res.pop("info", None) for res in results]
    for label, info in zip(labels, infos):
        if info:
            print(f"{label}: {info}")
    print_table(title, labels, [(k, [res.get(k) for res in results]) for k in results[0]])
    if opts.json:
        configs = [{"label": lb, "info": info, "figures": res} for lb, info, res in zip(labels, infos, results)]
        Path(opts.json).write_text(json.dumps({"mode": mode, "title": title, "configs": configs}, indent=1) + "\n")


def measure(opts: BenchOptions, runs: list[list[str]], labels: list[str], cfgs: list, out_dir: str | None):
    """(mode, the table's title, one dict of figures per config)."""
    if opts.sample:
        title = "sampling speed (KV cache vs recomputing the whole context; one sequence, then a batch)"
        return "sample", title, [bench_sampling.cache_speeds(cfg, opts, out_dir) for cfg in cfgs]
    if opts.time_to_loss:
        per_config = [[] for _ in cfgs]
        with tempfile.TemporaryDirectory() as tmp:
            base = Path(out_dir or tmp)
            for i in range(opts.repeats):  # alternate the configs so drifting machine load hits both
                for label, r, results_i in zip(labels, runs, per_config):
                    cfg = config.parse_args(config.TrainConfig, r)
                    cfg.out_dir = str(base / f"{label.replace(' ', '')}-{i}")
                    if (Path(cfg.out_dir) / "metrics.jsonl").exists():
                        raise config.ConfigError(f"{cfg.out_dir} already holds a run; give a new --out_dir")
                    results_i.append(time_to_loss(cfg, opts.levels))
        title = f"time to loss (median of {opts.repeats} run(s); train s leaves out evaluation)"
        return "time_to_loss", title, [median_of(r) for r in per_config]
    results = []
    for cfg in cfgs:
        results.append(throughput(cfg, opts))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return "throughput", "training throughput (steady state, after warm-up)", results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(config.help_text(BenchOptions, __doc__.strip()))
        print("\nand every key of train.py (python train.py --help), e.g. --device=cpu --batch_size=8")
        return 0
    try:
        run(argv)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except bench_nanogpt.LossesDiffer as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
