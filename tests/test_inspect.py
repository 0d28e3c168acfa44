"""python -m scripts.inspect: a trained run's per-block table, figure and JSON (interfaces.md's schema), on the run's
own validation batches; its one-line errors."""

import io
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, assert_one_line_error, metrics_records, run

import train
from gpt_residual import config
from scripts import inspect as inspect_cmd

LAYER_KEYS = {"block", "top_abs", "median_abs", "max_position", "max_channel", "logit_lens_loss", "skip_loss_delta",
              "angular_distance"}  # fmt: skip


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, char_data) -> Path:
    """A tiny char-level run of 10 steps, its loss estimated on eval_iters=2 fixed val batches."""
    out = tmp_path_factory.mktemp("inspect") / "run"
    values = {**TINY, "data_dir": str(char_data), "out_dir": str(out), "max_iters": 10, "n_layer": 2}
    train.train(config.parse_args(config.TrainConfig, [], overrides=values))
    return out


def test_inspect_prints_draws_and_writes_the_schema(trained_run, tmp_path):
    target = tmp_path / "numbers.json"
    proc = run(["-m", "scripts.inspect", f"--out_dir={trained_run}", f"--json={target}", "--batches=2"])
    assert proc.returncode == 0, proc.stderr
    got = json.loads(target.read_text())
    assert set(got) == {"out_dir", "step", "n_layer", "val_loss", "layers", "switches", "hc_gain"}
    assert got["out_dir"] == str(trained_run) and got["step"] == 10 and got["n_layer"] == 2
    assert got["switches"] == {} and got["hc_gain"] is None  # no switch on
    assert [r["block"] for r in got["layers"]] == [0, 1]
    for r in got["layers"]:
        assert set(r) == LAYER_KEYS
        assert len(r["top_abs"]) == 3 and r["top_abs"] == sorted(r["top_abs"], reverse=True)
        assert all(isinstance(r[k], int) for k in ("max_position", "max_channel")) and 0 <= r["max_position"] < 16
        assert all(isinstance(r[k], float) for k in LAYER_KEYS - {"block", "top_abs", "max_position", "max_channel"})
        assert 0 <= r["angular_distance"] <= 1
    # the run's own fixed val batches: with --batches=eval_iters, its last val loss (float32 on the CPU both times)
    last_eval = [r for r in metrics_records(trained_run) if "val_loss" in r][-1]
    assert got["val_loss"] == pytest.approx(last_eval["val_loss"], abs=1e-6)
    assert got["layers"][-1]["logit_lens_loss"] == pytest.approx(got["val_loss"], abs=1e-6)
    png = trained_run / "inspect.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] in (["0"], ["1"])]
    assert [float(row[1]) for row in rows] == pytest.approx([r["top_abs"][0] for r in got["layers"]], rel=1e-2)
    assert f"wrote {png} and {target}" in proc.stdout


def test_the_figure_labels_every_axis_with_its_unit(trained_run):
    cfg = config.parse_args(inspect_cmd.InspectConfig, [f"--out_dir={trained_run}", "--batches=1"])
    result = inspect_cmd.run_inspect(cfg, out=io.StringIO())
    fig = inspect_cmd.figure(result)
    axes = fig.axes
    assert [ax.get_ylabel() for ax in axes] == [
        "|h| of the stream (log)",
        "logit lens loss (nats/token)",
        "loss increase if skipped (nats/token)",
        "angular distance in -> out (x pi rad)",
    ]
    assert axes[0].get_yscale() == "log" and axes[-1].get_xlabel() == "block (0 = first)"
    assert list(axes[1].lines[0].get_ydata()) == [r["logit_lens_loss"] for r in result["layers"]]
    assert [b.get_height() for b in axes[2].patches] == [r["skip_loss_delta"] for r in result["layers"]]
    assert list(axes[3].lines[0].get_ydata()) == [r["angular_distance"] for r in result["layers"]]
    assert list(axes[0].lines[0].get_ydata()) == [r["top_abs"][0] for r in result["layers"]]


def test_no_checkpoint_is_one_line(tmp_path):
    proc = run(["-m", "scripts.inspect", f"--out_dir={tmp_path}"], timeout=120)
    assert_one_line_error(proc, "no checkpoint at", "ckpt.pt")


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--batches=0"], "batches must be positive"),
        (["--batch=3"], "unknown config key 'batch'"),
        (["--device=tpu"], "device"),
        (["--json={tmp}"], "is a folder"),
        (["--png={tmp}"], "is a folder"),
        (["--out_dir={tmp}/nothing"], "no checkpoint"),
        (["--out_dir={tmp}/old"], "no training config"),
        (["--out_dir={tmp}/bad"], "recorded config does not validate here (n_embd (30) must be divisible"),
    ],
)
def test_bad_input_is_one_line(flags, needle, tmp_path, capsys):
    for name, fields in (("old", {}), ("bad", {"config": {"n_embd": 30, "n_head": 4}, "step": 5})):
        (tmp_path / name).mkdir()  # a checkpoint without the run's config, and one whose config is refused
        torch.save({"model": {}, "model_config": {}, **fields}, tmp_path / name / "ckpt.pt")
    argv = [f.format(tmp=tmp_path) for f in flags]
    assert inspect_cmd.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
