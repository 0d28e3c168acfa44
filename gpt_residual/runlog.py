"""A run's record: out_dir/metrics.jsonl (one JSON object per line), optionally mirrored to wandb, and its reader.

Records written by train.py, each with "step":
    train      loss, lr, grad_norm, ms_per_step, tokens_per_sec, mfu, time
    eval       train_loss, val_loss (nats per token), train_bpb, val_bpb (bits per byte: the summed loss in bits
               over the targets' UTF-8 bytes, end-of-text out of both), time, eval_time
    sample     sample (sample_interval > 0: the text generated after sample_prompt at that eval step)
    telemetry  grad_attn, grad_mlp, update_attn, update_mlp, rms, attn_logit_max, and with the switches
               resid_a, resid_b, v_lambda (lists, one entry per layer)
    probe      probe_init: true, loss, grad_attn, grad_mlp, rms (statistics at initialisation)
"""

import json
import subprocess
from pathlib import Path


class Logger:
    """Appends every logged dict to out_dir/metrics.jsonl and, if asked, sends it to wandb.
    A new run (fresh=True) moves an earlier run's file to metrics.prev.jsonl first; a resumed run
    appends. With wandb, run_id (the checkpoint's wandb_run_id) continues that W&B run instead of starting
    another; run_id is then the run's id, to keep in the checkpoint. Inactive (a no-op) on every rank but 0."""

    def __init__(self, out_dir: str, active: bool, wandb_config=None, project="", name="", fresh=False, run_id=None):
        self.active, self.wandb, self.run_id = active, None, None
        if active:
            path = Path(out_dir) / "metrics.jsonl"
            if fresh and path.exists() and path.stat().st_size:
                path.replace(path.with_name("metrics.prev.jsonl"))
            self.file = open(path, "a")
            if wandb_config is not None:
                import wandb

                again = dict(id=run_id, resume="allow") if run_id else {}  # "allow": also if the run was never synced
                self.wandb = wandb.init(project=project, name=name or Path(out_dir).name, config=wandb_config, **again)
                self.run_id = getattr(self.wandb, "id", None)

    def log(self, record: dict):
        if self.active:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            if self.wandb is not None:
                flat = flatten(record)
                self.wandb.log({k: v for k, v in flat.items() if k != "step"}, step=record["step"])

    def close(self):
        if self.active:
            self.file.close()
            if self.wandb is not None:
                self.wandb.finish()


def flatten(record: dict) -> dict:
    """{"grad_attn": [a, b]} -> {"telemetry/grad_attn/L0": a, ...}: scalars for wandb's charts."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, list):
            flat.update({f"telemetry/{key}/L{i}": v for i, v in enumerate(value)})
        else:
            flat[key] = value
    return flat


def read(out_dir: str) -> list[dict]:
    """Every record of a run, in order ([] if it logged nothing yet). A partial last line, left by a run
    killed mid-write, is skipped; a missing file or a line that is not a record is a one-line ValueError."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        where = "" if Path(out_dir).is_dir() else " (no such folder)"
        raise ValueError(f"'{path}' not found{where}; give the out_dir of a training run")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read '{path}': {e}") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record["step"] = int(record["step"])
        except (ValueError, KeyError, TypeError):
            if n == len(lines):
                continue  # a partial last line
            raise ValueError(f"'{path}' line {n} is not a metrics record; is it train.py's metrics.jsonl?") from None
        records.append(record)
    return records


def git_commit() -> str | None:
    """The commit this code is at, for provenance (None outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
