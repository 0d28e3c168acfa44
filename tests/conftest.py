"""ForwardContext fixtures: a tiny char-level dataset and a tiny CPU training config."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from gpt_residual import config, runtime  # noqa: E402

# what the supported floor (torch 2.6) lacks: torch.optim.Muon (2.9) and FSDP2 on a CPU (2.7)
needs_muon = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="optimizer=muon needs torch >= 2.9")
CPU_FSDP = runtime.torch_version() >= (2, 7)
needs_cpu_fsdp = pytest.mark.skipif(not CPU_FSDP, reason="parallel=fsdp on a CPU needs torch >= 2.7")

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\nFirst Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.\n\n"
)


def tiny_text(repeat: int = 40) -> str:
    """A few KB of text in the shape of TinyShakespeare (no network, no shared files)."""
    return TEXT * repeat


@pytest.fixture(scope="session")
def char_data(tmp_path_factory) -> Path:
    """A prepared char-level dataset folder: train.bin, val.bin, meta.json."""
    folder = tmp_path_factory.mktemp("char_data")
    (folder / "input.txt").write_text(tiny_text())
    spec = importlib.util.spec_from_file_location("prep_char", ROOT / "data/shakespeare_char/prepare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.prepare(out_dir=folder)
    return folder


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run fastest on one thread, and do not stall when other jobs share the cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # for the scripts run as subprocesses
        yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def _gpt2_bpe_or_reason():
    """(encoding, None) or (None, why): tiktoken is asked once per session, never at import or collection."""
    from gpt_residual import dataset

    try:
        return dataset.gpt2_encoding(), None
    except dataset.DataError as e:
        return None, str(e)


@pytest.fixture
def gpt2_bpe(_gpt2_bpe_or_reason):
    """tiktoken's GPT-2 BPE for the tests that need it; without its cache and offline, such a test skips
    (pytest -rs shows why) instead of failing, and the rest of the suite runs."""
    enc, why = _gpt2_bpe_or_reason
    if enc is None:
        pytest.skip(f"needs the GPT-2 BPE: {why}")
    return enc


@pytest.fixture
def offline_env(tmp_path) -> dict:
    """Environment for run(...) that sees no network and no caches: proxies on a closed local port make every
    download (tiktoken, the Hugging Face Hub) fail at once, and the caches are empty folders."""
    closed = "http://127.0.0.1:9"
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    proxies = {k: closed for k in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "ALL_PROXY")}
    no_offline_mode = {"HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": "", "HF_DATASETS_OFFLINE": ""}
    caches = {"TIKTOKEN_CACHE_DIR": str(empty), "HF_HOME": str(empty / "hf"), "NO_PROXY": "", "no_proxy": ""}
    return {**proxies, **no_offline_mode, **caches}


TINY = dict(
    n_layer=2,
    n_head=2,
    n_embd=32,
    block_size=16,
    batch_size=4,
    max_iters=20,
    eval_interval=10,
    eval_iters=2,
    log_interval=5,
    checkpoint_interval=10,
    learning_rate=3e-3,
    min_lr=3e-4,
    warmup_iters=2,
    dropout=0.0,
    device="cpu",
    compile=False,
    dtype="float32",
    bias=True,  # the tests were written for GPT-2's defaults (TrainConfig's are configs/small.py's)
    beta2=0.95,
    lr_decay_iters=0,
)


@pytest.fixture
def tiny_cfg(tmp_path, char_data):
    """make(**overrides) -> a TrainConfig for a model that trains in a second or two on a CPU."""

    def make(**overrides):
        values = {**TINY, "data_dir": str(char_data), "out_dir": str(tmp_path / "out"), **overrides}
        return config.parse_args(config.TrainConfig, [], overrides=values)

    return make


def run(args: list[str], timeout: float = 300, env: dict | None = None, cwd=ROOT, **kwargs):
    """Run a repo script as a user would: python <args>, from the repo root (or cwd); env adds to os.environ."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, **kwargs
    )


def assert_one_line_error(proc, *needles, code=2):
    """A user-facing failure: exit code, one line on stderr starting with error:, no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:")
    for needle in needles:
        assert needle in lines[0], lines[0]


def metrics_records(out_dir) -> list[dict]:
    """Every line of a run's metrics.jsonl, strictly (runlog.read forgives a partial last line; a test must not)."""
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """A test that builds a GracefulStop (train.train does) leaves its SIGINT/SIGTERM handlers installed; a later
    fork (datasets' worker pools) would inherit them, and a pool's SIGTERM would no longer end its workers."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
