"""The run's folder: an out_dir holds one run, written by one run at a time (its lock), a new run never replaces
another's checkpoints unasked, and init_from="auto" resumes the run there or starts one (prepare_out_dir); a resumed
run keeps the model, optimizer and dataset its checkpoint was trained with (check_resume), and what each resume
changed is said (report_changes). What a checkpoint carries from run to run (carried: where the weights came from,
the W&B run) is decided here. The files are written and read by checkpoint.py.
"""

import fcntl
import json
import os
import shlex
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import IO

from gpt_residual import config, console, pretrained, runtime, tokens
from gpt_residual.checkpoint import CheckpointError, describe, remove_stale_temps, step_files

LOCK = ".lock"  # out_dir's lock file: held by the run writing there; says which run that is
NOT_WRITTEN = "its details are not written yet"  # what a refusal says of a holder with no record


def existing_run(out_dir: Path) -> Path | None:
    """The checkpoint that says out_dir already holds a run (ckpt.pt, else any step file), or None."""
    out_dir = Path(out_dir)
    latest = out_dir / "ckpt.pt"
    if latest.exists():
        return latest
    files = step_files(out_dir)
    return files[-1] if files else (out_dir / "ckpt-best.pt" if (out_dir / "ckpt-best.pt").exists() else None)


def remove_run(out_dir: Path):
    """Delete a run's checkpoints (only when the user opted in to replace it)."""
    for f in [*step_files(out_dir), Path(out_dir) / "ckpt.pt", Path(out_dir) / "ckpt-best.pt"]:
        f.unlink(missing_ok=True)


def prepare_out_dir(cfg: config.TrainConfig, rt) -> tuple[config.TrainConfig, IO | None]:
    """Rank 0 takes out_dir's lock (lock_out_dir), checks that it may write there and that a new run replaces no
    other run unasked, and resolves init_from="auto" (claim_out_dir). Every rank gets the outcome from rank 0, so a
    refusal is raised by every rank together. Returns the config with init_from resolved, and the lock (rank 0's;
    None elsewhere) to hold until the run ends."""
    lock, outcome = None, None
    if rt.master:
        try:
            lock = lock_out_dir(Path(cfg.out_dir))
            outcome = ("ok", claim_out_dir(cfg, rt))
        except config.ConfigError as e:
            outcome = ("error", str(e))
            if lock:
                lock.close()
    kind, value = runtime.from_rank0(rt, outcome)
    if kind == "error":
        raise config.ConfigError(value)
    return replace(cfg, init_from=value), lock


def claim_out_dir(cfg: config.TrainConfig, rt) -> str:
    """On rank 0, holding the lock: the init_from to run ("auto": "resume" when out_dir holds ckpt.pt, else
    "scratch"); a new run into an out_dir that holds a run is refused, unless overwrite (its checkpoints deleted)."""
    out_dir, init_from = Path(cfg.out_dir), cfg.init_from
    if init_from == "auto":
        init_from = "resume" if (out_dir / "ckpt.pt").is_file() else "scratch"
        rt.print(f"init_from=auto: {'resuming the run in' if init_from == 'resume' else 'a new run in'} {out_dir}")
    found = existing_run(out_dir) if init_from != "resume" else None
    if found and not cfg.overwrite:
        ways = "--init_from=resume" if cfg.init_from != "auto" else "a copy of its newest step file as ckpt.pt"
        raise config.ConfigError(
            f"out_dir '{out_dir}' already holds a run ({describe(found)}); continue it with "
            f"{ways}, choose another --out_dir, or pass --overwrite=True to replace it"
        )
    try:
        (out_dir / ".write_test").touch()
        (out_dir / ".write_test").unlink()
        remove_stale_temps(out_dir)
    except OSError as e:
        raise cannot_write(out_dir, e) from None
    if found:
        rt.print(f"--overwrite=True: deleting the checkpoints of the run in {out_dir} ({describe(found)})")
        remove_run(out_dir)
    return init_from


def lock_out_dir(out_dir: Path) -> IO:
    """Create out_dir, take its lock (an exclusive flock on out_dir/.lock) and write into the lock file who holds
    it: pid, host, start time and command. The lock lasts as long as the returned file is open or the process lives:
    the OS releases it when the process ends, however it ends, so a killed run leaves no stale lock. Another run that
    holds it is named in a one-line refusal. A filesystem without locks (Lustre mounted without -o flock) gets a
    note and no lock. Across nodes the lock needs a filesystem that shares locks between hosts (NFSv4 does)."""
    path = out_dir / LOCK
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")
    except OSError as e:
        raise cannot_write(out_dir, e) from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = read_holder(f)
        f.close()
        raise config.ConfigError(
            f"out_dir '{out_dir}' is in use by another run ({holder}); wait for it to end or stop it, "
            "or choose another --out_dir"
        ) from None
    except OSError as e:  # ENOLCK, EOPNOTSUPP, ENOSYS: this filesystem has no locks
        print(f"note: cannot lock out_dir '{out_dir}' ({e.strerror}): nothing stops a second run from writing there")
        return f
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    command = shlex.join([*console.launcher(os.environ)[0], *sys.argv])  # python or torchrun, then train.py ...
    try:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": started, "command": command}
        os.ftruncate(f.fileno(), 0)  # written through the descriptor: nothing is left in a buffer to flush at close
        os.write(f.fileno(), json.dumps(record).encode())
    except OSError:  # a full disk: the lock holds without its record; the run's first real write says what to free
        pass
    return f


def cannot_write(out_dir: Path, e: OSError) -> config.ConfigError:
    return config.ConfigError(f"cannot write to out_dir '{out_dir}' ({e.strerror}); choose another out_dir")


def read_holder(f: IO, wait_s: float = 2.0) -> str:
    """Who holds the lock, from its lock file. A run that has just taken the lock writes its record a moment later:
    a record not written yet is read again for up to wait_s (a holder on a full disk never writes one)."""
    deadline = time.monotonic() + wait_s
    while True:
        f.seek(0)
        holder = holder_text(f.read())
        if holder != NOT_WRITTEN or time.monotonic() > deadline:
            return holder
        time.sleep(0.05)


def holder_text(record: str) -> str:
    """The lock file's record as "pid 123 on host h since <time>: <command>"."""
    try:
        r = json.loads(record)
        return f"pid {r['pid']} on {r['host']} since {r['started']}: {r['command']}"
    except (ValueError, KeyError, TypeError):  # the holder has not written it yet
        return NOT_WRITTEN


def check_resume(cfg: config.TrainConfig, saved: dict, meta: dict | None = None):
    """A resumed run keeps its model, its tokenizer (meta: the dataset's meta.json it would train on) and its
    dataset; the schedule, batch and the like may change."""
    fine_tuned = weights_from(cfg, saved) not in ("scratch", "resume")
    for key, old in saved["model_config"].items():
        if key in ("dropout", "vocab_size", "activation_checkpointing"):  # not the model's shape
            continue
        if fine_tuned and key in pretrained.SHAPE_KEYS and key != "block_size":
            continue  # a fine-tuned model's shape is GPT-2's, whatever the config says; its context is the run's
        new = getattr(cfg, key, old)
        if new != old:
            raise CheckpointError(
                f"the checkpoint's model has {key}={old!r} but the config says {new!r}; "
                f"use --{key}={old!r} to resume, or a new out_dir to start over"
            )
    if meta is not None:
        check_same_vocabulary(cfg, saved, meta)
    old = saved["config"].get("optimizer", "adamw")
    if old != getattr(cfg, "optimizer", "adamw"):
        raise CheckpointError(
            f"the checkpoint was trained with optimizer={old!r}, whose state does not fit {cfg.optimizer!r}; "
            f"use --optimizer={old} to resume, or a new out_dir to start over"
        )
    old = saved.get("data", {}).get("dataset", cfg.dataset)
    if old != cfg.dataset:
        raise CheckpointError(
            f"the checkpoint was trained on dataset '{old}' but the config says '{cfg.dataset}'; use "
            f"--dataset={old} to resume, or --init_from=scratch with a new out_dir for '{cfg.dataset}'"
        )


def check_same_vocabulary(cfg: config.TrainConfig, saved: dict, meta: dict):
    """The token ids the run would read mean what they meant to the checkpoint's model (another data_dir of the
    same dataset name can hold another vocabulary)."""
    trained = json.loads(saved["tokenizer"]) if saved.get("tokenizer") else None
    if trained is None or tokens.vocabulary(trained) == tokens.vocabulary(meta):
        return
    was, now = tokens.describe_vocabulary(trained), tokens.describe_vocabulary(meta)
    if was == now:
        now = f"another {now.removeprefix('a ').removeprefix('the ')}"
    where = tokens.dataset_dir(cfg.dataset, cfg.data_dir)
    old_dir = saved["config"].get("data_dir") or ""
    use = f"--data_dir={old_dir}" if old_dir else f"the dataset's own folder ({tokens.dataset_dir(cfg.dataset)})"
    raise CheckpointError(
        f"the checkpoint was trained on {was}, but {where}/meta.json has {now}: its token ids mean other things to "
        f"this model; resume with {use}, or start a new out_dir"
    )


def weights_from(cfg: config.TrainConfig, saved: dict | None) -> str:
    """Where the run's weights came from: "scratch", a GPT-2 name or a Hugging Face folder. Every checkpoint
    holds it and a resume carries it on, so a fine-tuned run stays one however often it is resumed (a checkpoint
    older than this field has only its config's init_from, which a resume overwrote with "resume")."""
    if saved is None:
        return cfg.init_from
    return saved.get("weights_from", saved["config"].get("init_from", "scratch"))


def carried(cfg: config.TrainConfig, saved: dict | None) -> dict:
    """The fields every checkpoint of a run holds and a resume carries on: weights_from, wandb_run_id (the
    W&B run that a resume with wandb_log=True continues; None until one is started) and command (the command line
    of the run's first start, console.start_command; train.train sets it on a fresh start)."""
    keep = saved or {}
    return {"weights_from": weights_from(cfg, saved), "wandb_run_id": keep.get("wandb_run_id"),
            "command": keep.get("command")}  # fmt: skip


def report_changes(cfg: config.TrainConfig, saved: dict, rt, samples_seen: int) -> dict:
    """Print how a resume differs from the checkpoint's run (batch shape, keys) and return the keys it
    changes, {key: [was, now]}, for config.json. The model's shape cannot change (check_resume)."""
    old = saved["config"]
    shape = lambda c, w: f"{c['batch_size']} x {c['gradient_accumulation_steps']} micro-steps x {w} process(es)"
    before, now = shape(old, len(saved["rng"])), shape(config.to_dict(cfg), rt.world_size)
    if before != now:
        rt.print(f"  batch shape changed: {before} -> {now}; reading on from sample {samples_seen:,}")
    model_keys = set(saved["model_config"]) - {"dropout"}
    changes = {}
    for k, v in old.items():
        if k not in model_keys | {"init_from"} and hasattr(cfg, k) and getattr(cfg, k) != v:
            rt.print(f"  config change on resume: {k} = {getattr(cfg, k)!r} (was {v!r})")
            changes[k] = [v, getattr(cfg, k)]
    return changes
