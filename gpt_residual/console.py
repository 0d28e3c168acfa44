"""What train.py prints and logs as it goes: where start-up went, the speed between log lines (Meter), the
losses kept on the device between log lines (RecentLoss), the resolved config (config.json), the eval and step
lines, and the last line: how the run ended, and how to resume it if it was stopped.
"""

import json
import os
import shlex
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from gpt_residual import config, files, runtime
from gpt_residual.errors import USER_ERRORS
from gpt_residual.runlog import git_commit


class Laps:
    """Seconds spent in each named phase of start-up, for one line: "set up in 2.1s (device 1.2s, ...)"."""

    def __init__(self):
        self.t, self.phases = time.perf_counter(), []

    def __call__(self, name: str):
        """The phase called name ends now."""
        now = time.perf_counter()
        self.phases.append((name, now - self.t))
        self.t = now

    def __str__(self) -> str:
        parts = ", ".join(f"{name} {s:.1f}s" for name, s in self.phases)
        return f"{sum(s for _, s in self.phases):.1f}s ({parts})"


class Meter:
    """Training speed between log lines: wall time minus the time spent evaluating and saving. The clock
    is read at log time, after the loss was read back (which waited for the device), so steps between
    log lines never wait for it."""

    def __init__(self, rt, tokens_per_step: int, first_step: int):
        self.rt, self.tokens_per_step = rt, tokens_per_step
        self.t0, self.paused, self.last_step, self.ms_avg, self.eval_s = time.perf_counter(), 0.0, first_step, None, 0.0

    @contextmanager
    def pause(self, eval_time: bool = False):
        """Leave out what runs inside (evaluation, saving) from the step time; count evaluation apart."""
        runtime.synchronize(self.rt)  # the queued training work belongs to the steps, not to this
        t0 = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - t0
            self.paused += seconds
            self.eval_s += seconds if eval_time else 0.0

    def lap(self, step: int) -> tuple[float, float]:
        """Milliseconds per step and tokens per second since the last lap (or first_step)."""
        now = time.perf_counter()
        ms = max(now - self.t0 - self.paused, 1e-9) * 1000 / max(step - self.last_step, 1)
        self.t0, self.paused, self.last_step = now, 0.0, step
        self.ms_avg = ms if self.ms_avg is None else 0.9 * self.ms_avg + 0.1 * ms
        return ms, self.tokens_per_step * 1000 / ms


class RecentLoss:
    """The training losses since the last log line, kept on the device until they are read."""

    def __init__(self, rt):
        self.rt, self.losses, self.grad_norm, self.last = rt, [], None, None

    def add(self, loss, grad_norm):
        self.losses.append(loss)
        self.grad_norm = grad_norm

    def read(self) -> tuple[float, float]:
        """The mean loss over every rank's micro-batches since the last read, and the last gradient norm."""
        mean = torch.stack(self.losses).mean()
        if self.rt.ddp:  # gloo has no AVG: sum, then divide
            dist.all_reduce(mean)
            mean /= self.rt.world_size
        self.losses, self.last = [], mean.item()
        return self.last, self.grad_norm.item()

    def latest(self) -> float | None:
        """The most recent training loss: of the steps since the last read, else the last read one."""
        return self.read()[0] if self.losses else self.last


def describe_run(cfg, rt, model_cfg, num_params: int, meta: dict, compiled: bool, resumed: dict | None = None,
                 command: str | None = None) -> dict:
    """Write the resolved config to out_dir/config.json (write_config); print what differs from the defaults and
    the model. resumed: a resume's step and changed keys (TrainState.resumed); command: this start's command line."""
    world = rt.world_size
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps * world
    resolved = {
        **config.to_dict(cfg),
        **config.to_dict(model_cfg),  # the model as built (fine-tuning and resume take the checkpoint's shape)
        "git_commit": git_commit(),
        "world_size": world,
        "device": rt.device,
        "compute_dtype": str(rt.dtype).removeprefix("torch."),
        "compile": compiled,
        "tokens_per_step": tokens_per_step,
        "num_params": num_params,
        "tokenizer": meta["tokenizer"],
        "command": command,
    }
    if rt.master:
        path = Path(cfg.out_dir) / "config.json"
        write_config(path, resolved, resumed)
        changed = " ".join(f"{k}={v!r}" for k, v in config.changed_from_defaults(cfg).items()) or "none"
        rt.print(textwrap.fill(f"config (all of it in {path}); set differently from the defaults: {changed}", 110))
    rt.print(
        f"model: {num_params / 1e6:.2f}M parameters; {tokens_per_step:,} tokens per step on "
        f"{world} process(es), {rt.device} {resolved['compute_dtype']}, compile={compiled}"
    )
    return resolved


def write_config(path: Path, resolved: dict, resumed: dict | None):
    """config.json holds the run's config as it was first started. A resume keeps it and appends to its "resumes"
    list the step, the keys it changed ({key: [was, now]}), the commit, processes, tokens per step and its command."""
    record = resolved
    if resumed is not None:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):  # deleted or damaged: the resumed run's config is the best record left
            record = {**resolved, "resumes": []}
        now = {k: resolved[k] for k in ("git_commit", "world_size", "tokens_per_step", "command")}
        record.setdefault("resumes", []).append({**resumed, **now})
    files.write_atomic(path, json.dumps(record, indent=1), "config.json")  # a full disk: one line, no temp file


def log_eval(rt, logger, last: dict, elapsed: float, eval_s: float):
    """The eval line and record: each split's loss (nats per token) and bits per byte."""
    bpb = [f"{split} {last[f'{split}_bpb']:.4f}" for split in ("train", "val") if last.get(f"{split}_bpb") is not None]
    bpb_txt = f"; bits per byte: {', '.join(bpb)}" if bpb else ""
    rt.print(
        f"step {last['step']}: train loss {last['train']:.4f}, val loss {last['val']:.4f}{bpb_txt} "
        f"({elapsed:.1f}s, {eval_s:.1f}s of it in eval)"
    )
    record = {"step": last["step"], "train_loss": last["train"], "val_loss": last["val"]}
    record.update({f"{split}_bpb": last[f"{split}_bpb"] for split in ("train", "val") if f"{split}_bpb" in last})
    logger.log({**record, "time": elapsed, "eval_time": eval_s})


def log_step(rt, logger, step: int, max_iters: int, lr: float, meter, recent, mfu_of, elapsed: float):
    """The log line and record of the steps since the last one; reading the loss back waits for the device.
    mfu_of(tokens per second of one GPU) is the MFU, or None where the peak is unknown."""
    loss, grad_norm = recent.read()
    ms, tok_s = meter.lap(step)
    mfu = mfu_of(tok_s / rt.world_size)  # per-GPU tokens
    eta = format_eta((max_iters - step) * meter.ms_avg / 1000)
    mfu_txt = f" | mfu {mfu * 100:.1f}%" if mfu is not None else ""
    rt.print(
        f"step {step}/{max_iters} | loss {loss:.4f} | lr {lr:.2e} | {ms:.1f} ms | "
        f"{tok_s / 1000:.1f}k tok/s{mfu_txt} | eta {eta}"
    )
    logger.log(
        {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "ms_per_step": ms,
         "tokens_per_sec": tok_s, "mfu": mfu, "time": elapsed}  # fmt: skip
    )


def format_eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def summarize(cfg, rt, s, recent, stop, meter, total: float, compile_s: float, argv) -> dict:
    """The last line: where the run stopped and its most recent losses; for an interrupted run, how to resume."""
    train_loss, last = recent.latest(), s.last_eval
    bpb = f", {last['val_bpb']:.4f} bits per byte" if last.get("val_bpb") is not None else ""
    val_txt = f"val loss {last['val']:.4f}{bpb} (step {last['step']})" if last else "no val loss yet"
    train_txt = f"train loss {train_loss:.4f} (recent steps)" if train_loss is not None else "no step taken"
    timing = f"{total:.1f}s ({meter.eval_s:.1f}s in eval, {compile_s:.1f}s compiling)"
    if stop.stopped:
        if s.saved_step >= 0:
            kept = f"{Path(cfg.out_dir) / 'ckpt.pt'} is at step {s.saved_step}"
            how = f"resume with: {resume_command(cfg, argv)}"
        else:
            kept, how = "nothing saved: no step was completed", "start again with the same command"
        rt.print(f"stopped by {stop.stopped} at step {s.step}: {train_txt}, {val_txt}; {kept}; {timing}\n{how}")
    else:
        rt.print(f"done: step {s.step}, {train_txt}, {val_txt}, {timing}")
    return {
        "step": s.step,
        "train_loss": last.get("train"),
        "val_loss": last.get("val"),
        "train_bpb": last.get("train_bpb"),
        "val_bpb": last.get("val_bpb"),
        "best_val_loss": s.best_val,
        "recent_train_loss": train_loss,
        "time": total,
        "eval_time": meter.eval_s,
        "compile_time": compile_s,
        "interrupted": stop.stopped,
    }


def resume_command(cfg, argv: list[str] | None, env=os.environ) -> str:
    """The command that continues an interrupted run: the launcher (launcher), train.py and argv without
    init_from and overwrite, resuming (with init_from=auto: the same command)."""
    if argv is None:
        return f"the same command with --init_from=resume (out_dir={cfg.out_dir})"
    kept = [a for a in argv if not a.startswith(("--init_from=", "--overwrite="))]
    how, where = launcher(env)
    again = "--init_from=auto" if "--init_from=auto" in argv else "--init_from=resume"
    return shlex.join([*how, "train.py", *kept, again]) + where


def after_a_lost_peer(cfg, argv: list[str] | None) -> str:
    """What the survivors of a process that ended without a word (killed, out of memory) say: what is saved and how
    to go on. The step is read from out_dir/ckpt.pt, which rank 0 may not have finished writing when it died."""
    from gpt_residual import checkpoint

    latest = Path(cfg.out_dir) / "ckpt.pt"
    if latest.is_file():
        saved = f"{latest} is at {checkpoint.describe(latest)}; resume with: {resume_command(cfg, argv)}"
    else:
        saved = "nothing was saved; start again with the same command"
    return f"another process of this run ended without a word (killed? out of memory?); {saved}"


def report(text: str, kind: str, err: bool = True) -> str:
    """Print text (one line on stderr, or stdout) if this process is the first of the run to report how it ended
    (runtime.first_to_report; always outside torchrun); returns the kind of the run's first report."""
    first, first_kind = runtime.first_to_report(kind)
    if first:
        print(text, file=sys.stderr if err else sys.stdout, flush=True)
    return first_kind


def start_command(argv: list[str] | None, env=os.environ) -> str | None:
    """The command line that started this process, shell-quoted: the launcher, train.py and argv (None: train() was
    called from Python). config.json records it, and a run's checkpoints carry its first (the export's model card)."""
    return None if argv is None else shlex.join([*launcher(env)[0], "train.py", *argv])


def launcher(env) -> tuple[list[str], str]:
    """How this process was started: python, or torchrun with the process counts read from the variables it sets
    (LOCAL_WORLD_SIZE: processes per node; GROUP_WORLD_SIZE: nodes). One node: --standalone. Several: the
    rendezvous endpoint is not visible to the workers, so the command says HOST:PORT and where to run it."""
    if "TORCHELASTIC_RUN_ID" not in env and "LOCAL_WORLD_SIZE" not in env:
        return ["python"], ""
    per_node = int(env.get("LOCAL_WORLD_SIZE") or env.get("WORLD_SIZE") or 1)
    nodes = int(env.get("GROUP_WORLD_SIZE") or int(env.get("WORLD_SIZE") or per_node) // per_node)
    if nodes <= 1:
        return ["torchrun", "--standalone", f"--nproc_per_node={per_node}"], ""
    how = ["torchrun", f"--nnodes={nodes}", f"--nproc_per_node={per_node}", "--rdzv_backend=c10d"]
    return [*how, "--rdzv_endpoint=HOST:PORT"], "  (on every node; HOST:PORT: the rendezvous endpoint of the run)"


# ----------------------------------------------------------------------------- the commands' one shape


def command(cls, doc: str, run, argv: list[str]) -> int:
    """A command line of cls's keys (--key=value, no config file): --help, else run(parsed), a user's error as one
    line on stderr with exit 2, Ctrl-C as 130."""
    if any(a in ("-h", "--help") for a in argv):
        print(config.help_text(cls, doc.strip()))
        return 0
    try:
        run(config.parse_args(cls, argv, allow_file=False))
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
