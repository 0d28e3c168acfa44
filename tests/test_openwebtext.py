"""data/openwebtext/prepare.py on a small local parquet dataset of the same shape (offline)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, run

datasets = pytest.importorskip("datasets")  # in requirements.txt; the guard is for machines without it

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "data" / "openwebtext" / "prepare.py"
EOT = 50256


def load_script():
    spec = importlib.util.spec_from_file_location("prepare_openwebtext", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


owt = load_script()
from gpt_residual.dataset import DataError  # noqa: E402  (importable once the script has put the repo root on sys.path)


def documents(n=200):
    # varied lengths, unicode, an empty document, and text that looks like a special token
    docs = [f"Document {i}: " + "the quick brown fox, ünïcödé ✓ " * (i % 5) for i in range(n)]
    docs[3], docs[7] = "", "literal <|endoftext|> stays text"
    return docs


def write_parquet(folder: Path, docs: list[str], column="text") -> str:
    folder.mkdir(parents=True, exist_ok=True)
    half = len(docs) // 2  # two files, so the glob matters
    datasets.Dataset.from_dict({column: docs[:half]}).to_parquet(str(folder / "part-0.parquet"))
    datasets.Dataset.from_dict({column: docs[half:]}).to_parquet(str(folder / "part-1.parquet"))
    return str(folder / "*.parquet")


def test_prepare_from_local_parquet(tmp_path, gpt2_bpe):
    docs = documents()
    out = tmp_path / "out"
    owt.prepare(
        out_dir=out,
        data_files=write_parquet(tmp_path / "src", docs),
        num_proc=2,
        test_size=0.1,
        cache_dir=str(tmp_path / "cache"),
    )

    enc = gpt2_bpe
    meta = json.loads((out / "meta.json").read_text())
    train = np.memmap(out / "train.bin", dtype=np.uint16, mode="r")
    val = np.memmap(out / "val.bin", dtype=np.uint16, mode="r")
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and meta["dtype"] == "uint16"
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    assert len(train) + len(val) == sum(len(enc.encode_ordinary(d)) + 1 for d in docs)
    assert train[-1] == EOT and val[-1] == EOT and 0 < len(val) < len(train)

    def split_docs(tokens):  # the documents of one split: the text between EOT tokens
        ends = np.flatnonzero(tokens == EOT)
        starts = np.concatenate([[0], ends[:-1] + 1])
        return [enc.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends)]

    train_docs, val_docs = split_docs(np.asarray(train)), split_docs(np.asarray(val))
    assert len(val_docs) == 20  # ceil(0.1 * 200) documents
    assert sorted(train_docs + val_docs) == sorted(docs)  # every document exactly once, in some order


def test_missing_text_field_names_the_columns(tmp_path):
    files = write_parquet(tmp_path / "src", documents(10), column="body")
    with pytest.raises(DataError, match="no 'text' column.*body"):
        owt.prepare(out_dir=tmp_path / "out", data_files=files, num_proc=1, cache_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "out" / "meta.json").exists()


def test_missing_text_field_in_tokenize_and_write(tmp_path):
    ds = datasets.Dataset.from_dict({"content": ["a", "b"], "url": ["u", "v"]})
    with pytest.raises(DataError, match="content, url"):
        owt.tokenize_and_write(ds, tmp_path / "out", num_proc=1)


@pytest.mark.parametrize("pattern", ["nonexistent/*.parquet", "nonexistent/one.parquet"])
def test_nonexistent_data_files(tmp_path, pattern):
    with pytest.raises(DataError, match="--data_files"):
        owt.prepare(out_dir=tmp_path / "out", data_files=str(tmp_path / pattern), cache_dir=str(tmp_path / "cache"))


def test_unreadable_parquet_is_a_data_error(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(DataError, match="could not load parquet files"):
        owt.prepare(out_dir=tmp_path / "out", data_files=str(bad), num_proc=1, cache_dir=str(tmp_path / "cache"))


def test_cli_bad_path_prints_one_line_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "data/openwebtext/prepare.py", "--data_files", str(tmp_path / "missing" / "*.parquet")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--data_files" in lines[0]


def test_cli_offline_without_bpe_cache_is_one_line(tmp_path, offline_env):
    files = write_parquet(tmp_path / "src", documents(10))
    args = ["data/openwebtext/prepare.py", "--data_files", files, "--num_proc", "1", "--out_dir", str(tmp_path / "out")]
    args += ["--cache_dir", str(tmp_path / "cache")]
    env = {**offline_env, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}  # datasets' "Generating train split" bar
    assert_one_line_error(run(args, env=env), "cannot load the GPT-2 BPE", "set TIKTOKEN_CACHE_DIR")


def test_cli_hub_without_network_is_one_line(tmp_path, offline_env):
    """No network: one line at once, not after the Hub client's ~25 s of logged retries."""
    args = ["data/openwebtext/prepare.py", "--out_dir", str(tmp_path / "out")]
    assert_one_line_error(run(args, env=offline_env), "no network to the Hugging Face Hub", "--data_files")
