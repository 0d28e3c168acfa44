"""The learning rate as a pure function of the step, so a resumed run steps exactly as a straight one.

    cosine    linear warmup over warmup_iters to learning_rate, cosine down to min_lr at the decay's end
    wsd       warmup-stable-decay (MiniCPM, nanochat, modded-nanogpt): linear warmup, constant at
              learning_rate, then linear down to min_lr over the last warmdown_frac of the decay's end
    constant  linear warmup, then learning_rate to the end

The decay's end is lr_decay_iters, or max_iters when that is 0: a wsd run resumed with a larger max_iters
before its warmdown began stays in its stable phase and warms down at the new end. Neither the warmup nor the decay
runs past max_iters: a longer one is cut to end with the run (litgpt's cosine and nanochat's warmdown end with the
run; torchtitan cuts a warmup or decay that does not fit, and says so), and the start-up line says it was cut. So
`configs/small.py --lr_schedule=wsd --max_iters=50` (small.py: lr_decay_iters=1000) warms down over steps 40-50,
and a run shorter than warmup_iters warms up over all of its steps. Every parameter group
follows the same shape: train.py sets each group's lr to lr_at(step), and a group with an "lr_scale" (Muon's
matrices, the learned scalars; see optim.py) steps at that times its scale. decay_lr=False is the old spelling
of a flat learning rate: learning_rate from step 0, no warmup.
"""

import math

SCHEDULES = ("cosine", "wsd", "constant")
KEYS = ("lr_schedule", "decay_lr", "learning_rate", "min_lr", "warmup_iters", "lr_decay_iters", "max_iters",
        "warmdown_frac")  # fmt: skip  (the config keys the schedule reads)


def warmup(cfg) -> int:
    """The warmup's steps: warmup_iters, cut to max_iters."""
    return min(cfg.warmup_iters, cfg.max_iters)


def decay_end(cfg) -> int:
    """The step at which the decay reaches min_lr: lr_decay_iters (0: max_iters), cut to max_iters."""
    return min(cfg.lr_decay_iters or cfg.max_iters, cfg.max_iters)


def warmdown_start(cfg) -> int:
    """wsd: the first step of the linear warmdown (never inside the warmup)."""
    end = decay_end(cfg)
    return max(warmup(cfg), end - round(cfg.warmdown_frac * end))


def lr_at(step: int, cfg) -> float:
    """The learning rate of optimizer step `step` (0-based) under cfg's schedule keys."""
    peak, floor = cfg.learning_rate, cfg.min_lr
    if not cfg.decay_lr:
        return peak
    if step < warmup(cfg):
        return peak * (step + 1) / (warmup(cfg) + 1)
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
    ratio = (step - warmup(cfg)) / max(1, end - warmup(cfg))
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
    return text


def shape(cfg) -> str:
    """describe's words for the schedule keys alone."""
    peak, floor, end, w = lr_text(cfg.learning_rate), lr_text(cfg.min_lr), decay_end(cfg), warmup(cfg)
    if not cfg.decay_lr:
        return f"constant {peak} from step 0 (decay_lr=False)"
    if not cfg.max_iters:
        return "none: no step is taken (max_iters=0)"
    parts = [f"warmup {w} steps to {peak}"] if w else [f"{peak} from step 0"]
    if w == cfg.max_iters:
        pass  # the run ends in its warmup
    elif cfg.lr_schedule == "constant":
        parts.append(f"constant to step {cfg.max_iters}")
    else:
        if cfg.lr_schedule == "wsd":
            parts.append(f"constant to step {warmdown_start(cfg)}")
        parts.append(f"{'linear' if cfg.lr_schedule == 'wsd' else 'cosine'} to {floor} at step {end}")
        if end < cfg.max_iters:
            parts.append(f"then {floor} to step {cfg.max_iters}")
    return ", ".join(parts) + cut_note(cfg)


def cut_note(cfg) -> str:
    """" (lr_decay_iters=1000 is past max_iters=50: cut to end with the run)", or "" when nothing was cut."""
    keys = ["warmup_iters"] + ([] if cfg.lr_schedule == "constant" else ["lr_decay_iters"])
    cut = [f"{k}={getattr(cfg, k)}" for k in keys if getattr(cfg, k) > cfg.max_iters]
    if not cut:
        return ""
    verb = "is" if len(cut) == 1 else "are"
    return f" ({' and '.join(cut)} {verb} past max_iters={cfg.max_iters}: cut to end with the run)"


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
