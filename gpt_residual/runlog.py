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
import os
import subprocess
from pathlib import Path

from gpt_residual import files


class Logger:
    """Appends every logged dict to out_dir/metrics.jsonl and, if asked, sends it to wandb.
    A new run (fresh=True) moves an earlier run's file to metrics.prev.jsonl first; a resumed run
    appends, after cutting a partial last line (left by a run killed mid-write or stopped by a full disk). A record
    is one write of a whole line; a write that fails is cut back off (the file stays whole lines) and is one
    files.WriteError line. With wandb, run_id (the checkpoint's wandb_run_id) continues that W&B run instead of
    starting another; run_id is then the run's id, to keep in the checkpoint. Inactive (a no-op) on every rank but 0."""

    def __init__(self, out_dir: str, active: bool, wandb_config=None, project="", name="", fresh=False, run_id=None):
        self.active, self.wandb, self.run_id = active, None, None
        if active:
            self.path = path = Path(out_dir) / "metrics.jsonl"
            if fresh and path.exists() and path.stat().st_size:
                path.replace(path.with_name("metrics.prev.jsonl"))
            with files.writing(path, "metrics.jsonl"):
                self.file = open(path, "a+b", buffering=0)  # unbuffered: nothing is left to flush when a write fails
                if cut := cut_partial_line(self.file):
                    print(f"{path}: cut a partial last line ({cut} bytes) left by a run that stopped mid-write")
            if wandb_config is not None:
                import wandb

                again = dict(id=run_id, resume="allow") if run_id else {}  # "allow": also if the run was never synced
                self.wandb = wandb.init(project=project, name=name or Path(out_dir).name, config=wandb_config, **again)
                self.run_id = getattr(self.wandb, "id", None)

    def log(self, record: dict):
        if self.active:
            line = memoryview((json.dumps(record) + "\n").encode())
            end = os.fstat(self.file.fileno()).st_size
            try:
                while line:
                    line = line[self.file.write(line) :]
            except OSError as e:
                try:
                    self.file.truncate(end)  # no partial record: the next one starts on a line of its own
                except OSError:
                    pass
                raise files.failure(e, self.path, "metrics.jsonl", after="it keeps every earlier record") from None
            if self.wandb is not None:
                flat = flatten(record)
                self.wandb.log({k: v for k, v in flat.items() if k != "step"}, step=record["step"])

    def close(self):
        if self.active:
            self.file.close()
            if self.wandb is not None:
                self.wandb.finish()


def cut_partial_line(f) -> int:
    """Truncate an append-mode file after its last newline; returns the bytes cut (0: it ended in one)."""
    fd = f.fileno()
    end = size = os.fstat(fd).st_size
    while end > 0:
        start = max(0, end - 4096)
        block = os.pread(fd, end - start, start)
        if start + len(block) == size and block.endswith(b"\n"):
            return 0
        if (i := block.rfind(b"\n")) >= 0:
            end = start + i + 1
            break
        end = start
    f.truncate(end)
    return size - end


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
    killed mid-write, is skipped, and so is a partial line with a record glued to it (as runs resumed by older
    versions left them: the record is read); a missing file or a line that is not a record is a one-line
    ValueError."""
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
        record = parse(line)
        if record is None and (glued := line.rfind('{"step"', 1)) > 0:  # an older version's resume appended a
            record = parse(line[glued:])  # record to a partial line: the record is whole, the partial one lost
        if record is None and n < len(lines):  # a partial last line is skipped
            raise ValueError(f"'{path}' line {n} is not a metrics record; is it train.py's metrics.jsonl?")
        if record is not None:
            records.append(record)
    return records


def parse(line: str) -> dict | None:
    """A metrics record, or None when line is not one."""
    try:
        record = json.loads(line)
        record["step"] = int(record["step"])
    except (ValueError, KeyError, TypeError):
        return None
    return record


def git_commit() -> str | None:
    """The commit this code is at, for provenance (None outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
