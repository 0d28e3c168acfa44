"""bench.py --vs_transformers (scripts/bench_sampling.py): our sampling beside transformers' generate on the same
weights. Timings on a shared CPU are noise: only that both sides are measured, agree and are printed is checked."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT
from test_bench import TINY, number, row

pytest.importorskip("transformers")  # CI installs it (the hf extra); a bare checkout skips


def bench_py(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "scripts.bench", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def test_sampling_beside_transformers_on_the_same_weights(tmp_path):
    """A random char-sized model (vocabulary 65): both sides at batch 1 and 3, greedy, identical tokens; the peak
    memory of sample.py and of transformers in fresh processes; the figures in the JSON file too."""
    out = tmp_path / "figures.json"
    args = [*TINY, "--block_size=32", "--synthetic", "--vocab_size=65", "--vs_transformers", "--new_tokens=12",
            "--batch=3"]  # fmt: skip
    proc = bench_py(*args, "--repeats=2", f"--json={out}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert "2 x 32, vocabulary 65, greedy, 16 + 12 tokens, CPU float32, 1 thread(s), median of 2" in text
    for b in (1, 3):
        for name in (f"batch {b}: tokens/s (wall)", f"batch {b}: tokens/s of CPU time"):
            theirs, ours, ratio = (number(c) for c in row(text, name))
            assert theirs > 0 and ours > 0 and ratio == pytest.approx(ours / theirs, rel=2e-3, abs=2e-4)
        assert number(row(text, f"batch {b}: ours / theirs, median of the pairs (wall)")[0]) > 0
    theirs, ours, _ = (number(c) for c in row(text, "peak memory, MiB (fresh process: load + sample)"))
    assert 50 < ours < 4000 and 50 < theirs < 4000
    assert row(text, "tokens identical")[0] == "yes"
    figures = json.loads(out.read_text())["figures"]
    assert figures["tokens identical"] == ["", "yes"] and figures["batch 3: tokens/s (wall)"][1] > 0


@pytest.mark.parametrize("flags,needle", [(["--new_tokens=17"], "exceed block_size 32"), (["--device=cuda"], "cuda")])
def test_bad_flags_are_one_line(flags, needle):
    proc = bench_py(*TINY, "--block_size=32", "--synthetic", "--vocab_size=65", "--vs_transformers", *flags)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr[-2000:]
    assert proc.stderr.startswith("error:") and needle in proc.stderr.lower()
