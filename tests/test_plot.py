"""plot.py: metrics.jsonl of several runs -> one PNG; one-line errors for runs it cannot read."""

import json
import math

import pytest
from conftest import ROOT, run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(folder, steps=40, scale=1.0, partial_last_line=False):
    folder.mkdir(parents=True)
    lines = []
    for step in range(0, steps + 1, 5):
        if step:
            lr = 1e-3 * min(1, step / 10)
            lines.append({"step": step, "loss": scale * 4 * math.exp(-step / 20), "lr": lr, "tokens_per_sec": 1e4})
        if step % 10 == 0:
            lines.append({"step": step, "train_loss": scale * 4 * math.exp(-step / 20), "val_loss": scale * 4.1})
    lines.append({"step": 20, "grad_attn": [0.1, 0.2], "rms": [1.0, 1.1, 1.2]})  # telemetry: not plotted
    text = "".join(json.dumps(r) + "\n" for r in lines)
    (folder / "metrics.jsonl").write_text(text + ('{"step": 45, "lo' if partial_last_line else ""))


def test_two_runs_one_png(tmp_path):
    pytest.importorskip("matplotlib")  # in requirements-dev.txt; the guard is for a training-only install
    write_run(tmp_path / "a")
    write_run(tmp_path / "b", scale=1.2, partial_last_line=True)
    out = tmp_path / "plots" / "x.png"
    result = run(["-m", "scripts.plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)], timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 10_000


def test_png_goes_into_the_first_run_folder(tmp_path):
    """Without --out the PNG lands in the first run's folder (not the current directory) and its path is printed."""
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "a")
    write_run(tmp_path / "b", scale=1.2)
    args = ["-m", "scripts.plot", str(tmp_path / "a"), str(tmp_path / "b")]
    result = run(args, timeout=120, cwd=tmp_path, env={"PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    png = tmp_path / "a" / "loss.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert result.stdout.strip().splitlines()[-1] == f"wrote {png}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # nothing written where it was run
    assert not (tmp_path / "b" / "loss.png").exists()


def test_missing_and_empty_metrics_are_one_line_errors(tmp_path):
    write_run(tmp_path / "good")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    for bad, match in [("nope", "not found (no such folder)"), ("empty", "has no loss records")]:
        out = str(tmp_path / "x.png")
        result = run(["-m", "scripts.plot", str(tmp_path / "good"), str(tmp_path / bad), "--out", out])
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0]
    assert not (tmp_path / "x.png").exists()


def test_metrics_read_is_the_one_reader(tmp_path):
    """runlog.read, which plot.py, bench.py and study.py share: a killed run's partial last line is skipped,
    a damaged line anywhere else and a missing file are one-line ValueErrors, an empty log is no records."""
    from gpt_residual import runlog

    write_run(tmp_path / "a", partial_last_line=True)
    records = runlog.read(tmp_path / "a")
    assert len(records) == 14 and records[-1] == {"step": 20, "grad_attn": [0.1, 0.2], "rms": [1.0, 1.1, 1.2]}
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("\n")
    assert runlog.read(tmp_path / "empty") == []
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "a" / "metrics.jsonl").write_text("\n".join([lines[0], '{"step": 5, "lo', *lines[1:]]))
    with pytest.raises(ValueError, match="line 2 is not a metrics record"):
        runlog.read(tmp_path / "a")
    with pytest.raises(ValueError, match="not found"):
        runlog.read(tmp_path / "nope")


def test_bits_per_byte_panel(tmp_path):
    """--metric=bpb plots the estimates' bits per byte (default bpb.png); a run that logged none is a one-line error."""
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "old")
    for name, scale in (("char", 1.0), ("bpe", 0.8)):
        write_run(tmp_path / name, scale=scale)
        path = tmp_path / name / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        for r in records:
            if "val_loss" in r:
                r.update(train_bpb=r["train_loss"] / math.log(2), val_bpb=r["val_loss"] / math.log(2))
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    from scripts import plot

    train, evals = plot.read_metrics(tmp_path / "char", "bpb")
    assert plot.series(evals, "val_bpb")[1] == [r["val_loss"] / math.log(2) for _, r in sorted(evals.items())]
    result = run(["-m", "scripts.plot", str(tmp_path / "char"), str(tmp_path / "bpe"), "--metric=bpb"], timeout=120)
    assert result.returncode == 0, result.stderr
    png = tmp_path / "char" / "bpb.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and not (tmp_path / "char" / "loss.png").exists()
    result = run(["-m", "scripts.plot", str(tmp_path / "char"), str(tmp_path / "old"), "--metric=bpb"])
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "no bits per byte" in lines[0] and "old" in lines[0]
