"""The runs of questions 10-14: narrow models at several depths, every arm with several seeds.

Their model, DEEP_BASE: 32 wide (2 heads of 16), 12 layers unless a run says otherwise, 16 x 64 characters
a step, 150 steps at peak learning rate 3e-3 (warmup 40, cosine to 3e-4), LayerNorm, pre-LN, GPT-2's init,
AdamW; every switch of the residual stream pinned off, so that a config file cannot leak one in. In a pilot
(12 x 32, 300 steps) pre-LN reached val loss 2.49 at 3e-3 and 2.68 at 1e-3; post-LN 2.83 at 1e-3 and 3.11 at
3e-3 (near the unigram loss, 3.35): the depth question keeps pre-LN's learning rate, and post-LN's failure
to train at it is one of its answers. Each run is `Run(..., base="deep", seeded=True)`: one run per seed.

Runs that two questions share are one Run (deep_run returns the existing one for the same settings), made
once: question 11's plain pre-LN baseline is question 10's 12-layer pre-LN, and so on.
"""

from scripts.study.question import MODERN, Run

DEEP_BASE = dict(n_layer=12, n_embd=32, n_head=2, batch_size=16, max_iters=150, learning_rate=3e-3, min_lr=3e-4)
DEEP_BASE |= dict(warmup_iters=40, norm="layernorm", norm_position="pre", residual=True, deepnorm=False)
DEEP_BASE |= dict(init="gpt2", optimizer="adamw", attn_gate="none", norm_scaling=False, hyper_connections="none")
DEEP_BASE |= dict(attn_residuals="none", depth_scaling=0.0)

_RUNS: dict[frozenset, Run] = {}  # every run of questions 10-14 by its settings, in the order they are made


def deep_run(name: str, overrides: dict, inspect: bool = False, lr_scale: float = 1.0) -> Run:
    """The Run with these settings: a new one, or the one an earlier question already asked for."""
    key = frozenset((DEEP_BASE | overrides | {"lr_scale": lr_scale}).items())
    if key not in _RUNS:
        _RUNS[key] = Run(name, overrides, base="deep", seeded=True, inspect=inspect, lr_scale=lr_scale)
    return _RUNS[key]


# ----------------------------------------------------------------------------- question 10: depth

DEPTHS = (6, 12, 24, 48)
DEPTH_ARMS = {  # label: (slug, overrides)
    "pre-LN": ("pre", {}),
    "post-LN": ("post", {"norm_position": "post"}),
    "peri-LN": ("peri", {"norm_position": "peri"}),
    "Mix-LN": ("mix", {"norm_position": "mix"}),
    "DeepNorm": ("deepnorm", {"norm_position": "post", "deepnorm": True}),
    "LayerNorm Scaling": ("lns", {"norm_scaling": True}),
    "mHC": ("mhc", {"hyper_connections": "mhc"}),
    "no residual": ("nores", {"residual": False}),
}
DEPTH = {
    (arm, L): deep_run(f"d{L}-{slug}", {"n_layer": L, **ov}, inspect=True)
    for L in DEPTHS
    for arm, (slug, ov) in DEPTH_ARMS.items()
}

# ----------------------------------------------------------------------------- question 11: switches x baselines

SWITCHES = {  # label: (slug, overrides added to a baseline)
    "gated attention": ("gate", {"attn_gate": "elementwise"}),
    "LayerNorm Scaling": ("lns", {"norm_scaling": True}),
    "Mix-LN": ("mix", {"norm_position": "mix"}),
    "DyT": ("dyt", {"norm": "dyt"}),
    "Derf": ("derf", {"norm": "derf"}),
    "HC": ("hc", {"hyper_connections": "hc"}),
    "mHC": ("mhc", {"hyper_connections": "mhc"}),
    "Attention Residuals": ("attnres", {"attn_residuals": "full"}),
}
# what a switch replaces on the modern stack (b), because it refuses to combine with it: HC, mHC and Attention
# Residuals replace the skip connection that the learned residual scalars (x = a_i x + b_i x0) scale; DyT and
# Derf replace every norm, and a point-wise squash cannot normalise q and k per head or stand in for the
# embeddings' norm
REPLACES = {
    "hyper_connections": {"residual_scalars": False},
    "attn_residuals": {"residual_scalars": False},
    "norm": {"qk_norm": False, "embed_norm": False},
}
BASELINES = {  # label: (slug, overrides)
    "(a) pre-LN, AdamW, GPT-2 init": ("a", {}),
    "(b) modern stack, Muon": ("b", MODERN),
}


def arm_overrides(baseline: dict, switch: dict) -> dict:
    """A baseline with a switch added, less what the switch replaces on it (REPLACES), at 12 layers."""
    both = {**baseline, **switch}
    for key in switch:
        both |= {k: v for k, v in REPLACES.get(key, {}).items() if baseline.get(k)}
    return {"n_layer": 12, **both}


SWITCH = {  # (baseline label, switch label or "baseline"): Run
    (b, s): deep_run(f"sw-{bslug}-{slug}", arm_overrides(bov, ov))
    for b, (bslug, bov) in BASELINES.items()
    for s, (slug, ov) in {"baseline": ("base", {}), **SWITCHES}.items()
}

# ----------------------------------------------------------------------------- question 13: HC vs mHC

HIGH_LR = 10 / 3  # x DEEP_BASE's learning rate (1e-2 at 3e-3): where a 12-layer pre-LN still trains (checked)
STABILITY_ARMS = {"pre-LN": {}, "HC": {"hyper_connections": "hc"}, "mHC": {"hyper_connections": "mhc"}}
CADENCE = dict(log_interval=5, telemetry_interval=10)  # a loss every 5 steps (spikes), the gain every 10
STABILITY = {
    arm: deep_run(f"st-{arm.lower().replace('-', '')}", {"n_layer": 12, **ov, **CADENCE}, lr_scale=HIGH_LR)
    for arm, ov in STABILITY_ARMS.items()
}

# ----------------------------------------------------------------------------- question 14: lr across depth

BASE_DEPTH, DEEP_DEPTH = 6, 24  # the depth a learning rate is tuned at, and 4x it
LR_GRID = (1 / 3, 1.0, 10 / 3, 10.0)  # x DEEP_BASE's learning rate: 1e-3, 3e-3, 1e-2, 3e-2 on a CPU
COMPLETE_P = 1.0  # depth_scaling's exponent: CompleteP (Dey et al. 2025); depth-muP would be 0.5


def lr_run(depth: int, scale: float, scaled: bool) -> Run:
    """A cell of the sweep. At the base depth depth_scaling multiplies by (L / base_depth)^-a = 1 and its
    learning-rate and epsilon rules by 1: the same model, so both arms read the same runs there."""
    ds = {"depth_scaling": COMPLETE_P, "base_depth": BASE_DEPTH} if scaled and depth != BASE_DEPTH else {}
    name = f"lr{depth}-{'cp' if ds else 'sp'}-x{scale:.3g}"
    return deep_run(name, {"n_layer": depth, **ds}, lr_scale=scale)


LR_SWEEP = {  # (depth, scaled, lr scale): Run
    (d, scaled, x): lr_run(d, x, scaled) for d in (BASE_DEPTH, DEEP_DEPTH) for scaled in (False, True) for x in LR_GRID
}

RUNS = tuple(_RUNS.values())
