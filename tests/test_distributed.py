"""Multi-process training on the CPU: real `torchrun --nproc_per_node=2` runs over gloo.

What must hold when W processes each take k micro-batches per step:
  (a) they compute what ONE process with W*k accumulation steps computes over the same global
      batch: the same per-step losses and gradient norms, the same final weights (to float32
      round-off), for parallel=ddp and parallel=fsdp;
  (b) the ranks read disjoint micro-batches that together are the single process's;
  (c) only rank 0 writes files and prints;
  (d) resuming a 2-rank run continues it bit-exactly (dropout on, so per-rank RNG matters);
  (e) evaluation is shared by the ranks and gives the single process's mean loss.

Most runs go through a small recorder script that patches a few functions to note what each rank
did (batches read, files written), then calls train.main: the code path of `python train.py`. The
resume test launches train.py itself. Every process runs with OMP_NUM_THREADS=1 so that the
single-process reference does the same float32 arithmetic in each matmul.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CPU_FSDP, ROOT, metrics_records, needs_cpu_fsdp

from gpt_residual import checkpoint

STEPS, K, WORLD = 6, 2, 2  # optimizer steps, micro-batches per rank per step, ranks
EVAL_ITERS = 5  # not a multiple of WORLD: ranks get 3 and 2 eval batches
TINY = [
    "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4", "--device=cpu",
    "--dtype=float32", "--compile=False", "--learning_rate=3e-3", "--min_lr=3e-4", "--warmup_iters=2",
    "--bias=False",
]  # fmt: skip
# bias=False: the key bias has an exactly zero true gradient (softmax ignores a shift shared by all
# keys), so its gradient is pure round-off that AdamW turns into lr-sized updates; with it the
# 2-rank and 1-process weights would differ by ~1e-6 in that one tensor for no fault of train.py.
TRAIN_SEED = 1337  # TrainConfig.seed: the training sampler's; eval samplers use seed + 1, seed + 2
TIMEOUT = 240  # per subprocess: a hang fails the test instead of stalling the suite

# Runs train.main(argv) after patching: BatchSampler.read (which micro-batches this rank reads),
# checkpoint.save, Path.write_text, Path.touch and open for writing (which files this rank writes).
# Each rank leaves what it saw in $RECORD_DIR/rank<RANK>.json. Under torchrun the process group is
# joined here first with a finite gloo timeout (init_runtime then uses it), so a collective that
# one rank never reaches fails the run instead of hanging it.
RECORDER = """
import builtins, datetime, json, os, pathlib, sys
sys.path.insert(0, {root!r})
import torch.distributed as dist
import train
from gpt_residual import checkpoint, dataset

if "RANK" in os.environ:
    timeout = datetime.timedelta(seconds=float(os.environ.get("GLOO_TIMEOUT_S", "120")))
    dist.init_process_group("gloo", timeout=timeout)
seen = {{"get": [], "writes": []}}

def wrap(owner, name, note):
    original = getattr(owner, name)
    def patched(*args, **kwargs):
        note(*args, **kwargs)
        return original(*args, **kwargs)
    setattr(owner, name, patched)

def note_read(self, first, *a, **k):
    seen["get"].append([self.seed, first // self.B, self.window_starts(first).tolist()])

wrap(dataset.BatchSampler, "read", note_read)
wrap(checkpoint, "save", lambda state, path: seen["writes"].append(["save", str(path)]))
wrap(pathlib.Path, "write_text", lambda self, *a, **k: seen["writes"].append(["write_text", str(self)]))
wrap(pathlib.Path, "touch", lambda self, *a, **k: seen["writes"].append(["touch", str(self)]))
def note_open(path, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax"):
        seen["writes"].append(["open", str(path)])

wrap(builtins, "open", note_open)
try:
    rc = train.main(sys.argv[1:])
finally:
    out = pathlib.Path(os.environ["RECORD_DIR"]) / ("rank" + os.environ.get("RANK", "0") + ".json")
    out.write_text(json.dumps(seen))
sys.exit(rc)
"""


def launch(script, args: list[str], world: int, env_extra: dict | None = None):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TORCH_CPP_LOG_LEVEL="ERROR", **(env_extra or {}))
    prefix = [sys.executable]
    if world > 1:
        prefix += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    return subprocess.run(
        [*prefix, str(script), *args], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, env=env
    )


class Run:
    """One finished run: its out_dir, stdout/stderr, metrics records and per-rank recordings."""

    def __init__(self, proc, out: Path, rec: Path):
        self.proc, self.out, self.rec = proc, out, rec

    def ok(self) -> "Run":
        assert self.proc.returncode == 0, (
            f"rc={self.proc.returncode}\n{self.proc.stdout[-3000:]}\n{self.proc.stderr[-3000:]}"
        )
        return self

    @property
    def records(self) -> list[dict]:
        return metrics_records(self.out)

    def train_records(self) -> list[dict]:
        return [r for r in self.records if "loss" in r]

    def eval_records(self) -> list[dict]:
        return [r for r in self.records if "val_loss" in r]

    def rank(self, r: int) -> dict:
        return json.loads((self.rec / f"rank{r}.json").read_text())

    def weights(self) -> dict:
        return checkpoint.load(self.out / "ckpt.pt")["model"]


@pytest.fixture(scope="module")
def runs(char_data, tmp_path_factory):
    """runs(name) -> Run, launched once per module: 'single' (one process, W*k accumulation),
    'ddp' and 'fsdp' (2 ranks, k accumulation each), all on the same global batches."""
    root = tmp_path_factory.mktemp("dist")
    script = root / "recorder.py"
    script.write_text(RECORDER.format(root=str(ROOT)))
    base = [*TINY, f"--data_dir={char_data}", f"--max_iters={STEPS}", "--dropout=0", "--log_interval=1"]
    base += ["--eval_interval=3", "--checkpoint_interval=3"]
    specs = {
        "single": (1, [f"--gradient_accumulation_steps={WORLD * K}", f"--eval_iters={EVAL_ITERS}"]),
        "ddp": (WORLD, [f"--gradient_accumulation_steps={K}", "--parallel=ddp", f"--eval_iters={EVAL_ITERS}"]),
        # an even eval split here: an uneven one hangs FSDP (test_fsdp_eval_with_an_uneven_split)
        "fsdp": (WORLD, [f"--gradient_accumulation_steps={K}", "--parallel=fsdp", "--eval_iters=4"]),
    }
    specs["ddp-sample"] = (WORLD, [*specs["ddp"][1], "--sample_interval=3", "--sample_tokens=8"])
    # compile=True with TORCH_COMPILE_DISABLE=1: compile_model's warm-up runs as it does on a GPU, dynamo passes through
    for parallel in ("ddp", "fsdp"):
        world, extra = specs[parallel]
        specs[f"{parallel}-compiled"] = (world, [*extra, "--compile=True"], {"TORCH_COMPILE_DISABLE": "1"})
    for name in ("single", "ddp", "fsdp"):  # per-layer telemetry every 3 steps, and the probe at initialisation
        world, extra, *env = specs[name]
        specs[f"{name}-telemetry"] = (world, [*extra, "--telemetry_interval=3"], *env)
        specs[f"{name}-probe"] = (world, [*extra, "--probe_init=True"], *env)
    for parallel in ("ddp", "fsdp"):  # each block recomputed in the backward: the same steps
        world, extra = specs[parallel][:2]
        specs[f"{parallel}-checkpointed"] = (world, [*extra, "--activation_checkpointing=True"])
    done: dict[str, Run] = {}

    def get(name: str) -> Run:
        if "fsdp" in name and not CPU_FSDP:
            pytest.skip("parallel=fsdp on a CPU needs torch >= 2.7")
        if name not in done:
            world, extra, *env = specs[name]
            out, rec = root / name, root / f"{name}-rec"
            rec.mkdir()
            env = {"RECORD_DIR": str(rec), **(env[0] if env else {})}
            proc = launch(script, [*base, *extra, f"--out_dir={out}"], world, env)
            done[name] = Run(proc, out, rec).ok()
        return done[name]

    get.script, get.root, get.base = script, root, base
    return get


def ours(writes: list, out: Path) -> list:
    """The writes into the run's out_dir or the repo (torch 2.6 itself writes a module into the temp dir on import)."""
    return [w for w in writes if w[1].startswith((str(out), str(ROOT)))]


def assert_close_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-6), f"{key}: max diff {(a[key] - b[key]).abs().max()}"


# ----------------------------------------------------------------------------- (a) same computation as one process


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_reach_the_single_process_weights(runs, parallel):
    single, multi = runs("single"), runs(parallel)
    resolved = [json.loads((run.out / "config.json").read_text()) for run in (single, multi)]
    assert resolved[1]["world_size"] == WORLD and resolved[0]["tokens_per_step"] == resolved[1]["tokens_per_step"]
    assert_close_weights(multi.weights(), single.weights())
    # the gradient norm is taken after the all-reduce: every step's must match the single process's
    for a, b in zip(multi.train_records(), single.train_records(), strict=True):
        assert a["step"] == b["step"] and a["lr"] == b["lr"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), a["step"]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_the_compile_warm_up_leaves_no_gradient_behind(runs, parallel):
    """compile=True warms up with one forward and backward before the first step. A backward without
    gradient sync under FSDP keeps its unsharded gradients for the next synced one (zero_grad does not clear
    them): the first step would add the warm-up's gradient to its own."""
    single, compiled = runs("single"), runs(f"{parallel}-compiled")
    assert "compiled in" in compiled.proc.stdout
    for a, b in zip(compiled.train_records(), single.train_records(), strict=True):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), a["step"]
    assert_close_weights(compiled.weights(), single.weights())


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_activation_checkpointing_under_two_ranks(runs, parallel):
    """Recomputing each block in the backward (FSDP: its sharded parameters gathered again) changes nothing."""
    single, checkpointed = runs("single"), runs(f"{parallel}-checkpointed")
    assert json.loads((checkpointed.out / "config.json").read_text())["activation_checkpointing"] is True
    for a, b in zip(checkpointed.train_records(), single.train_records(), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(
            b["grad_norm"], rel=1e-5
        ), a["step"]
    assert_close_weights(checkpointed.weights(), single.weights())


def test_fsdp_logs_what_ddp_logs(runs):
    ddp, fsdp = runs("ddp").train_records(), runs("fsdp").train_records()
    assert [r["step"] for r in ddp] == [r["step"] for r in fsdp] == list(range(1, STEPS + 1))
    for a, b in zip(ddp, fsdp, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(
            b["grad_norm"], rel=1e-5
        )


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_log_the_single_process_losses(runs, parallel):
    """The logged training loss of a step is the mean over the whole global batch (all ranks'
    micro-batches), as the single process with W*k accumulation steps logs it."""
    single, multi = runs("single").train_records(), runs(parallel).train_records()
    got, want = [r["loss"] for r in multi], [r["loss"] for r in single]
    assert got == pytest.approx(want, rel=1e-5), f"{parallel} logged {got}, one process {want}"


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_telemetry_under_two_ranks_is_the_single_process_telemetry(runs, parallel):
    """Gradient norms and update ratios are taken after the all-reduce, so each layer's equal one process's; the
    stream RMS is rank 0's own micro-batches (a share of the global batch), so only its shape is checked."""
    one = [r for r in runs("single-telemetry").records if "grad_attn" in r]
    two = [r for r in runs(f"{parallel}-telemetry").records if "grad_attn" in r]
    assert [r["step"] for r in two] == [r["step"] for r in one] and len(one) == 2
    for a, b in zip(two, one, strict=True):
        for key in ("grad_attn", "grad_mlp", "update_attn", "update_mlp"):
            assert len(a[key]) == 2 and a[key] == pytest.approx(b[key], rel=1e-4), (parallel, key, a["step"])
        assert len(a["rms"]) == 3 and all(0 < v < 100 for v in a["rms"])
    assert_close_weights(runs(f"{parallel}-telemetry").weights(), runs(parallel).weights())  # measuring changes nothing


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_probe_init_runs_on_two_ranks_and_rank_0_logs_it_once(runs, parallel):
    probe = runs(f"{parallel}-probe")
    records = probe.records
    assert len(records) == 1 and records[0]["probe_init"] is True, records
    single = runs("single-probe").records[0]
    for key in ("grad_attn", "grad_mlp", "rms"):
        assert len(records[0][key]) == len(single[key]) and all(v > 0 for v in records[0][key]), key
    assert records[0]["loss"] == pytest.approx(single["loss"], rel=0.05)  # untrained: about ln(vocab) on both
    assert ours(probe.rank(1)["writes"], probe.out) == [], "rank 1 wrote files"
    assert sum("at initialisation" in line for line in probe.proc.stdout.splitlines()) == 1


# ----------------------------------------------------------------------------- (b) disjoint data


def train_reads(rank_record: dict, seed: int = TRAIN_SEED) -> list[tuple[int, list[int]]]:
    return [(g, starts) for s, g, starts in rank_record["get"] if s == seed]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_ranks_read_disjoint_shares_of_the_single_process_batches(runs, parallel):
    single, multi = runs("single"), runs(parallel)
    one = dict(train_reads(single.rank(0)))
    # one process reads micro-batches 0, 1, 2, ... (on the CPU nothing is read ahead)
    assert list(one) == list(range(STEPS * WORLD * K))
    windows = []
    for r in range(WORLD):
        reads = train_reads(multi.rank(r))
        # rank r reads micro-batches r, W + r, 2W + r, ...: g = (step * k + micro) * W + r
        assert [g for g, _ in reads] == [j * WORLD + r for j in range(STEPS * K)]
        for g, starts in reads:
            assert starts == one[g], f"rank {r} micro-batch {g} is not the single process's"
        windows.append({s for _, starts in reads for s in starts})
    # the run stays within one epoch, so all windows are distinct: the ranks never share a sample
    assert not windows[0] & windows[1]
    assert windows[0] | windows[1] == {s for g, starts in one.items() if g < STEPS * WORLD * K for s in starts}


def test_ranks_share_the_eval_batches(runs):
    multi = runs("ddp")
    evals, share = len(multi.eval_records()), -(-EVAL_ITERS // WORLD)
    for seed in (TRAIN_SEED + 1, TRAIN_SEED + 2):  # estimate_loss's train and val samplers
        per_rank = [[g for g, _ in train_reads(multi.rank(r), seed)] for r in range(WORLD)]
        assert set(per_rank[0]) | set(per_rank[1]) == set(range(EVAL_ITERS))  # every eval batch is read...
        assert all(len(reads) <= evals * share for reads in per_rank), per_rank  # ...each rank reading its share


# ----------------------------------------------------------------------------- (c) only rank 0 writes


def test_only_rank_0_writes_files(runs):
    multi = runs("ddp")
    names = sorted(p.name for p in multi.out.iterdir())
    want = [".lock", "ckpt-0000003.pt", "ckpt-0000006.pt", "ckpt-best.pt", "ckpt.pt", "config.json", "metrics.jsonl"]
    assert names == want
    assert ours(multi.rank(1)["writes"], multi.out) == [], "rank 1 wrote files"
    writes = [(kind, Path(p).name) for kind, p in multi.rank(0)["writes"]]
    assert writes.count(("open", ".lock")) == 1  # rank 0 holds out_dir's lock
    config_temps = [name for kind, name in writes if kind == "open" and name.startswith(".config.json.tmp")]
    assert len(config_temps) == 1  # written whole (files.write_atomic), then renamed to config.json
    assert writes.count(("open", "metrics.jsonl")) == 1
    assert [p for kind, p in writes if kind == "save"] == ["ckpt-0000003.pt", "ckpt-0000006.pt"]


def test_metrics_record_each_step_once(runs):
    multi = runs("ddp")
    assert [r["step"] for r in multi.train_records()] == list(range(1, STEPS + 1))
    assert [r["step"] for r in multi.eval_records()] == [0, 3, 6]
    assert len(multi.records) == STEPS + 3


def test_stdout_has_each_line_once(runs):
    lines = runs("ddp").proc.stdout.splitlines()
    needles = ("model:", "step 0: train loss", "step 6: train loss", "done: step 6", "on 2 process(es)", "config (all")
    for needle in needles:
        assert sum(needle in line for line in lines) == 1, (needle, lines)
    for s in range(1, STEPS + 1):
        assert sum(line.startswith(f"step {s}/{STEPS} |") for line in lines) == 1, s


# ----------------------------------------------------------------------------- (d) exact resume


RNG_NOTE = "dropout's RNG differs now"  # train.restore's note when the checkpoint's number of processes differs


def test_a_resume_on_another_number_of_processes_notes_the_rng(tiny_cfg, capsys):
    """The note whose absence the resume below asserts is printed where it applies (one process, cheaply: a
    checkpoint whose RNG list says two processes wrote it)."""
    import train

    train.train(tiny_cfg(max_iters=2))
    path = Path(tiny_cfg().out_dir) / "ckpt.pt"
    state = checkpoint.load(path)
    checkpoint.save({**state, "rng": state["rng"] * 2}, path)
    capsys.readouterr()
    train.train(tiny_cfg(max_iters=4, init_from="resume"))
    assert RNG_NOTE in capsys.readouterr().out


def test_resume_under_ddp_is_bit_identical(char_data, tmp_path):
    """8 steps straight == 4 steps, then --init_from=resume to 8; dropout on, so each rank's RNG
    must be restored. lr_decay_iters is fixed so both halves follow the same schedule."""
    n = 8
    args = [*TINY, f"--data_dir={char_data}", "--dropout=0.1", "--gradient_accumulation_steps=2", "--eval_iters=2"]
    args += [f"--lr_decay_iters={n}", "--eval_interval=100", "--log_interval=1", "--checkpoint_interval=0"]

    def train(out: Path, max_iters: int, *extra: str):
        proc = launch("train.py", [*args, f"--out_dir={out}", f"--max_iters={max_iters}", *extra], WORLD)
        return Run(proc, out, out).ok()

    straight = train(tmp_path / "straight", n)
    train(tmp_path / "halves", n // 2)
    resumed = train(tmp_path / "halves", n, "--init_from=resume")
    assert f"resumed from {tmp_path / 'halves' / 'ckpt.pt'} at step {n // 2}" in resumed.proc.stdout
    assert RNG_NOTE not in resumed.proc.stdout  # written by 2 processes, resumed by 2: every rank's RNG restored
    a, b = checkpoint.load(straight.out / "ckpt.pt"), checkpoint.load(resumed.out / "ckpt.pt")
    assert a["step"] == b["step"] == n
    assert len(a["rng"]) == len(b["rng"]) == WORLD
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), f"weights differ in {key}"
    for i, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][i][name]), f"optimizer state {i}.{name} differs"
    straight_losses = [r["loss"] for r in straight.train_records()]
    assert straight_losses == [r["loss"] for r in resumed.train_records()]


@needs_cpu_fsdp
@pytest.mark.parametrize("saved, resumed", [("fsdp", "ddp"), ("ddp", "fsdp")])
def test_a_checkpoint_of_one_parallel_resumes_under_the_other(runs, saved, resumed):
    """checkpoint.py saves full, unsharded state dicts keyed by parameter name under both DDP and FSDP: a run saved
    at step 3 under one goes on under the other and reaches, at step 6, what the original run reached."""
    out = runs.root / f"{saved}-to-{resumed}"
    out.mkdir()
    (out / "ckpt.pt").write_bytes((runs(saved).out / "ckpt-0000003.pt").read_bytes())
    rec = runs.root / f"{saved}-to-{resumed}-rec"
    rec.mkdir()
    args = [*runs.base, f"--gradient_accumulation_steps={K}", f"--parallel={resumed}", "--eval_iters=4"]
    proc = launch(runs.script, [*args, "--init_from=resume", f"--out_dir={out}"], WORLD, {"RECORD_DIR": str(rec)})
    run = Run(proc, out, rec).ok()
    assert "at step 3" in proc.stdout
    assert_close_weights(run.weights(), runs(saved).weights())
    state = checkpoint.load(out / "ckpt.pt")["optimizer"]["state"]
    original = checkpoint.load(runs(saved).out / "ckpt.pt")["optimizer"]["state"]
    assert state.keys() == original.keys()
    for name in state:
        assert torch.allclose(state[name]["exp_avg"], original[name]["exp_avg"], rtol=1e-4, atol=1e-7), name


# ----------------------------------------------------------------------------- (e) evaluation uses all ranks


def test_ddp_eval_matches_the_single_process(runs):
    single, multi = runs("single").eval_records(), runs("ddp").eval_records()
    assert multi[0]["step"] == single[0]["step"] == 0
    for key in ("train_loss", "val_loss", "train_bpb", "val_bpb"):
        assert multi[0][key] == pytest.approx(single[0][key], rel=1e-6, abs=1e-7), key
    # and at the end, after identical training, to round-off
    assert multi[-1]["val_loss"] == pytest.approx(single[-1]["val_loss"], rel=1e-5)


@needs_cpu_fsdp
def test_fsdp_eval_with_an_uneven_split(runs):
    """FSDP all-gathers the weights in every forward, so every rank must run the same number of
    eval forwards even when eval_iters is not a multiple of the world size."""
    single = runs("single").eval_records()[0]
    out, rec = runs.root / "fsdp-uneven", runs.root / "fsdp-uneven-rec"
    rec.mkdir()
    args = [*runs.base, "--max_iters=0", "--parallel=fsdp", f"--eval_iters={EVAL_ITERS}", f"--out_dir={out}"]
    proc = launch(runs.script, args, WORLD, {"RECORD_DIR": str(rec), "GLOO_TIMEOUT_S": "20"})
    run = Run(proc, out, rec)
    assert proc.returncode == 0, (
        f"parallel=fsdp with eval_iters={EVAL_ITERS} on {WORLD} ranks failed (rc {proc.returncode}): the ranks "
        f"ran different numbers of eval forwards and FSDP's all-gathers did not match\n{proc.stderr[-1500:]}"
    )
    got = run.eval_records()[0]
    for key in ("train_loss", "val_loss", "train_bpb", "val_bpb"):
        assert got[key] == pytest.approx(single[key], rel=1e-6, abs=1e-7), key


def test_ddp_samples_on_rank_0_leave_the_losses_alone(runs):
    """sample_interval under DDP: rank 0 alone generates, once per eval step; the other rank waits at the next
    all-reduce, and every loss is the run's without samples."""
    plain, sampled = runs("ddp"), runs("ddp-sample")
    samples = [r for r in sampled.records if "sample" in r]
    assert [r["step"] for r in samples] == [r["step"] for r in plain.eval_records()]
    assert sampled.proc.stdout.count(": sample after") == len(samples)
    losses = lambda run: [(r["step"], r.get("loss"), r.get("val_loss")) for r in run.records if "sample" not in r]
    assert losses(sampled) == losses(plain)
