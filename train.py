"""Train a GPT.

    python train.py                                        # the defaults: configs/small.py, ~2 min on a laptop CPU
    python train.py configs/small.py --n_layer=6          # a config file, then flags that override it
    torchrun --standalone --nproc_per_node=8 train.py configs/gpt2.py   # DDP on 8 GPUs
    python train.py --help                                 # every key, its default and meaning

The loop is nanoGPT's: estimate the loss now and then, take gradient_accumulation_steps
micro-batches, clip, step, log, checkpoint. Each piece is a function, so tests can drive them.
"""

import json
import math
import os
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist

from gpt_residual import checkpoint, config, console, dataset, optim, pretrained, run_dir, runlog, runtime, telemetry
from gpt_residual.errors import USER_ERRORS
from gpt_residual.evaluate import TrainingSampler, byte_table, estimate_losses
from gpt_residual.health import Health, TrainingError
from gpt_residual.multiple_choice import training_hook
from gpt_residual.schedule import describe as describe_schedule
from gpt_residual.schedule import lr_at, resume_note
from model import GPT, GPTConfig

get_lr = lr_at  # the learning rate of step: lr_schedule's warmup, then cosine, wsd or constant (schedule.py)


# ----------------------------------------------------------------------------- setup: out_dir, data, model


@dataclass
class Data:
    meta: dict  # the tokenizer and token files (meta.json)
    train: dataset.BatchSampler  # the training batches, in an order fixed by the seed
    evals: dict[str, dataset.BatchSampler]  # the fixed batches that estimate each split's loss


def load_data(cfg: config.TrainConfig, rt: runtime.Runtime) -> Data:
    """Prepare the dataset if needed (one process per node), then map its token files."""
    if rt.local_rank == 0:  # prepared if need be, and every token id checked against the vocabulary, once per node
        dataset.prepare_and_check(cfg.dataset, cfg.data_dir)
    if rt.ddp:
        dist.barrier()
    folder = dataset.dataset_dir(cfg.dataset, cfg.data_dir)
    meta = dataset.read_meta(folder)
    tokens = {split: dataset.load_tokens(folder, split, meta) for split in ("train", "val")}
    B, T, seed = cfg.batch_size, cfg.block_size, cfg.seed
    evals = {
        "train": dataset.BatchSampler(tokens["train"], T, B, seed + 1, "train split"),
        "val": dataset.BatchSampler(tokens["val"], T, B, seed + 2, "val split"),
    }
    return Data(meta, dataset.BatchSampler(tokens["train"], T, B, seed, "train split"), evals)


def resolve_model(cfg: config.TrainConfig, meta: dict, saved: dict | None) -> tuple[GPTConfig, GPT | None]:
    """The model's config: the checkpoint's when resuming, GPT-2's when fine-tuning (each with the model holding
    the loaded weights), else the config's keys with the dataset's vocabulary (and no model yet)."""
    model = None
    if saved is not None:
        run_dir.check_resume(cfg, saved, meta)
        model = pretrained.from_checkpoint(saved, cfg.dropout)  # the weights; the optimizer's state comes later
        model_cfg = model.config
    elif cfg.init_from == "scratch":
        model_cfg = replace(cfg.model_config(), vocab_size=dataset.padded_vocab(meta))
    else:
        pretrained.check_compatible(cfg)
        pretrained.check_tokenizer(cfg.init_from, meta, cfg.dataset)  # GPT-2's BPE, or an export's char vocabulary
        model = pretrained.load_pretrained(cfg.init_from, cfg.dropout, cfg.block_size)
        model_cfg = model.config
    # how the model runs, not what it is: a run may turn it on or off, also on resume or when fine-tuning
    model_cfg = replace(model_cfg, activation_checkpointing=cfg.activation_checkpointing)
    if model is not None:
        model.config = model_cfg
    if model_cfg.vocab_size < meta["vocab_size"]:
        raise dataset.DataError(f"the model's vocabulary ({model_cfg.vocab_size}) is smaller than the dataset's")
    return model_cfg, model


@dataclass
class TrainState:
    raw_model: GPT  # unwrapped (its blocks may be compiled in place): what checkpoints save, telemetry reads
    model: torch.nn.Module  # what runs forward: raw_model, compiled and/or wrapped in DDP
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # scales fp16 losses; disabled otherwise
    grad_sync_owner: torch.nn.Module  # who controls the gradient all-reduce (the DDP wrapper or the FSDP model)
    step: int = 0  # optimizer steps taken
    samples_seen: int = 0  # training samples read by all processes together before this step
    best_val: float = math.inf
    saved_step: int = -1  # step of the newest checkpoint written or resumed from
    last_eval: dict = field(default_factory=dict)  # the newest loss estimate: step, train, val
    carried: dict = field(default_factory=dict)  # in every checkpoint, kept by a resume (run_dir.carried)
    resumed: dict | None = None  # a resume's step and the keys it changed, {key: [was, now]}, for config.json


def build_state(cfg, rt, model_cfg: GPTConfig, model: GPT | None, saved: dict | None) -> TrainState:
    """Model (sharded under FSDP), optimizer and GradScaler, restored from the checkpoint if there is one."""
    model = runtime.parallelize((model or GPT(model_cfg)).to(rt.device), cfg.parallel, rt)
    optimizer = optim.build(model, cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), rt.device_type,
                            optimizer=cfg.optimizer, muon_lr=cfg.muon_lr, scalar_lr=cfg.scalar_lr)
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == torch.float16)
    torch.manual_seed(cfg.seed + rt.rank)  # dropout differs per rank
    state = TrainState(model, model, optimizer, scaler, model, carried=run_dir.carried(cfg, saved))
    if saved is not None:
        restore(state, saved, cfg, rt)
    return state


def restore(state: TrainState, saved: dict, cfg: config.TrainConfig, rt: runtime.Runtime):
    """Continue a checkpointed run: its state, at the same sample of the data whatever the batch shape, and
    the config's optimizer settings (weight_decay, betas, lr scales), which a resume may change."""
    settings = optim.hyperparameters(state.optimizer)  # the config's, before the checkpoint's replace them
    if not checkpoint.restore(saved, state.raw_model, state.optimizer, state.scaler, rt):
        rt.print(f"note: the checkpoint was written by {len(saved['rng'])} process(es): dropout's RNG differs now")
    optim.set_hyperparameters(state.optimizer, settings)
    state.step, state.best_val, state.saved_step = saved["step"], saved["best_val_loss"], saved["step"]
    state.last_eval = saved.get("last_eval", {})
    old = saved["config"]
    state.samples_seen = saved["data"].get(
        "samples_seen", state.step * old["batch_size"] * old["gradient_accumulation_steps"] * len(saved["rng"])
    )
    rt.print(f"resumed from {Path(cfg.out_dir) / 'ckpt.pt'} at step {state.step}, sample {state.samples_seen:,}")
    state.resumed = {"step": state.step, "changed": run_dir.report_changes(cfg, saved, rt, state.samples_seen)}
    if note := resume_note(old, cfg, state.step):
        rt.print(note)


def will_compile(cfg: config.TrainConfig, rt: runtime.Runtime) -> bool:
    """compile=True or False as set; "auto": on CUDA."""
    return cfg.compile if isinstance(cfg.compile, bool) else rt.device_type == "cuda"


def compile_model(state: TrainState, cfg, rt: runtime.Runtime, sampler: dataset.BatchSampler) -> float | None:
    """torch.compile (compile=auto: on CUDA) and wrap in DDP. compile_scope="blocks" compiles each block
    and the head in place (GPT.compile_regions: one compile serves every block), "model" the whole model.
    Compilation happens here, announced and timed, by one forward in eval mode and one forward and
    backward in train mode (gradients dropped, random state untouched) on a batch of sampler, not inside
    the first evaluation or step. Returns the seconds it took (None: not compiled)."""
    use = will_compile(cfg, rt)
    if use and cfg.compile_scope == "blocks":
        state.raw_model.compile_regions()
    whole = use and cfg.compile_scope == "model"
    state.model = runtime.wrap_ddp(torch.compile(state.raw_model) if whole else state.raw_model, cfg.parallel, rt)
    state.grad_sync_owner = state.raw_model if cfg.parallel == "fsdp" else state.model
    if not use:
        return None
    rt.print("compiling the model (torch.compile; the first compile of a new shape takes a minute or two) ...")
    t0 = time.perf_counter()
    x, y = sampler.get(0, rt.device)
    with torch.random.fork_rng(devices=[rt.device] if rt.device_type == "cuda" else []):
        state.model.eval()
        with torch.no_grad(), rt.autocast():
            state.model(x, y)
        state.model.train()
        with rt.autocast():
            _, loss = state.model(x, y)
        # synced like a last micro-step on every rank, then dropped: FSDP would keep an unsynced backward's
        # gradients (unsharded, out of zero_grad's reach) and add them to the first step's
        loss.backward()
        state.optimizer.zero_grad(set_to_none=True)
    runtime.synchronize(rt)
    seconds = time.perf_counter() - t0
    rt.print(f"compiled in {seconds:.1f}s")
    return seconds


# ----------------------------------------------------------------------------- the pieces of the loop


def train_step(state: TrainState, batches, lr: float, cfg, rt: runtime.Runtime, telemetry_probe=None):
    """One optimizer step: gradient_accumulation_steps micro-batches forward and backward (gradients
    all-reduced on the last one only), unscale, clip, step. Returns the mean loss and the gradient norm
    as device tensors: nothing here waits for the device. With telemetry_probe (a telemetry.Telemetry), also this
    step's per-layer record, which does wait for it."""
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    accum = cfg.gradient_accumulation_steps
    loss_sum = torch.zeros((), device=rt.device)
    with telemetry_probe.capture_rms() if telemetry_probe else nullcontext():  # per-layer stream RMS
        for micro in range(accum):
            x, y = next(batches)
            with runtime.no_grad_sync(state.grad_sync_owner, micro < accum - 1):  # all-reduce on the last micro-step
                with rt.autocast():
                    _, loss = state.model(x, y)
                    loss = loss / accum
                state.scaler.scale(loss).backward()
            loss_sum += loss.detach()
    state.scaler.unscale_(state.optimizer)
    if telemetry_probe:
        record, before = telemetry_probe.grad_norms(), telemetry_probe.snapshot()
    grad_norm = torch.nn.utils.clip_grad_norm_(state.raw_model.parameters(), cfg.grad_clip or float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a replicated DTensor; its local value is the global norm
        grad_norm = grad_norm.full_tensor()
    state.scaler.step(state.optimizer)  # under fp16, skips the step if the gradients overflowed
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    if telemetry_probe:
        record = {**record, **telemetry_probe.update_ratios(before), "rms": telemetry_probe.rms}
    return loss_sum, grad_norm, record if telemetry_probe else None


def save(state: TrainState, cfg, rt, model_cfg: GPTConfig, meta: dict, health: Health, is_best: bool):
    health.check(state.saved_step)
    fields = dict(
        step=state.step,
        best_val_loss=state.best_val,
        last_eval=state.last_eval,
        config=config.to_dict(cfg),
        model_config=config.to_dict(model_cfg),
        tokenizer=json.dumps(meta),
        data={"dataset": cfg.dataset, "samples_seen": state.samples_seen},
        **state.carried,
    )
    whole = checkpoint.training_state(state.raw_model, state.optimizer, state.scaler, rt, **fields)
    if rt.master:
        checkpoint.save_run(whole, Path(cfg.out_dir), cfg.keep_checkpoints, is_best)
    state.saved_step = state.step


# ----------------------------------------------------------------------------- the loop


def train(cfg: config.TrainConfig, argv: list[str] | None = None) -> dict:
    """Run training as configured; returns the final losses and timings. argv, when given, is the
    command line, quoted back in the resume hint of an interrupted run."""
    t_start = time.perf_counter()
    rt = runtime.init_runtime(cfg.device, cfg.dtype, cfg.parallel)
    runtime.keep_freed_memory(rt.device_type)  # freed activations reused, not page-faulted in again at every step
    stop, ended_well = runtime.GracefulStop(rt), False
    try:
        with ExitStack() as held:  # out_dir's lock and the run log, let go however the run ends
            with stop.interruptible():  # nothing to save yet: a signal ends the run at once
                run = setup(cfg, rt, argv, held)
            result = run if isinstance(run, dict) else loop(run, rt, stop, t_start, argv)  # a dict: probe_init's
        ended_well = True
        return result
    except runtime.Interrupted as e:
        ended_well = not rt.ddp  # the other ranks may be anywhere: no barrier on the way out
        console.report(f"stopped by {e} before training began: nothing new to save", "stop", err=False)
        return {"step": None, "interrupted": str(e)}
    except Exception as e:
        if rt.ddp and runtime.is_peer_loss(e):  # not this rank's fault: say what is saved and how to go on
            raise runtime.PeerLost(console.after_a_lost_peer(cfg, argv)) from None
        raise
    finally:
        stop.restore(ending=rt.ddp and not ended_well)
        runtime.shutdown(rt, ended_well)


@dataclass
class Run:
    """What setup builds for the loop."""

    cfg: config.TrainConfig  # for this world size, init_from resolved
    data: Data
    model_cfg: GPTConfig
    state: TrainState
    logger: runlog.Logger
    sampler: TrainingSampler  # sample_interval's samples (rank 0)
    hellaswag: object  # multiple_choice.training_hook's scorer, or None when hellaswag_interval is 0
    compile_s: float  # seconds spent compiling


def setup(cfg: config.TrainConfig, rt: runtime.Runtime, argv, held: ExitStack) -> Run | dict:
    """Everything before the first step, on every rank: out_dir (locked), data, model, optimizer, what the eval
    steps need (a sample prompt is checked here, on every rank), compilation and the run log. With probe_init, the
    statistics at initialisation instead."""
    lap = console.Laps()
    cfg = cfg.for_world(rt.world_size)
    lap("device")
    cfg, lock = run_dir.prepare_out_dir(cfg, rt)
    if lock:
        held.callback(lock.close)
    data = load_data(cfg, rt)
    saved = checkpoint.load(Path(cfg.out_dir) / "ckpt.pt") if cfg.init_from == "resume" else None
    lap("data")
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model_cfg, pretrained_model = resolve_model(cfg, data.meta, saved)
    state = build_state(cfg, rt, model_cfg, pretrained_model, saved)
    if saved is None:  # the run's first start: its command line, carried by every checkpoint of the run
        state.carried["command"] = console.start_command(argv)
    lap("model+optimizer")  # (the first optimizer imports torch._dynamo: ~1-2 s)
    sampler, hellaswag = TrainingSampler(cfg, rt, data.meta), training_hook(cfg, data.meta, rt)
    compiled = will_compile(cfg, rt) and not cfg.probe_init
    n_params = state.raw_model.num_params()
    resolved = console.describe_run(cfg, rt, model_cfg, n_params, data.meta, compiled, state.resumed,
                                    console.start_command(argv))
    rt.print(describe_schedule(cfg))
    rt.print(f"set up in {lap}")
    if cfg.probe_init:
        return telemetry.probe_init(state.raw_model, data.train, state.step, cfg, rt)
    compile_s = compile_model(state, cfg, rt, data.evals["val"])
    wandb_config = resolved if cfg.wandb_log else None
    fresh = cfg.init_from != "resume"
    logger = runlog.Logger(cfg.out_dir, rt.master, wandb_config, cfg.wandb_project, cfg.wandb_run_name, fresh,
                           run_id=state.carried["wandb_run_id"])
    held.callback(logger.close)
    state.carried["wandb_run_id"] = logger.run_id or state.carried["wandb_run_id"]
    return Run(cfg, data, model_cfg, state, logger, sampler, hellaswag, compile_s or 0.0)


def loop(run: Run, rt: runtime.Runtime, stop: runtime.GracefulStop, t_start: float, argv) -> dict:
    """Evaluate now and then, step, log, checkpoint, until max_iters or a stop the ranks agreed on."""
    cfg, state, data, model_cfg, logger = run.cfg, run.state, run.data, run.model_cfg, run.logger
    world, first_step = rt.world_size, state.step
    ahead = 4 if rt.device_type == "cuda" else 0  # gather and pin batches in a background thread on GPUs
    batches = dataset.micro_batches(data.train, state.samples_seen, rt.rank, world, rt.device, ahead)
    samples_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * world
    fp16 = state.scaler.is_enabled()  # the NaN watch is off: the GradScaler skips such steps; count them instead
    telemetry_probe, health = telemetry.Telemetry(state.raw_model), Health(rt.device, not fp16, cfg.max_skipped_steps)
    meter = console.Meter(rt, cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps * world, state.step)
    peak = runtime.peak_flops(rt, cfg.peak_flops)
    recent, stopping, first_eval = console.RecentLoss(rt), False, True
    token_bytes = byte_table(data.meta, model_cfg.vocab_size, rt.device)  # for bits per byte
    sampler, hellaswag = run.sampler, run.hellaswag
    while True:
        done = state.step >= cfg.max_iters or stopping
        is_best = False
        if (state.step % cfg.eval_interval == 0 or state.step >= cfg.max_iters) and not stopping:
            if first_eval:
                plan = "; ".join(f"{k}: {v.describe_estimate(cfg.eval_iters)}" for k, v in data.evals.items())
                rt.print(f"step {state.step}: estimating the loss ({plan}) ...")
            with meter.pause(eval_time=True):
                estimate = estimate_losses(state.model, data.evals, cfg, rt, stop, token_bytes)
            first_eval = False
            if estimate is None:  # a stop was requested: the estimate is abandoned
                done = stopping = True
            else:
                state.last_eval = {"step": state.step, **estimate}
                is_best, state.best_val = estimate["val"] < state.best_val, min(state.best_val, estimate["val"])
                console.log_eval(rt, logger, state.last_eval, time.perf_counter() - t_start, meter.eval_s)
                if sampler.due(state.step):
                    with meter.pause(eval_time=True):
                        sampler(state.raw_model, state.step, logger, stop)
                if hellaswag:  # a fixed subset, every hellaswag_interval steps and at the end
                    with meter.pause(eval_time=True):
                        hellaswag(state.raw_model, state.step, logger, state.step >= cfg.max_iters, stop)
                if stop.agreed():  # a stop requested while sampling or scoring: save now, every rank
                    done = stopping = True
        periodic = cfg.checkpoint_interval and state.step % cfg.checkpoint_interval == 0
        if state.step > max(first_step, state.saved_step) and (periodic or is_best or done):
            with meter.pause(), stop.shielded():  # a second Ctrl-C waits for the write to end
                save(state, cfg, rt, model_cfg, data.meta, health, is_best)
        if done:
            break
        tele_step = cfg.telemetry_interval and state.step % cfg.telemetry_interval == 0
        probe = telemetry_probe if tele_step else None
        loss, grad_norm, record = train_step(state, batches, get_lr(state.step, cfg), cfg, rt, probe)
        health.update(state.step, loss, grad_norm)
        if record:
            logger.log({"step": state.step, **record})
        state.step, state.samples_seen = state.step + 1, state.samples_seen + samples_per_step
        recent.add(loss, grad_norm)
        if state.step % cfg.log_interval == 0 or state.step == cfg.max_iters:
            health.check(state.saved_step)
            mfu_of = lambda tok_s: state.raw_model.estimate_mfu(tok_s, peak) if peak else None
            lr, elapsed = get_lr(state.step - 1, cfg), time.perf_counter() - t_start
            console.log_step(rt, logger, state.step, cfg.max_iters, lr, meter, recent, mfu_of, elapsed)
        if not rt.ddp or state.step % cfg.log_interval == 0:  # under DDP the ranks agree at log steps only
            stopping = stop.agreed()  # the agreed value: never this rank's own flag, which a signal may set now
    return console.summarize(cfg, rt, state, recent, stop, meter, time.perf_counter() - t_start, run.compile_s, argv)


def main(argv: list[str] | None = None) -> int:
    """train.py's command line. A user's error is one line on stderr, printed once however many processes raise it
    (console.report); a process that fails never waits for the others, which end as soon as they next need it."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(config.help_text(config.TrainConfig, __doc__.strip()))
        return 0
    try:
        cfg = config.parse_args(config.TrainConfig, argv)
        train(cfg, argv)
    except USER_ERRORS as e:
        console.report(f"error: {e}", "error")
        return 1 if isinstance(e, TrainingError) else 2
    except runtime.PeerLost as e:  # silent if the peer said why it ended (or stopped when asked: then exit 0)
        return 0 if console.report(f"error: {e}", "error") == "stop" else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:
        runtime.first_to_report("error")  # a bug: its traceback follows, and the other ranks stay silent
        raise
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    sys.exit(main())
