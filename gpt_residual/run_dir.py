"""The run's folder: an out_dir holds one run, and a new run never replaces another's checkpoints unasked
(prepare_out_dir); a resumed run keeps the model, optimizer and dataset its checkpoint was trained with
(check_resume), and what each resume changed is said (report_changes). What a checkpoint carries from run to
run (carried: where the weights came from, the W&B run) is decided here. The files are written and read by
checkpoint.py.
"""

from pathlib import Path

from gpt_residual import config, pretrained
from gpt_residual.checkpoint import CheckpointError, describe, remove_stale_temps, step_files


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


def prepare_out_dir(cfg: config.TrainConfig, rt):
    """out_dir must be writable, and a new run never replaces the checkpoints of another one unasked."""
    out_dir = Path(cfg.out_dir)
    found = existing_run(out_dir) if cfg.init_from != "resume" else None
    if found and not cfg.overwrite:
        raise config.ConfigError(
            f"out_dir '{out_dir}' already holds a run ({describe(found)}); continue it with "
            "--init_from=resume, choose another --out_dir, or pass --overwrite=True to replace it"
        )
    if not rt.master:
        return
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / ".write_test").touch()
        (out_dir / ".write_test").unlink()
        remove_stale_temps(out_dir)
    except OSError as e:
        msg = f"cannot write to out_dir '{out_dir}' ({e.strerror}); choose another out_dir"
        raise config.ConfigError(msg) from None
    if found:
        rt.print(f"--overwrite=True: deleting the checkpoints of the run in {out_dir} ({describe(found)})")
        remove_run(out_dir)


def check_resume(cfg: config.TrainConfig, saved: dict):
    """A resumed run keeps its model and its dataset; the schedule, batch and the like may change."""
    fine_tuned = weights_from(cfg, saved) not in ("scratch", "resume")
    for key, old in saved["model_config"].items():
        if key in ("dropout", "vocab_size", "activation_checkpointing"):  # not the model's shape
            continue
        if fine_tuned and key in pretrained.SHAPE_KEYS:
            continue  # a fine-tuned model's shape is GPT-2's, whatever the config says
        new = getattr(cfg, key, old)
        if new != old:
            raise CheckpointError(
                f"the checkpoint's model has {key}={old!r} but the config says {new!r}; "
                f"use --{key}={old!r} to resume, or a new out_dir to start over"
            )
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
