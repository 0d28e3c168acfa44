"""data/hf/prepare.py on small local parquet, json and text datasets (offline)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, run

datasets = pytest.importorskip("datasets")  # in requirements.txt; the guard is for machines without it

REPO = Path(__file__).resolve().parents[1]
EOT = 50256


def load_script():
    if "hf_prepare" in sys.modules:  # loaded by data/openwebtext/prepare.py already
        return sys.modules["hf_prepare"]
    spec = importlib.util.spec_from_file_location("hf_prepare", REPO / "data" / "hf" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["hf_prepare"] = module
    spec.loader.exec_module(module)
    return module


hf = load_script()
from gpt_residual.dataset import DataError  # noqa: E402  (importable once the script has put the repo root on sys.path)


def documents(n=120):
    docs = [f"Story {i}: once upon a time, ünïcödé ✓ " + "and then " * (i % 6) for i in range(n)]
    docs[5] = "literal <|endoftext|> stays text"
    return docs


def read(out: Path):
    meta = json.loads((out / "meta.json").read_text())
    load = lambda split: np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])
    return meta, load("train"), load("val")


def split_docs(enc, tokens):
    """The complete documents of a split (the text before each EOT)."""
    ends = np.flatnonzero(tokens == EOT)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [enc.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends)]


@pytest.fixture
def parquet_glob(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    docs = documents()
    datasets.Dataset.from_dict({"text": docs[:60], "n": list(range(60))}).to_parquet(str(src / "a.parquet"))
    datasets.Dataset.from_dict({"text": docs[60:], "n": list(range(60, 120))}).to_parquet(str(src / "b.parquet"))
    return str(src / "*.parquet")


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(documents())))
    return str(path)


def test_parquet_glob(tmp_path, parquet_glob, gpt2_bpe):
    out = tmp_path / "out"
    meta = hf.prepare(parquet_glob, out_dir=str(out), num_proc=2, val_fraction=0.1, cache_dir=str(tmp_path / "c"))
    meta, train, val = read(out)
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and meta["dtype"] == "uint16"
    assert meta["source"] == {"dataset": parquet_glob, "subset": None, "split": "train", "text_field": "text"}
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    assert len(train) + len(val) == sum(len(gpt2_bpe.encode_ordinary(d)) + 1 for d in documents())
    train_docs, val_docs = split_docs(gpt2_bpe, train), split_docs(gpt2_bpe, val)
    assert len(val_docs) == 12 and sorted(train_docs + val_docs) == sorted(documents())


def test_max_tokens_without_streaming_cuts_what_is_written(tmp_path, jsonl, gpt2_bpe):
    meta = hf.prepare(jsonl, out_dir=str(tmp_path / "out"), num_proc=1, max_tokens=500, cache_dir=str(tmp_path / "c"))
    assert (meta["train_tokens"], meta["val_tokens"]) == (495, 5)  # val: 1% of 500


def test_streaming_stops_at_max_tokens(tmp_path, jsonl, gpt2_bpe):
    meta = hf.prepare(jsonl, out_dir=str(tmp_path / "out"), streaming=True, max_tokens=1000, val_fraction=0.1)
    meta, train, val = read(tmp_path / "out")
    assert (len(train), len(val)) == (meta["train_tokens"], meta["val_tokens"]) == (900, 100)
    # the stream is read in order: each split's complete documents are the dataset's, in order
    order = {d: i for i, d in enumerate(documents())}
    for docs in (split_docs(gpt2_bpe, train), split_docs(gpt2_bpe, val)):
        assert docs and [order[d] for d in docs] == sorted(order[d] for d in docs)
    seen = split_docs(gpt2_bpe, train) + split_docs(gpt2_bpe, val)
    assert max(order[d] for d in seen) < 60  # stopped early: did not read it all


def test_streaming_everything(tmp_path, jsonl, gpt2_bpe):
    meta = hf.prepare(jsonl, out_dir=str(tmp_path / "out"), streaming=True, val_fraction=0.2, num_proc=2)
    _, train, val = read(tmp_path / "out")
    assert sorted(split_docs(gpt2_bpe, train) + split_docs(gpt2_bpe, val)) == sorted(documents())
    assert meta["train_tokens"] + meta["val_tokens"] == sum(len(gpt2_bpe.encode_ordinary(d)) + 1 for d in documents())


def test_char_tokenizer_and_text_folder(tmp_path):
    src = tmp_path / "books"
    (src / "sub").mkdir(parents=True)
    (src / "one.txt").write_text("hello world\nsecond line\n" * 20)
    (src / "sub" / "two.txt").write_text("zebra quartz\n" * 30)
    (src / "notes.md").write_text("ignored")
    meta = hf.prepare(
        str(src),
        out_dir=str(tmp_path / "out"),
        tokenizer="char",
        val_fraction=0.5,
        num_proc=1,
        cache_dir=str(tmp_path / "c"),
    )
    meta, train, val = read(tmp_path / "out")
    assert meta["tokenizer"] == "char" and "".join(meta["itos"]) == "".join(
        sorted(set("hello world second line zebra quartz\n"))
    )
    itos = meta["itos"]
    texts = sorted("".join(itos[i] for i in split) for split in (train, val))  # two files: one document each
    assert texts == sorted(["hello world\nsecond line\n" * 20 + "\n\n", "zebra quartz\n" * 30 + "\n\n"])


def test_missing_text_field_names_the_columns(tmp_path, jsonl, parquet_glob):
    with pytest.raises(DataError, match="no 'body' column; its columns are text, n"):
        hf.prepare(parquet_glob, out_dir=str(tmp_path / "a"), text_field="body", num_proc=1, cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="no 'body' column; its columns are text, id"):
        hf.prepare(jsonl, out_dir=str(tmp_path / "b"), text_field="body", streaming=True)
    with pytest.raises(DataError, match="column 'id' does not hold text"):
        hf.prepare(jsonl, out_dir=str(tmp_path / "c"), text_field="id", num_proc=1, cache_dir=str(tmp_path))
    assert not any((tmp_path / d / "meta.json").exists() for d in "abc")
    assert not list(tmp_path.glob("b/*.tmp"))


def test_bad_sources_and_options(tmp_path):
    with pytest.raises(DataError, match="no data files"):
        hf.prepare(str(tmp_path / "missing" / "*.parquet"), out_dir=str(tmp_path / "out"))
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(DataError, match="could not load json files"):
        hf.prepare(str(tmp_path / "x.json"), out_dir=str(tmp_path / "out"), num_proc=1, cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="unknown tokenizer 'bpe'"):
        hf.prepare(str(tmp_path / "x.json"), tokenizer="bpe")
    with pytest.raises(DataError, match="own prepare.py"):
        hf.prepare(str(tmp_path / "x.json"), name="shakespeare")


def test_default_names():
    assert hf.default_name("roneneldan/TinyStories", None) == "tinystories"
    assert hf.default_name("HuggingFaceFW/fineweb-edu", "sample-10BT") == "fineweb-edu_sample-10bt"
    assert hf.default_name("shards/*.parquet", None) == "shards"
    assert hf.default_name("/tmp/docs.jsonl", None) == "docs"


def run_cli(*args, **env):
    return subprocess.run(
        [sys.executable, "data/hf/prepare.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def test_cli_unknown_dataset_is_one_line_offline():
    result = run_cli("--dataset", "no-such-org/no-such-dataset", HF_HUB_OFFLINE="1")  # offline: fail at once
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not load 'no-such-org/no-such-dataset'"), lines
    assert "network" in lines[0]


def test_cli_missing_field_is_one_line(tmp_path, jsonl):
    result = run_cli("--dataset", jsonl, "--text_field", "body", "--out_dir", str(tmp_path / "out"), "--streaming")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: the dataset has no 'body' column")


def test_cli_gpt2_offline_without_cache_is_one_line(tmp_path, jsonl, offline_env):
    """The local documents load; the BPE does not: one line, before any tokenizing process starts."""
    args = ["data/hf/prepare.py", "--dataset", jsonl, "--out_dir", str(tmp_path / "out"), "--num_proc", "1"]
    env = {**offline_env, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}  # datasets' "Generating train split" bar
    assert_one_line_error(run(args, env=env), "cannot load the GPT-2 BPE", "set TIKTOKEN_CACHE_DIR")
    assert not (tmp_path / "out" / "meta.json").exists()


def test_cli_hub_dataset_without_network_is_one_line(tmp_path, offline_env):
    """No network: one line at once, not after the Hub client's ~25 s of logged retries."""
    args = ["data/hf/prepare.py", "--dataset", "roneneldan/TinyStories", "--out_dir", str(tmp_path / "out")]
    assert_one_line_error(run(args, env=offline_env), "no network to the Hugging Face Hub", "HF_HUB_OFFLINE=1")
