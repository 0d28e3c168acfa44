"""The residual-stream switches as the study's planner sees them, for the study's tests.

The study's questions 10-14 train with switches (attn_gate, norm_scaling, norm="dyt", hyper_connections, ...)
that are TrainConfig keys once the switches are in. Where a checkout lacks some of them, the fixture below
stands them in: a TrainConfig subclass with the missing keys (named, typed, defaulted and checked as the
agreed interface has them) and the new values of norm and norm_position, so that the planner's tests check
every run of every question against TrainConfig all the same: an unknown key or a bad value still fails
there. Where the checkout has every key, the fixture changes nothing and the real TrainConfig decides.
"""

import dataclasses

import pytest

import model
from gpt_residual import config

SWITCH_KEYS = {  # key: (type, default, the values it takes; None: any of its type)
    "attn_gate": (str, "none", ("none", "head", "elementwise")),
    "norm_scaling": (bool, False, None),
    "mix_ln_frac": (float, 0.25, None),
    "hyper_connections": (str, "none", ("none", "hc", "mhc")),
    "n_streams": (int, 4, None),
    "attn_residuals": (str, "none", ("none", "full", "block")),
    "attn_residual_blocks": (int, 8, None),
    "depth_scaling": (float, 0.0, None),
    "base_depth": (int, 0, None),
}
NEW_VALUES = {"NORMS": ("dyt", "derf"), "NORM_POSITIONS": ("mix",)}  # model.py's lists of allowed values


def missing_keys() -> dict:
    have = {f.name for f in dataclasses.fields(config.TrainConfig)}
    return {k: v for k, v in SWITCH_KEYS.items() if k not in have}


@pytest.fixture
def switches(monkeypatch) -> bool:
    """Stand in the switch keys this checkout lacks (True if it did)."""
    missing = missing_keys()
    if not missing:
        return False
    base = config.TrainConfig

    def post_init(self):
        base.__post_init__(self)
        for key, (_, _, allowed) in missing.items():
            if allowed:
                config.check_choice(key, getattr(self, key), allowed)

    fields = [(k, t, dataclasses.field(default=d)) for k, (t, d, _) in missing.items()]
    stand_in = dataclasses.make_dataclass("TrainConfig", fields, bases=(base,), namespace={"__post_init__": post_init})
    monkeypatch.setattr(config, "TrainConfig", stand_in)
    for name, extra in NEW_VALUES.items():
        if hasattr(model, name):  # where model.py checks norm and norm_position
            monkeypatch.setattr(model, name, tuple(dict.fromkeys((*getattr(model, name), *extra))))
    return True
