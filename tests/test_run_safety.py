"""Never lose a run, stop when asked, a sensible default: out_dir guards, resume checks, prompt stops.

Each test here fails if its guarantee is removed: a scratch run over an existing one, a resume that
changes the dataset, the checkpoint format or the batch shape, a signal during a long evaluation or
the first compile, the defaults, the compact config print, and no per-step host sync in the loop.
"""

import dataclasses
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, assert_one_line_error, metrics_records, needs_muon, run

import train
from gpt_residual import checkpoint, config, console, dataset, runtime

ARGS = [
    "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4", "--device=cpu",
    "--dtype=float32", "--compile=False", "--eval_iters=2", "--log_interval=5", "--learning_rate=3e-3",
    "--min_lr=3e-4", "--bias=True", "--beta2=0.95", "--lr_decay_iters=0",
]  # fmt: skip  (conftest.TINY as flags)


def cli(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train.py", f"--data_dir={data}", f"--out_dir={out}", *ARGS, *extra]


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def wait_for(proc: subprocess.Popen, text: str, timeout: float = 120) -> list[str]:
    """Read proc's stdout until a line contains text; returns the lines read."""
    lines, deadline = [], time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if text in line or time.time() > deadline:
            break
    assert text in lines[-1], "".join(lines)
    return lines


# ----------------------------------------------------------------------------- never lose a run


def test_a_new_run_refuses_an_out_dir_that_holds_a_run(tiny_cfg, char_data, tmp_path):
    cfg = tiny_cfg(max_iters=10, checkpoint_interval=5)
    train.train(cfg)
    out = Path(cfg.out_dir)
    before = snapshot(out)
    proc = run(cli(char_data, out, "--max_iters=6"))
    assert_one_line_error(proc, "already holds a run", "step 10", "shakespeare_char", "--init_from=resume",
                          "--out_dir", "--overwrite=True")  # fmt: skip
    assert snapshot(out) == before  # every file byte-identical: checkpoints, metrics.jsonl, config.json
    with pytest.raises(config.ConfigError):  # fine-tuning or any new run alike
        train.train(tiny_cfg(max_iters=4))
    assert snapshot(out) == before


def test_overwrite_replaces_the_old_run_and_prunes_only_the_new_one(tiny_cfg):
    out = Path(tiny_cfg().out_dir)
    train.train(tiny_cfg(max_iters=20, checkpoint_interval=5, eval_interval=100))
    assert {p.name for p in out.glob("ckpt-[0-9]*.pt")} == {"ckpt-0000015.pt", "ckpt-0000020.pt"}
    train.train(tiny_cfg(max_iters=10, checkpoint_interval=5, eval_interval=100, overwrite=True))
    # the new run's newest two step files are kept; none of the old run's survive to be taken for it
    assert {p.name for p in out.glob("ckpt-[0-9]*.pt")} == {"ckpt-0000005.pt", "ckpt-0000010.pt"}
    assert checkpoint.load(out / "ckpt.pt")["step"] == 10
    assert checkpoint.load(out / "ckpt-best.pt")["step"] == 10


def test_keep_last_k_never_prunes_later_steps(tmp_path):
    """Resuming from an earlier step file (copied to ckpt.pt) must not delete the run's later files,
    nor prune the step it just wrote in their favour."""
    for step in (10, 20, 30):
        checkpoint.save({"step": step}, tmp_path / f"ckpt-{step:07d}.pt")
    checkpoint.save_run({"step": 15}, tmp_path, keep=2, is_best=False)
    assert sorted(p.name for p in tmp_path.glob("ckpt-[0-9]*.pt")) == [
        "ckpt-0000010.pt", "ckpt-0000015.pt", "ckpt-0000020.pt", "ckpt-0000030.pt"
    ]  # fmt: skip
    checkpoint.save_run({"step": 16}, tmp_path, keep=2, is_best=False)
    assert sorted(p.name for p in tmp_path.glob("ckpt-[0-9]*.pt"))[:2] == ["ckpt-0000015.pt", "ckpt-0000016.pt"]


def test_resume_refuses_a_newer_checkpoint_format(tiny_cfg, char_data):
    cfg = tiny_cfg(max_iters=5)
    train.train(cfg)
    path = Path(cfg.out_dir) / "ckpt.pt"
    state = checkpoint.load(path)
    state["version"] = checkpoint.FORMAT_VERSION + 1
    torch.save(state, path)
    proc = run(cli(char_data, Path(cfg.out_dir), "--init_from=resume", "--max_iters=10"))
    assert_one_line_error(proc, "format", "newer version")


def test_resume_refuses_another_dataset(tiny_cfg, char_data):
    cfg = tiny_cfg(max_iters=5)
    train.train(cfg)
    proc = run(cli(char_data, Path(cfg.out_dir), "--init_from=resume", "--max_iters=10", "--dataset=mine"))
    assert_one_line_error(proc, "dataset 'shakespeare_char'", "'mine'", "--dataset=shakespeare_char")


@needs_muon
def test_resume_refuses_another_optimizer(tiny_cfg, char_data):
    cfg = tiny_cfg(max_iters=5)
    train.train(cfg)
    proc = run(cli(char_data, Path(cfg.out_dir), "--init_from=resume", "--max_iters=10", "--optimizer=muon"))
    assert_one_line_error(proc, "optimizer='adamw'", "--optimizer=adamw")


def record_reads(monkeypatch) -> list[int]:
    """The first sample of every training micro-batch read (the training sampler's seed only)."""
    reads, real = [], dataset.BatchSampler.read

    def read(self, first, *args, **kwargs):
        if self.seed == config.TrainConfig.seed:
            reads.append((first, self.B))
        return real(self, first, *args, **kwargs)

    monkeypatch.setattr(dataset.BatchSampler, "read", read)
    return reads


@pytest.mark.parametrize("change", [dict(batch_size=8), dict(batch_size=2, gradient_accumulation_steps=3)])
def test_resume_with_another_batch_shape_goes_on_from_the_same_sample(tiny_cfg, monkeypatch, capsys, change):
    reads = record_reads(monkeypatch)
    train.train(tiny_cfg(max_iters=6, eval_interval=100))
    assert checkpoint.load(Path(tiny_cfg().out_dir) / "ckpt.pt")["data"]["samples_seen"] == 24
    capsys.readouterr()
    train.train(tiny_cfg(max_iters=10, eval_interval=100, init_from="resume", **change))
    assert "batch shape changed" in capsys.readouterr().out
    samples = [k for first, b in reads for k in range(first, first + b)]
    assert samples == list(range(len(samples)))  # no sample read twice, none skipped
    per_step = change["batch_size"] * change.get("gradient_accumulation_steps", 1)
    assert len(samples) == 24 + 4 * per_step
    state = checkpoint.load(Path(tiny_cfg().out_dir) / "ckpt.pt")
    assert state["data"]["samples_seen"] == len(samples)


def test_ranks_read_on_from_the_same_sample_after_a_change_of_world_size(char_data):
    """Resuming a 1-process run under 2 processes: together the ranks read the samples that follow."""
    meta = dataset.read_meta(char_data)
    sampler = dataset.BatchSampler(dataset.load_tokens(char_data, "train", meta), 16, 4, 1)
    first = 24  # samples_seen of the checkpoint
    per_rank = [dataset.micro_batches(sampler, first, r, 2, "cpu") for r in range(2)]
    seen = []
    for _ in range(3):  # three micro-steps of each rank
        for r in range(2):
            x, _ = next(per_rank[r])
            seen.append(x)
    want = [sampler.get(g, "cpu")[0] for g in range(first // 4, first // 4 + 6)]
    assert all(torch.equal(a, b) for a, b in zip(seen, want, strict=True))


def test_prefetching_thread_gives_the_same_batches(char_data):
    meta = dataset.read_meta(char_data)
    sampler = dataset.BatchSampler(dataset.load_tokens(char_data, "train", meta), 16, 4, 1)
    plain, ahead = dataset.micro_batches(sampler, 8, 1, 2, "cpu"), dataset.micro_batches(sampler, 8, 1, 2, "cpu", 3)
    for _ in range(20):
        (x, y), (x2, y2) = next(plain), next(ahead)
        assert torch.equal(x, x2) and torch.equal(y, y2) and x2.dtype == torch.long

    def broken():
        yield 1
        raise dataset.DataError("disk gone")

    got = dataset.prefetch(broken(), 2)
    assert next(got) == 1
    with pytest.raises(dataset.DataError, match="disk gone"):
        next(got)


# ----------------------------------------------------------------------------- stop when asked


def test_sigterm_during_a_long_evaluation_stops_within_seconds_and_saves(tiny_cfg, char_data):
    cfg = tiny_cfg(max_iters=10, eval_interval=10, checkpoint_interval=0)
    train.train(cfg)
    out = Path(cfg.out_dir)
    # resumed at step 10; at step 15 an evaluation of the whole train split begins (~15,000 batches)
    args = cli(char_data, out, "--init_from=resume", "--max_iters=40", "--eval_interval=15", "--eval_iters=200000",
               "--log_interval=1", "--checkpoint_interval=0")  # fmt: skip
    proc = start(args)
    wait_for(proc, "estimating the loss")
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert time.time() - t0 < 15, "the evaluation was not abandoned"
    assert proc.returncode == 0, stderr
    assert checkpoint.load(out / "ckpt.pt")["step"] == 15  # the last completed step
    last = stdout.strip().splitlines()
    assert last[-2].startswith("stopped by SIGTERM at step 15:"), last[-2]
    loss15 = next(r["loss"] for r in metrics_records(out) if r.get("loss") is not None and r["step"] == 15)
    assert f"train loss {loss15:.4f}" in last[-2] and "val loss" in last[-2] and "(step 10)" in last[-2]
    assert last[-1].startswith("resume with: python train.py") and last[-1].endswith("--init_from=resume")


def test_sigterm_during_the_first_compile_stops_at_once(char_data, tmp_path):
    proc = start(cli(char_data, tmp_path / "out", "--compile=True", "--max_iters=5"))
    wait_for(proc, "compiling the model")
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert time.time() - t0 < 15 and proc.returncode == 0, stderr
    assert "stopped by SIGTERM before training began" in stdout
    assert not list((tmp_path / "out").glob("ckpt*.pt"))


def test_sigterm_during_data_preparation_stops_at_once(tiny_cfg, monkeypatch):
    monkeypatch.setattr(dataset, "ensure_prepared", lambda *args: time.sleep(30))  # a long download, say
    threading.Timer(0.5, os.kill, [os.getpid(), signal.SIGTERM]).start()
    t0 = time.time()
    result = train.train(tiny_cfg())
    assert time.time() - t0 < 10 and result["interrupted"] == "SIGTERM"
    assert not list(Path(tiny_cfg().out_dir).glob("ckpt*.pt"))


def test_a_signal_interrupts_a_phase_marked_interruptible():
    stop = runtime.GracefulStop(runtime.Runtime(0, 0, 1, "cpu", torch.float32, False))
    try:
        with pytest.raises(runtime.Interrupted):
            with stop.interruptible():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # a long phase: the signal must cut it short
        assert stop.requested == "SIGTERM" and stop.agreed()
        with pytest.raises(runtime.Interrupted):  # a phase entered after the request does not start
            with stop.interruptible():
                pass
    finally:
        stop.restore()


def test_compile_is_announced_timed_and_not_counted_as_evaluation(tiny_cfg, monkeypatch, capsys):
    calls = []

    def slow_compile(fn, **kwargs):  # stands in for torch.compile: the first call is the slow one
        def run(*args, **kw):
            if not calls:
                time.sleep(1.0)
            calls.append(1)
            return fn(*args, **kw)

        if isinstance(fn, torch.nn.Module):  # compile_scope="model"; "blocks" compiles methods
            run.train, run.eval = fn.train, fn.eval
        return run

    monkeypatch.setattr(torch, "compile", slow_compile)
    for scope in ("blocks", "model"):
        calls.clear()
        result = train.train(tiny_cfg(compile=True, compile_scope=scope, max_iters=4, overwrite=True))
        out = capsys.readouterr().out
        assert "compiling the model" in out and "compiled in 1." in out
        assert result["compile_time"] >= 1.0 and result["eval_time"] < 0.5
        assert out.index("compiled in") < out.index("estimating the loss")


# ----------------------------------------------------------------------------- a sensible default


def test_the_defaults_are_the_small_model():
    """Every key but lr_decay_iters: its default follows max_iters; small.py fixes its cosine's floor at 1000."""
    small = config.parse_args(config.TrainConfig, ["configs/small.py"])
    assert small == dataclasses.replace(config.TrainConfig(), lr_decay_iters=1000) and small.lr_decay_iters == 1000


def test_the_config_is_printed_compactly(tiny_cfg, capsys):
    cfg = tiny_cfg(max_iters=2)
    train.train(cfg)
    out = capsys.readouterr().out
    head = out[: out.index("model:")]
    assert len(head.splitlines()) <= 6 and "config.json" in head and "n_embd=32" in head
    assert "'norm'" not in head and "norm_position" not in head  # keys at their defaults are not listed
    # then where start-up went, in the line after the model's (before a compile or the first estimate)
    setup = r"^model: .*\n(lr: .*\n)?set up in [0-9.]+s \(device [0-9.]+s, data [0-9.]+s, model\+optimizer [0-9.]+s\)\n"
    assert re.search(setup, out, re.M), out
    written = json.loads((Path(cfg.out_dir) / "config.json").read_text())
    assert {k: v for k, v in config.to_dict(cfg).items() if k != "vocab_size"}.items() <= written.items()


def test_no_host_sync_between_log_steps(tiny_cfg, monkeypatch):
    """Reading a tensor back (item, tolist, bool, float) from train.py's own code happens at log,
    eval and checkpoint time only, never once per step."""
    counts = {"n": 0}
    ours = {str(ROOT / f) for f in ("train.py", "gpt_residual/console.py", "gpt_residual/runtime.py",
                                    "gpt_residual/dataset.py")}  # fmt: skip
    for name in ("item", "tolist", "__bool__", "__float__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **k):
            if sys._getframe(1).f_code.co_filename in ours:
                counts["n"] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    train.train(tiny_cfg(max_iters=60, log_interval=30, eval_interval=1000, checkpoint_interval=0))
    # 2 evaluations x 2 splits, 2 log lines x (loss, grad norm, health), the health check before the save
    assert counts["n"] <= 12, counts


def test_an_empty_val_split_is_a_one_line_error(char_data, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.bin", "meta.json"):
        (data / name).write_bytes((char_data / name).read_bytes())
    (data / "val.bin").write_bytes(b"")  # e.g. a text too short for a val split
    proc = run(["train.py", f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}", *ARGS, "--max_iters=2"])
    assert_one_line_error(proc, "val split has 0 tokens", "block_size")


def test_the_meter_divides_by_the_steps_since_the_last_line(monkeypatch):
    clock = iter([100.0, 101.0, 103.0])  # created at 100 s; 10 steps by 101 s; 5 more by 103 s
    monkeypatch.setattr(console.time, "perf_counter", lambda: next(clock))
    meter = console.Meter(runtime.Runtime(0, 0, 1, "cpu", torch.float32, False), 1000, first_step=20)
    assert meter.lap(30) == (pytest.approx(100.0), pytest.approx(10_000))  # 1 s / 10 steps; 1000 tokens each
    assert meter.lap(35)[0] == pytest.approx(400.0)


@pytest.mark.parametrize(
    "env,want",
    [
        ({}, "python train.py"),
        ({"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "4", "GROUP_WORLD_SIZE": "1"},
         "torchrun --standalone --nproc_per_node=4 train.py"),
        ({"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "8", "WORLD_SIZE": "16", "GROUP_WORLD_SIZE": "2"},
         "torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT train.py"),
    ],
    ids=["python", "torchrun", "torchrun-2-nodes"],
)  # fmt: skip
def test_resume_hint_gives_the_launcher_that_was_used(env, want):
    """The last line of a stopped run resumes it the way it was started: python, or torchrun with its process counts."""
    from gpt_residual import console

    argv = ["configs/small.py", "--max_iters=9", "--init_from=scratch", "--overwrite=True"]
    hint = console.resume_command(config.TrainConfig(), argv, env)
    assert hint.startswith(f"{want} configs/small.py --max_iters=9 --init_from=resume"), hint
    assert ("on every node" in hint) == ("GROUP_WORLD_SIZE" in env and env["GROUP_WORLD_SIZE"] != "1")
