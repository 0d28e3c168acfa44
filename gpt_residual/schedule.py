"""The learning rate as a pure function of the step, so a resumed run steps exactly as a straight one.

    cosine    linear warmup over warmup_iters to learning_rate, cosine down to min_lr at the decay's end
    wsd       warmup-stable-decay (MiniCPM, nanochat, modded-nanogpt): linear warmup, constant at
              learning_rate, then linear down to min_lr over the last warmdown_frac of the decay's end
    constant  linear warmup, then learning_rate to the end

The decay's end is lr_decay_iters, or max_iters when that is 0: a wsd run resumed with a larger max_iters
before its warmdown began stays in its stable phase and warms down at the new end. An explicit lr_decay_iters
(or warmup_iters) past max_iters is kept: it is the plan of a run trained in parts, each resumed with a larger
max_iters, bit-identical to one run; describe() then says plainly where this run stops (in the warmup, at the peak
before a wsd warmdown, or mid-decay) and how to end the decay with the run instead. Every parameter group
follows the same shape: train.py sets each group's lr to lr_at(step), and a group with an "lr_scale" (Muon's
matrices, the learned scalars; see optim.py) steps at that times its scale. decay_lr=False is the old spelling
of a flat learning rate: learning_rate from step 0, no warmup.
"""

import math

SCHEDULES = ("cosine", "wsd", "constant")
KEYS = ("lr_schedule", "decay_lr", "learning_rate", "min_lr", "warmup_iters", "lr_decay_iters", "max_iters",
        "warmdown_frac")  # fmt: skip  (the config keys the schedule reads)


def decay_end(cfg) -> int:
    """The step at which the decay reaches min_lr."""
    return cfg.lr_decay_iters or cfg.max_iters


def warmdown_start(cfg) -> int:
    """wsd: the first step of the linear warmdown (never inside the warmup)."""
    end = decay_end(cfg)
    return max(cfg.warmup_iters, end - round(cfg.warmdown_frac * end))


def lr_at(step: int, cfg) -> float:
    """The learning rate of optimizer step `step` (0-based) under cfg's schedule keys."""
    peak, floor = cfg.learning_rate, cfg.min_lr
    if not cfg.decay_lr:
        return peak
    if step < cfg.warmup_iters:
        return peak * (step + 1) / (cfg.warmup_iters + 1)
    if cfg.lr_schedule == "constant":
        return peak
    end = decay_end(cfg)
    if step >= end:
        return floor
    if cfg.lr_schedule == "wsd":
        start = warmdown_start(cfg)
        if step < start:
            return peak
        return peak + (step - start) / max(1, end - start) * (floor - peak)
    ratio = (step - cfg.warmup_iters) / max(1, end - cfg.warmup_iters)
    return floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (peak - floor)


def lr_text(x: float) -> str:
    """5e-3, 2.5e-4, 0: short and unambiguous."""
    if x == 0:
        return "0"
    mantissa, exponent = f"{x:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def describe(cfg) -> str:
    """The schedule in words, e.g. "lr: warmup 30 steps to 5e-3, constant to step 1600, linear to 1e-3 at
    step 2000"."""
    text = "lr: " + shape(cfg)
    if cfg.optimizer == "muon":
        text += f" (Muon's matrices: the same shape, peak {lr_text(cfg.muon_lr)})"
    return text + stops_early(cfg)


def stops_early(cfg) -> str:
    """"; this run stops at step 50 ..." when max_iters ends the run before its schedule ends, else ""."""
    n = cfg.max_iters
    if not cfg.decay_lr or not n:
        return ""
    if cfg.warmup_iters > n:
        where, fix = "in its warmup", f"--warmup_iters={n - 1} or less reaches the peak"
    elif cfg.lr_schedule == "constant" or decay_end(cfg) <= n:
        return ""
    elif cfg.lr_schedule == "wsd" and n <= warmdown_start(cfg):
        where = f"at the peak lr {lr_text(cfg.learning_rate)}, before its warmdown (steps {warmdown_start(cfg)}-"
        where, fix = where + f"{decay_end(cfg)})", "--lr_decay_iters=0 ends the decay at max_iters"
    else:
        where, fix = "mid-decay", "--lr_decay_iters=0 ends the decay at max_iters"
    last = lr_text(lr_at(n - 1, cfg))
    return f"; this run stops at step {n} {where}" + ("" if "peak" in where else f", at lr {last}") + f"; {fix}"


def shape(cfg) -> str:
    """describe's words for the schedule keys alone."""
    peak, floor, end = lr_text(cfg.learning_rate), lr_text(cfg.min_lr), decay_end(cfg)
    if not cfg.decay_lr:
        return f"constant {peak} from step 0 (decay_lr=False)"
    parts = [f"warmup {cfg.warmup_iters} steps to {peak}"] if cfg.warmup_iters else [f"{peak} from step 0"]
    if cfg.warmup_iters and cfg.warmup_iters >= (cfg.max_iters if cfg.lr_schedule == "constant" else end):
        pass  # the run (lr_decay_iters=0: its decay too) ends within the warmup: nothing follows it
    elif cfg.lr_schedule == "constant":
        parts.append(f"constant to step {cfg.max_iters}")
    else:
        if cfg.lr_schedule == "wsd":
            parts.append(f"constant to step {warmdown_start(cfg)}")
        parts.append(f"{'linear' if cfg.lr_schedule == 'wsd' else 'cosine'} to {floor} at step {end}")
        if end < cfg.max_iters:
            parts.append(f"then {floor} to step {cfg.max_iters}")
    return ", ".join(parts)


def resume_note(old: dict, cfg, step: int) -> str | None:
    """One line when resuming at `step` under cfg changes the schedule the checkpoint (its config dict
    `old`) was following: whether the lr jumps at the resumed step, and by how much. None if unchanged."""
    before = type("Saved", (), {k: old.get(k, getattr(cfg, k)) for k in KEYS})
    if "lr_schedule" not in old:  # a checkpoint written before lr_schedule existed followed the cosine
        before.lr_schedule = "cosine"
    if shape(before) == shape(cfg):
        return None
    a, b = lr_at(step, before), lr_at(step, cfg)
    if a == b:
        return f"  lr schedule changed on resume without a jump at step {step} (lr {lr_text(b)}): {shape(cfg)}"
    change = f" ({b / a - 1:+.0%})" if a else ""
    return f"  lr schedule jumps at step {step}: lr {lr_text(a)} -> {lr_text(b)}{change}; now {shape(cfg)}"
