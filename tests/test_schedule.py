"""The learning-rate schedules (gpt_residual/schedule.py): their shapes, their words, resuming under them."""

import signal

import pytest
import torch
from conftest import assert_one_line_error, run

import train
from gpt_residual import checkpoint, config, optim, schedule
from model import GPT, GPTConfig


def lr_cfg(**kw):
    values = dict(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=100, lr_decay_iters=0)
    return config.parse_args(config.TrainConfig, [], overrides={**values, **kw})


def test_wsd_warms_up_holds_then_warms_down_linearly():
    cfg = lr_cfg(lr_schedule="wsd")  # warmdown_frac 0.2: the last 20 of 100 steps
    lrs = [train.get_lr(s, cfg) for s in range(120)]
    cosine = lr_cfg()
    assert lrs[:10] == [train.get_lr(s, cosine) for s in range(10)]  # the same warmup
    assert all(lr == cfg.learning_rate for lr in lrs[10:81])  # stable through step 80
    down = lrs[80:101]
    assert all(b < a for a, b in zip(down, down[1:]))
    steps = [b - a for a, b in zip(down, down[1:])]
    assert max(steps) == pytest.approx(min(steps))  # linear
    assert lrs[90] == pytest.approx((cfg.learning_rate + cfg.min_lr) / 2)
    assert all(lr == cfg.min_lr for lr in lrs[100:])
    half = lr_cfg(lr_schedule="wsd", warmdown_frac=0.5)
    assert schedule.warmdown_start(half) == 50 and train.get_lr(49, half) == cfg.learning_rate
    assert train.get_lr(50, lr_cfg(lr_schedule="wsd", lr_decay_iters=60)) < cfg.learning_rate  # ends at 60 then


def test_a_run_that_stops_before_its_schedule_ends_says_so_at_start_up(tiny_cfg, capsys):
    """small.py's decay ends at step 1000 (a plan a run in parts keeps): a 50-step wsd run of it says plainly that
    it stops at the peak lr, before the warmdown; a 500-step cosine that it stops mid-decay; a run shorter than
    its warmup that it stops in the warmup; a run that completes its schedule says nothing more."""
    small = lambda *flags: config.parse_args(config.TrainConfig, ["configs/small.py", *flags])
    assert schedule.describe(small("--lr_schedule=wsd", "--max_iters=50")) == (
        "lr: warmup 30 steps to 5e-3, constant to step 800, linear to 1e-3 at step 1000; this run stops at step 50 "
        "at the peak lr 5e-3, before its warmdown (steps 800-1000); --lr_decay_iters=0 ends the decay at max_iters"
    )
    cosine = small("--max_iters=500")
    assert schedule.describe(cosine).endswith(
        f"; this run stops at step 500 mid-decay, at lr {schedule.lr_text(train.get_lr(499, cosine))}; "
        "--lr_decay_iters=0 ends the decay at max_iters"
    )
    short = small("--max_iters=10")
    assert schedule.describe(short).endswith(
        f"; this run stops at step 10 in its warmup, at lr {schedule.lr_text(train.get_lr(9, short))}; "
        "--warmup_iters=9 or less reaches the peak"
    )
    past = lr_cfg(warmup_iters=30, max_iters=10, learning_rate=5e-3)  # lr_decay_iters=0: the decay ends at max_iters
    assert schedule.describe(past) == (  # the warmup, never a decay that ends before it does
        "lr: warmup 30 steps to 5e-3; this run stops at step 10 in its warmup, at lr "
        f"{schedule.lr_text(5e-3 * 10 / 31)}; --warmup_iters=9 or less reaches the peak"
    )
    for whole in (small(), small("--lr_schedule=wsd", "--max_iters=1000"), small("--lr_schedule=constant")):
        assert "this run stops" not in schedule.describe(whole)
    train.train(tiny_cfg(lr_schedule="wsd", max_iters=4, lr_decay_iters=40))  # printed at start-up
    out = capsys.readouterr().out
    assert "; this run stops at step 4 at the peak lr 3e-3, before its warmdown (steps 32-40)" in out


def test_constant_schedule_and_the_old_decay_lr():
    flat = lr_cfg(lr_schedule="constant")
    assert [train.get_lr(s, flat) for s in range(10)] == [train.get_lr(s, lr_cfg()) for s in range(10)]  # warmup
    assert {train.get_lr(s, flat) for s in range(10, 500, 7)} == {flat.learning_rate}
    old = lr_cfg(decay_lr=False)  # the old spelling: flat from step 0, no warmup
    assert {train.get_lr(s, old) for s in (0, 5, 50, 500)} == {old.learning_rate}


def test_schedule_in_words():
    assert schedule.describe(lr_cfg(lr_schedule="wsd", learning_rate=5e-3, min_lr=1e-3, warmup_iters=30,
                                     max_iters=2000)) == (
        "lr: warmup 30 steps to 5e-3, constant to step 1600, linear to 1e-3 at step 2000"
    )  # fmt: skip
    assert schedule.describe(lr_cfg(lr_decay_iters=60)) == (
        "lr: warmup 10 steps to 1e-3, cosine to 1e-4 at step 60, then 1e-4 to step 100"
    )
    flat = lr_cfg(lr_schedule="constant", warmup_iters=0)
    assert schedule.describe(flat) == "lr: 1e-3 from step 0, constant to step 100"
    assert schedule.describe(lr_cfg(decay_lr=False)) == "lr: constant 1e-3 from step 0 (decay_lr=False)"
    assert "Muon's matrices: the same shape, peak 2e-2" in schedule.describe(lr_cfg(optimizer="muon", muon_lr=0.02))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(lr_schedule="linear"), "lr_schedule must be one of cosine, wsd, constant; got 'linear'"),
        (dict(warmdown_frac=1.5), "warmdown_frac must be in [0, 1]"),
        (dict(warmdown_frac=-0.1), "warmdown_frac must be in [0, 1]"),
        (dict(decay_lr=False, lr_schedule="wsd"), "decay_lr=False is the old spelling of a flat learning rate"),
        (dict(lr_decay_iters=30, warmup_iters=40), "lr_decay_iters (30) is where the decay reaches min_lr, but"),
    ],
)
def test_bad_schedule_is_one_line_error(overrides, message):
    with pytest.raises(config.ConfigError) as e:
        lr_cfg(**overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_schedule_from_the_command_line():
    assert_one_line_error(run(["train.py", "--lr_schedule=cosin", "--device=cpu"]), "lr_schedule must be one of")


def test_every_group_follows_the_shape():
    """Muon's matrices and the learned scalars step at the schedule's lr times their own fixed scale."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32, residual_scalars=True))
    opt = optim.build(model, 0.1, 1e-3, (0.9, 0.95), "cpu", optimizer="muon", muon_lr=0.02, scalar_lr=0.5)
    applied = []
    for o in opt.optimizers:
        o.step = lambda o=o: applied.append([g["lr"] for g in o.param_groups])
    cfg = lr_cfg(lr_schedule="wsd", optimizer="muon")
    per_step = []
    for step in (0, 5, 50, 85, 95, 100):
        for g in opt.param_groups:
            g["lr"] = train.get_lr(step, cfg)
        applied.clear()
        opt.step()
        per_step.append([lr / train.get_lr(step, cfg) for lrs in applied for lr in lrs])
    assert len(per_step[0]) == len(opt.param_groups) >= 4 and len(set(per_step[0])) >= 3  # AdamW, Muon, scalars
    for ratios in per_step[1:]:
        assert ratios == pytest.approx(per_step[0])


def stop_at(monkeypatch, step: int):
    """Make the next train() stop after `step` steps, as if sent Ctrl-C then (it saves a checkpoint)."""
    get_lr, sent = train.get_lr, []

    def lr(s, cfg):
        if s == step - 1 and not sent:  # (the log line asks for that step's lr again)
            sent.append(signal.raise_signal(signal.SIGINT))
        return get_lr(s, cfg)

    monkeypatch.setattr(train, "get_lr", lr)


def test_extending_a_wsd_run_before_its_warmdown(tiny_cfg, tmp_path, monkeypatch, capsys):
    """A 20-step wsd run (warmdown from step 16) stopped at step 10 and resumed with max_iters=40 stays
    stable and warms down at the new end: bit for bit the run that had planned 40 steps from the start."""
    straight = tiny_cfg(lr_schedule="wsd", max_iters=40, out_dir=str(tmp_path / "straight"))
    train.train(straight)
    assert "lr: warmup 2 steps to 3e-3, constant to step 32, linear to 3e-4 at step 40" in capsys.readouterr().out
    with monkeypatch.context() as m:
        stop_at(m, 10)
        assert train.train(tiny_cfg(lr_schedule="wsd", max_iters=20))["interrupted"]
    assert checkpoint.load(tmp_path / "out/ckpt.pt")["step"] == 10
    capsys.readouterr()
    train.train(tiny_cfg(lr_schedule="wsd", max_iters=40, init_from="resume"))
    out = capsys.readouterr().out
    assert "max_iters = 40 (was 20)" in out and "lr schedule changed on resume without a jump at step 10" in out
    a, b = checkpoint.load(tmp_path / "straight/ckpt.pt"), checkpoint.load(tmp_path / "out/ckpt.pt")
    assert a["step"] == b["step"] == 40
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_cosine_resume_that_moves_the_end_says_the_lr_jumps(tiny_cfg, monkeypatch, capsys):
    with monkeypatch.context() as m:
        stop_at(m, 10)
        train.train(tiny_cfg(max_iters=20))
    capsys.readouterr()
    cfg = tiny_cfg(max_iters=40, init_from="resume")
    train.train(cfg)
    lines = [line for line in capsys.readouterr().out.splitlines() if "lr schedule" in line]
    before, after = schedule.lr_at(10, tiny_cfg(max_iters=20)), schedule.lr_at(10, cfg)
    assert after > before
    change = f"{schedule.lr_text(before)} -> {schedule.lr_text(after)} ({after / before - 1:+.0%})"
    assert lines == [f"  lr schedule jumps at step 10: lr {change}; now {schedule.shape(cfg)}"]


def test_unchanged_schedule_on_resume_says_nothing():
    cfg = lr_cfg(lr_schedule="wsd")
    assert schedule.resume_note(config.to_dict(cfg), cfg, 50) is None
    old = {k: v for k, v in config.to_dict(lr_cfg()).items() if k != "lr_schedule"}  # written before lr_schedule
    assert schedule.resume_note(old, lr_cfg(), 50) is None
