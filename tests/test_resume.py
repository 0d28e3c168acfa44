"""Exact resume and crash safety, through real processes killed with real signals.

The guarantee (CPU, float32): N steps straight == N steps with SIGKILLs at any moment after the
first checkpoint, each followed by --init_from=resume; the final weights are bit-identical.
"""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, metrics_records, run

import train
from gpt_residual import checkpoint, dataset, optim, runtime
from model import GPT

# dropout > 0 so the test fails if the RNG state were not restored exactly
ARGS = [
    "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4", "--dropout=0.1",
    "--eval_interval=50", "--eval_iters=2", "--log_interval=10", "--device=cpu", "--dtype=float32",
    "--compile=False", "--learning_rate=3e-3", "--warmup_iters=5",
]  # fmt: skip
MAX_ITERS = 240


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train.py", f"--data_dir={data}", f"--out_dir={out}", f"--max_iters={MAX_ITERS}", *ARGS, *extra]


def final_state(out: Path) -> dict:
    state = checkpoint.load(out / "ckpt.pt")
    assert state["step"] == MAX_ITERS
    return state


def assert_identical(a: dict, b: dict):
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), f"weights differ in {key}"
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for i in opt_a:
        for name in opt_a[i]:
            assert torch.equal(opt_a[i][name], opt_b[i][name]), f"optimizer state {i}.{name} differs"


@pytest.fixture(scope="module")
def straight(char_data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("straight")
    r = run(train_args(char_data, out))
    assert r.returncode == 0, r.stderr
    return final_state(out)


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def kill_after_checkpoint(proc: subprocess.Popen, out: Path, delay: float) -> bool:
    """SIGKILL proc `delay` seconds after a checkpoint newer than the current one appears."""
    before = (out / "ckpt.pt").stat().st_mtime_ns if (out / "ckpt.pt").exists() else 0
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "ckpt.pt").exists() and (out / "ckpt.pt").stat().st_mtime_ns != before:
            break
        time.sleep(0.005)
    time.sleep(delay)
    killed = proc.poll() is None
    proc.kill()
    proc.communicate()
    return killed


@pytest.mark.parametrize("interval,delays", [(7, [0.05, 0.3]), (1, [0.0, 0.02, 0.05, 0.11, 0.17, 0.23])])
def test_sigkill_then_resume_is_bit_identical(straight, char_data, tmp_path, interval, delays):
    """Kill -9 at several points (with checkpoint_interval=1, often in the middle of a save); every
    time the checkpoint on disk loads, and the resumed run ends bit-identical to the straight one."""
    out = tmp_path / "killed"
    extra = [f"--checkpoint_interval={interval}", "--keep_checkpoints=2"]
    proc = start(train_args(char_data, out, *extra))
    kills = 0
    for delay in delays:
        kills += kill_after_checkpoint(proc, out, delay)
        state = checkpoint.load(out / "ckpt.pt")  # never corrupt, whatever the moment of the kill
        assert 0 < state["step"] <= MAX_ITERS
        proc = start(train_args(char_data, out, *extra, "--init_from=resume"))
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert kills >= 2, "the runs finished before they could be killed; the test proves nothing"
    assert_identical(final_state(out), straight)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_and_exits_cleanly(straight, char_data, tmp_path, sig):
    out = tmp_path / "sig"
    proc = start(train_args(char_data, out, "--checkpoint_interval=1000"))
    for line in proc.stdout:  # wait until training is under way
        if line.startswith("step 20/"):
            break
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "--init_from=resume" in stdout
    state = checkpoint.load(out / "ckpt.pt")
    assert 20 <= state["step"] < MAX_ITERS
    r = run(train_args(char_data, out, "--init_from=resume"))
    assert r.returncode == 0, r.stderr
    assert_identical(final_state(out), straight)


def test_resume_may_change_schedule_but_not_shape(char_data, tmp_path):
    """The changed keys are printed and they apply: the checkpoint written afterwards holds them, the lr is the
    new schedule's, and config.json keeps the first run's config with the resume's changes appended."""
    out = tmp_path / "o"
    assert run(train_args(char_data, out, "--max_iters=20")).returncode == 0
    changes = ["--learning_rate=1e-3", "--min_lr=1e-4", "--weight_decay=0.5", "--beta1=0.8", "--beta2=0.9"]
    r = run(train_args(char_data, out, "--max_iters=30", *changes, "--init_from=resume"))
    assert r.returncode == 0, r.stderr
    for line in ("learning_rate = 0.001 (was 0.003)", "weight_decay = 0.5 (was 0.1)", "beta1 = 0.8 (was 0.9)"):
        assert f"config change on resume: {line}" in r.stdout
    saved = checkpoint.load(out / "ckpt.pt")
    assert saved["step"] == 30
    groups = saved["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0] and all(g["betas"] == (0.8, 0.9) for g in groups)
    cfg = train.config.parse_args(train.config.TrainConfig, train_args(char_data, out, "--max_iters=30", *changes)[1:])
    assert all(g["lr"] == pytest.approx(train.get_lr(29, cfg)) for g in groups)  # the new schedule's, at step 29
    record = json.loads((out / "config.json").read_text())
    assert record["max_iters"] == 20 and record["learning_rate"] == 3e-3  # the first run's config
    [resume] = record["resumes"]
    assert resume["step"] == 20 and resume["changed"]["weight_decay"] == [0.1, 0.5]
    assert resume["changed"]["max_iters"] == [20, 30]
    for bad in ("--n_embd=64", "--block_size=32", "--norm=rmsnorm", "--norm_position=post"):
        r = run(train_args(char_data, out, "--init_from=resume", bad))
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr.startswith("error: the checkpoint's model has") and r.stderr.count("\n") == 1, r.stderr


CHANGED = dict(learning_rate=1e-3, min_lr=1e-4, weight_decay=0.5, beta1=0.8, beta2=0.9, grad_clip=0.05, muon_lr=0.01,
               scalar_lr=0.2, warmup_iters=1)  # fmt: skip


@pytest.mark.parametrize("opt_name", ["adamw", "muon"])
def test_resume_applies_changed_optimizer_keys(tiny_cfg, opt_name):
    """After a resume with changed keys the param groups hold them, and the first resumed step equals that of a
    fresh optimizer built with those keys and given the checkpoint's weights and per-parameter state."""
    common = dict(optimizer=opt_name, residual_scalars=True, value_residual=True, eval_interval=100)
    train.train(tiny_cfg(max_iters=4, **common))
    cfg = tiny_cfg(max_iters=8, init_from="resume", **common, **CHANGED)
    rt = runtime.init_runtime("cpu", "float32")
    data = train.load_data(cfg, rt)
    saved = checkpoint.load(Path(cfg.out_dir) / "ckpt.pt")
    model_cfg, _ = train.resolve_model(cfg, data.meta, saved)
    resumed = train.build_state(cfg, rt, model_cfg, None, saved)
    adamw, *muon = resumed.optimizer.optimizers if opt_name == "muon" else [resumed.optimizer]
    decay, no_decay, *scalars = adamw.param_groups
    assert decay["weight_decay"] == 0.5 and no_decay["weight_decay"] == 0.0
    assert all(g["betas"] == (0.8, 0.9) for g in adamw.param_groups)
    want = sorted(0.2 * frac / 1e-3 for frac in optim.SCALAR_LR.values())
    assert sorted(g["lr_scale"] for g in scalars) == pytest.approx(want)
    assert all(g["weight_decay"] == 0 for g in scalars)
    if muon:
        [group] = muon[0].param_groups
        assert group["lr_scale"] == pytest.approx(0.01 / 1e-3) and group["weight_decay"] == 0.5

    model = GPT(model_cfg)
    model.load_state_dict(saved["model"])
    fresh = optim.build(model, 0.5, 1e-3, (0.8, 0.9), "cpu", opt_name, muon_lr=0.01, scalar_lr=0.2)
    for name, p in model.named_parameters():
        fresh.state[p] = {k: v.clone() for k, v in saved["optimizer"]["state"][name].items()}
    reference = train.TrainState(model, model, fresh, torch.amp.GradScaler("cpu", enabled=False), model)
    lr = train.get_lr(resumed.step, cfg)
    for state in (resumed, reference):
        train.train_step(state, dataset.micro_batches(data.train, resumed.samples_seen, 0, 1, "cpu"), lr, cfg, rt)
    got, want = resumed.raw_model.state_dict(), model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]


def test_keeps_last_k_and_best(tiny_cfg):
    """ckpt-best.pt is the step with the lowest val loss in metrics.jsonl, even after its step file is rotated out:
    20 good steps, then a resume at learning_rate=1 that makes every later val loss worse."""
    common = dict(checkpoint_interval=5, eval_interval=5, keep_checkpoints=2)
    cfg = tiny_cfg(max_iters=20, **common)
    train.train(cfg)
    result = train.train(tiny_cfg(max_iters=35, learning_rate=1.0, init_from="resume", **common))
    out = Path(cfg.out_dir)
    val = {r["step"]: r["val_loss"] for r in metrics_records(out) if "val_loss" in r}
    assert sorted(val) == [0, 5, 10, 15, 20, 25, 30, 35]
    best_step = min(val, key=val.get)
    assert best_step == 20, val  # the diverging resume is what makes best and latest differ
    steps = sorted(int(p.stem.split("-")[1]) for p in out.glob("ckpt-[0-9]*.pt"))
    assert steps == [30, 35]  # the last 2; ckpt-20.pt is gone, ckpt-best.pt keeps its step
    assert checkpoint.load(out / "ckpt.pt")["step"] == 35
    best = checkpoint.load(out / "ckpt-best.pt")
    assert best["step"] == best_step
    assert best["best_val_loss"] == pytest.approx(val[best_step])
    assert result["best_val_loss"] == pytest.approx(val[best_step])
    assert not list(out.glob(".ckpt*"))  # no temporary files left


def test_disk_full_keeps_previous_checkpoint(tiny_cfg, monkeypatch):
    cfg = tiny_cfg(max_iters=10, checkpoint_interval=5)
    train.train(cfg)
    out = Path(cfg.out_dir)
    before = (out / "ckpt.pt").read_bytes()

    def full_disk(obj, f):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(checkpoint.CheckpointError, match=r"no space left on the device.*ckpt.pt \(step 10 .*is intact"):
        train.train(tiny_cfg(max_iters=20, checkpoint_interval=5, init_from="resume"))
    assert (out / "ckpt.pt").read_bytes() == before
    assert checkpoint.load(out / "ckpt.pt")["step"] == 10
    assert not list(out.glob(".ckpt*"))


class Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_unsafe_pickle_is_refused_and_never_runs(tmp_path):
    sentinel = tmp_path / "pwned"
    out = tmp_path / "o"
    out.mkdir()
    torch.save({"model": {}, "model_config": {}, "x": Evil(sentinel)}, out / "ckpt.pt")
    with pytest.raises(checkpoint.CheckpointError, match="refusing to load"):
        checkpoint.load(out / "ckpt.pt")
    r = run(["sample.py", f"--out_dir={out}", "--device=cpu"])
    assert r.returncode == 2 and r.stderr.startswith("error: refusing to load") and "Traceback" not in r.stderr
    assert not sentinel.exists(), "the checkpoint's code ran"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_checkpoint_is_a_clear_error(tiny_cfg, damage):
    cfg = tiny_cfg(max_iters=5)
    train.train(cfg)
    path = Path(cfg.out_dir) / "ckpt.pt"
    data = path.read_bytes()
    path.unlink()  # ckpt.pt is a hard link: write a new file, not through the link
    blobs = {"truncate": [data[: len(data) // 2]], "empty": [b""]}
    blobs["garbage"] = [random.Random(seed).randbytes(4096) for seed in range(200)]  # each fails its own way
    for blob in blobs[damage]:
        path.write_bytes(blob)
        with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
            checkpoint.load(path)
    r = run(["train.py", f"--data_dir={cfg.data_dir}", f"--out_dir={cfg.out_dir}", "--init_from=resume", *ARGS])
    assert r.returncode == 2 and r.stderr.startswith("error: checkpoint") and "Traceback" not in r.stderr


def test_resume_without_checkpoint(char_data, tmp_path):
    r = run(train_args(char_data, tmp_path / "none", "--init_from=resume"))
    assert r.returncode == 2 and "no checkpoint at" in r.stderr and "Traceback" not in r.stderr
