"""Train a GPT.

    python train.py configs/small.py                      # one process: CPU, a GPU or Apple MPS
    python train.py configs/small.py --n_layer=6          # flags override the file
    torchrun --standalone --nproc_per_node=8 train.py configs/gpt2.py   # DDP on 8 GPUs
    python train.py --help                                 # every key, its default and meaning

The loop is nanoGPT's: estimate the loss now and then, take gradient_accumulation_steps
micro-batches, clip, step, log, checkpoint. Everything is a function so tests can drive it.
"""

import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

import checkpoint
import config
import dataset
import metrics
import pretrained
import runtime
import telemetry
from model import GPT


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); printed as one line."""


def get_lr(step: int, cfg: config.TrainConfig) -> float:
    """Linear warmup to learning_rate, then cosine decay to min_lr at lr_decay_iters."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if step >= decay_iters:
        return cfg.min_lr
    ratio = (step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def padded_vocab(meta: dict) -> int:
    """A char vocabulary is used as is; a BPE one is padded to a multiple of 64 (50257 -> 50304),
    which makes the head's matmul faster on GPUs. The extra logits are never targets."""
    v = meta["vocab_size"]
    return v if meta["tokenizer"] == "char" else (v + 63) // 64 * 64


@torch.no_grad()
def estimate_loss(model, samplers: dict, cfg, rt: runtime.Runtime) -> dict:
    """Mean loss over the same eval_iters batches of each split every time; ranks share the work."""
    model.eval()
    out = {}
    for split, sampler in samplers.items():
        total = torch.zeros(2, device=rt.device)  # (sum of losses, count)
        for i in range(-(-cfg.eval_iters // rt.world_size)):  # the same number of forwards on every rank
            g = i * rt.world_size + rt.rank  # (FSDP gathers weights in each forward: ranks must stay in step)
            x, y = sampler.get(min(g, cfg.eval_iters - 1), rt.device)
            with rt.autocast():
                _, loss = model(x, y)
            if g < cfg.eval_iters:  # a batch beyond eval_iters only kept this rank in step
                total += torch.stack([loss.float(), torch.ones((), device=rt.device)])
        if rt.ddp:
            dist.all_reduce(total)
        out[split] = (total[0] / total[1]).item()
    model.train()
    return out


def check_resume(cfg, saved: dict):
    """The model shape must match the checkpoint; other changes (max_iters, lr, ...) are allowed."""
    for key, old in saved["model_config"].items():
        new = getattr(cfg, key)
        if key not in ("dropout", "vocab_size") and new != old:
            raise checkpoint.CheckpointError(
                f"the checkpoint's model has {key}={old!r} but the config says {new!r}; "
                f"use --{key}={old!r} to resume, or a new out_dir to start over"
            )


def format_eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def train(cfg: config.TrainConfig) -> dict:
    """Run training as configured; returns the final losses and timings."""
    rt = runtime.init_runtime(cfg.device, cfg.dtype)
    out_dir = Path(cfg.out_dir)
    if rt.master:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / ".write_test").touch()
            (out_dir / ".write_test").unlink()
            checkpoint.remove_stale_temps(out_dir)
        except OSError as e:
            msg = f"cannot write to out_dir '{out_dir}' ({e.strerror}); choose another out_dir"
            raise config.ConfigError(msg) from None

    # data: prepared by one process per node, then read by all
    if rt.local_rank == 0:
        data_dir = dataset.ensure_prepared(cfg.dataset, cfg.data_dir)
    if rt.ddp:
        dist.barrier()
    data_dir = dataset.dataset_dir(cfg.dataset, cfg.data_dir)
    meta = dataset.read_meta(data_dir)

    # model: new, resumed, or pretrained GPT-2 (whose shape is the checkpoint's); the same weights on every rank
    torch.manual_seed(cfg.seed)
    saved, model = None, None
    if cfg.init_from == "resume":
        saved = checkpoint.load(out_dir / "ckpt.pt")
        if saved["config"].get("init_from") not in ("scratch", "resume"):  # fine-tuning: shape from the checkpoint
            for key in pretrained.SHAPE_KEYS:
                setattr(cfg, key, saved["model_config"][key])
        check_resume(cfg, saved)
        cfg.vocab_size = saved["model_config"]["vocab_size"]
    elif cfg.init_from == "scratch":
        cfg.vocab_size = padded_vocab(meta)
    else:
        pretrained.check_compatible(cfg)
        if meta["tokenizer"] != "gpt2":
            raise dataset.DataError(
                f"pretrained GPT-2 reads GPT-2 BPE tokens, but dataset '{cfg.dataset}' is "
                f"{meta['tokenizer']}-level; use a BPE dataset such as shakespeare"
            )
        model = pretrained.load_pretrained(cfg.init_from, cfg.dropout, cfg.block_size)
        for key in pretrained.SHAPE_KEYS:
            setattr(cfg, key, getattr(model.config, key))
        rt.print(f"initialised from pretrained {cfg.init_from}")
    if cfg.vocab_size < meta["vocab_size"]:
        raise dataset.DataError(f"the model's vocabulary ({cfg.vocab_size}) is smaller than the dataset's")
    model = model or GPT(cfg.model_config())
    model = runtime.parallelize(model.to(rt.device), cfg.parallel, rt)
    optimizer = model.configure_optimizer(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), rt.device_type)
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == torch.float16)
    torch.manual_seed(cfg.seed + rt.rank)
    step, best_val = 0, float("inf")
    if saved is not None:
        checkpoint.load_model_and_optimizer_state(model, optimizer, saved)
        if saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        step, best_val = saved["step"], saved["best_val_loss"]
        rngs = saved["rng"]
        if len(rngs) == rt.world_size:
            checkpoint.set_rng_state(rngs[rt.rank])
        else:
            rt.print(f"note: the checkpoint was written by {len(rngs)} process(es): data order and RNG differ now")
        rt.print(f"resumed from {out_dir / 'ckpt.pt'} at step {step}")
        changed = {
            k: (v, getattr(cfg, k))
            for k, v in saved["config"].items()
            if hasattr(cfg, k) and getattr(cfg, k) != v and k not in ("init_from",)
        }
        for k, (old, new) in changed.items():
            rt.print(f"  config change on resume: {k} = {new!r} (was {old!r})")
    raw_model = model  # checkpoints are saved from this unwrapped, uncompiled module
    use_compile = cfg.compile if isinstance(cfg.compile, bool) else rt.device_type == "cuda"
    if use_compile:
        model = torch.compile(model)
    model = runtime.wrap_ddp(model, cfg.parallel, rt)
    sync_target = raw_model if cfg.parallel == "fsdp" else model  # who controls the gradient all-reduce

    # data order: a deterministic function of the step, so resuming reads the same batches
    train_tokens = dataset.load_tokens(data_dir, "train", meta)
    val_tokens = dataset.load_tokens(data_dir, "val", meta)
    sampler = dataset.BatchSampler(train_tokens, cfg.block_size, cfg.batch_size, cfg.seed, "train split")
    eval_samplers = {
        "train": dataset.BatchSampler(train_tokens, cfg.block_size, cfg.batch_size, cfg.seed + 1, "train split"),
        "val": dataset.BatchSampler(val_tokens, cfg.block_size, cfg.batch_size, cfg.seed + 2, "val split"),
    }
    accum, world = cfg.gradient_accumulation_steps, rt.world_size
    tokens_per_step = cfg.batch_size * cfg.block_size * accum * world

    resolved = {
        **config.to_dict(cfg),
        "git_commit": metrics.git_commit(),
        "world_size": world,
        "device": rt.device,
        "compute_dtype": str(rt.dtype).removeprefix("torch."),
        "compile": use_compile,
        "tokens_per_step": tokens_per_step,
        "num_params": raw_model.num_params(),
    }
    if rt.master:
        rt.print(json.dumps(resolved, indent=1))
        (out_dir / "config.json").write_text(json.dumps(resolved, indent=1))
    rt.print(
        f"model: {raw_model.num_params() / 1e6:.2f}M parameters ({raw_model.num_params(False) / 1e6:.2f}M "
        f"with position embeddings); {tokens_per_step:,} tokens per step on {world} process(es), {rt.device}"
    )
    wandb_config = resolved if cfg.wandb_log else None
    logger = metrics.Logger(
        cfg.out_dir, rt.master, wandb_config, cfg.wandb_project, cfg.wandb_run_name, fresh=cfg.init_from != "resume"
    )
    peak = runtime.peak_flops(rt, cfg.peak_flops)
    tele = telemetry.Telemetry(raw_model)
    if cfg.probe_init:  # statistics of the untrained model, then stop
        batches = [sampler.get(g * world + rt.rank, rt.device) for g in range(cfg.eval_iters)]
        record = {"step": step, "probe_init": True, **telemetry.probe(raw_model, batches, rt.autocast)}
        rt.print(f"at initialisation, mean of {cfg.eval_iters} batches (loss {record['loss']:.4f}):")
        rt.print(telemetry.table(record))
        logger.log(record)
        logger.close()
        runtime.shutdown(rt)
        return record

    def save_checkpoint(is_best: bool):
        rngs = [None] * world
        if rt.ddp:
            dist.all_gather_object(rngs, checkpoint.rng_state())
        else:
            rngs = [checkpoint.rng_state()]
        model_state, optimizer_state = checkpoint.model_and_optimizer_state(raw_model, optimizer)
        if rt.master:
            state = {
                "version": checkpoint.FORMAT_VERSION,
                "model": model_state,
                "optimizer": optimizer_state,
                "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                "step": step,
                "best_val_loss": best_val,
                "config": config.to_dict(cfg),
                "model_config": config.to_dict(cfg.model_config()),
                "tokenizer": json.dumps(meta),
                "data": {"dataset": cfg.dataset, "samples_seen": step * accum * world * cfg.batch_size},
                "rng": rngs,
            }
            checkpoint.save_run(state, out_dir, cfg.keep_checkpoints, is_best)

    # Ctrl-C or SIGTERM (preemption): finish the step, save, and exit cleanly
    stop = {"signal": None}

    def request_stop(signum, frame):
        if stop["signal"] is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        stop["signal"] = signal.Signals(signum).name
        rt.print(f"\n{stop['signal']} received: finishing this step and saving a checkpoint")

    old_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}

    t_start = time.perf_counter()
    eval_time, last = 0.0, {}
    step_time, ms_avg, losses = 0.0, None, []  # step_time: seconds in training steps since the last log
    x, y = sampler.get((step * accum) * world + rt.rank, rt.device)
    first_step = step
    try:
        while True:
            done = step >= cfg.max_iters or stop["signal"] is not None
            is_best = False
            if step % cfg.eval_interval == 0 or step >= cfg.max_iters:
                te = time.perf_counter()
                last = estimate_loss(model, eval_samplers, cfg, rt)
                eval_time += time.perf_counter() - te
                is_best, best_val = last["val"] < best_val, min(best_val, last["val"])
                elapsed = time.perf_counter() - t_start
                rt.print(
                    f"step {step}: train loss {last['train']:.4f}, val loss {last['val']:.4f} "
                    f"({elapsed:.1f}s, {eval_time:.1f}s of it in eval)"
                )
                logger.log(
                    {
                        "step": step,
                        "train_loss": last["train"],
                        "val_loss": last["val"],
                        "time": elapsed,
                        "eval_time": eval_time,
                    }
                )
            periodic = cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0
            if step > first_step and (periodic or is_best or done):
                save_checkpoint(is_best)
            if done:
                break

            t0 = time.perf_counter()

            lr = get_lr(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=rt.device)
            tele_step = cfg.telemetry_interval and step % cfg.telemetry_interval == 0
            with tele.capture_rms() if tele_step else nullcontext():  # per-layer stream RMS
                for micro in range(accum):
                    skip_sync = micro < accum - 1  # all-reduce gradients on the last micro-step only
                    with runtime.no_grad_sync(sync_target, skip_sync), rt.autocast():
                        _, loss = model(x, y)
                        loss = loss / accum
                    g = ((step * accum) + micro + 1) * world + rt.rank  # prefetch the next micro-batch
                    x, y = sampler.get(g, rt.device)
                    scaler.scale(loss).backward()
                    loss_sum += loss.detach()
            scaler.unscale_(optimizer)
            if tele_step:
                record, before = {"step": step, **tele.grad_norms()}, tele.snapshot()
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or float("inf"))
            if not scaler.is_enabled() and not (torch.isfinite(grad_norm) and torch.isfinite(loss_sum)):
                raise TrainingError(
                    f"step {step}: loss {loss_sum.item():.4g}, gradient norm {grad_norm.item():.4g} "
                    "is not finite; the last checkpoint is kept; lower learning_rate or use "
                    "float32/bfloat16, then resume"
                )
            scaler.step(optimizer)  # under fp16, skips the step if the gradients overflowed
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if tele_step:
                logger.log({**record, **tele.update_ratios(before), "rms": tele.rms})
            step += 1
            losses.append(loss_sum)
            step_time += time.perf_counter() - t0  # the isfinite check above synced with the device

            if step % cfg.log_interval == 0 or step == cfg.max_iters:
                ms = step_time * 1000 / len(losses)
                ms_avg = ms if ms_avg is None else 0.9 * ms_avg + 0.1 * ms
                loss_mean = torch.stack(losses).mean()
                if rt.ddp:  # the mean over every rank's micro-batches (gloo has no AVG: sum, then divide)
                    dist.all_reduce(loss_mean)
                    loss_mean /= world
                loss_val = loss_mean.item()
                tok_s = tokens_per_step / (ms / 1000)
                mfu = raw_model.estimate_mfu(tok_s / world, peak) if peak else None
                eta = format_eta((cfg.max_iters - step) * ms_avg / 1000)
                mfu_txt = f" | mfu {mfu * 100:.1f}%" if mfu is not None else ""
                rt.print(
                    f"step {step}/{cfg.max_iters} | loss {loss_val:.4f} | lr {lr:.2e} | {ms:.1f} ms | "
                    f"{tok_s / 1000:.1f}k tok/s{mfu_txt} | eta {eta}"
                )
                logger.log(
                    {
                        "step": step,
                        "loss": loss_val,
                        "lr": lr,
                        "grad_norm": grad_norm.item(),
                        "ms_per_step": ms,
                        "tokens_per_sec": tok_s,
                        "mfu": mfu,
                        "time": time.perf_counter() - t_start,
                    }
                )
                step_time, losses = 0.0, []

            if rt.ddp:  # a signal may reach one rank only: stop together
                flag = torch.tensor(float(stop["signal"] is not None), device=rt.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop["signal"] = stop["signal"] or ("SIGTERM" if flag.item() else None)
        if stop["signal"]:
            rt.print(
                f"saved {out_dir / 'ckpt.pt'} at step {step}; continue with the same command and "
                f"--init_from=resume (out_dir={cfg.out_dir})"
            )
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        logger.close()
        runtime.shutdown(rt)
    total = time.perf_counter() - t_start
    rt.print(
        f"done: step {step}, val loss {last.get('val', float('nan')):.4f}, {total:.1f}s ({eval_time:.1f}s in eval)"
    )
    return {
        "step": step,
        "train_loss": last.get("train"),
        "val_loss": last.get("val"),
        "best_val_loss": best_val,
        "time": total,
        "eval_time": eval_time,
        "interrupted": stop["signal"],
    }


USER_ERRORS = (
    config.ConfigError,
    dataset.DataError,
    runtime.DeviceError,
    checkpoint.CheckpointError,
    pretrained.PretrainedError,
    TrainingError,
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(config.help_text(config.TrainConfig, __doc__.strip()))
        return 0
    try:
        cfg = config.parse_args(config.TrainConfig, argv)
        train(cfg)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, TrainingError) else 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    sys.exit(main())
