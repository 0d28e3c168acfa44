"""dataset.py and the prepare scripts: round trips, dtypes, the batch sampler and the one-line errors."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import ROOT, assert_one_line_error, run, tiny_text

from data import token_files
from gpt_residual import dataset
from gpt_residual.dataset import BatchSampler, DataError, Tokenizer

TEXT = tiny_text(3) + "Ünïcödé — ‘quotes’ 日本語 ✓\n"


def load_prepare(name: str):
    spec = importlib.util.spec_from_file_location(f"prepare_{name}_test", ROOT / "data" / name / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_split(folder, split, meta):
    return dataset.load_tokens(folder, split, meta).tolist()


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- prepare scripts


def test_prepare_char_round_trip(tmp_path, text_file):
    out = tmp_path / "char"
    load_prepare("shakespeare_char").prepare(out_dir=out, input_path=str(text_file))
    meta = dataset.read_meta(out)
    assert meta["tokenizer"] == "char" and meta["dtype"] == "uint16"
    assert meta["itos"] == sorted(set(TEXT)) and meta["vocab_size"] == len(set(TEXT))
    assert dataset.load_tokens(out, "train", meta).dtype == np.uint16
    train, val = read_split(out, "train", meta), read_split(out, "val", meta)
    tok = Tokenizer(meta)
    assert tok.decode(train) + tok.decode(val) == TEXT
    assert len(train) == int(len(TEXT) * 0.9) and len(train) + len(val) == len(TEXT)
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    assert tok.encode(TEXT) == train + val
    assert not list(out.glob("*.tmp"))  # written atomically, nothing left over


def test_prepare_bpe_round_trip(tmp_path, text_file, gpt2_bpe):
    out = tmp_path / "bpe"
    load_prepare("shakespeare").prepare(out_dir=out, input_path=str(text_file))
    meta = dataset.read_meta(out)
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and meta["dtype"] == "uint16"
    train, val = read_split(out, "train", meta), read_split(out, "val", meta)
    tok = Tokenizer(meta)
    assert tok.decode(train) + tok.decode(val) == TEXT
    assert tok.decode(train) == TEXT[: int(len(TEXT) * 0.9)]
    assert max(train + val) < 50257 and len(train) > len(val)


def test_prepare_bpe_offline_without_cache_is_one_line(tmp_path, text_file, offline_env):
    """No network and an empty tiktoken cache: one line that says to set TIKTOKEN_CACHE_DIR or connect."""
    proc = run(
        ["data/shakespeare/prepare.py", "--input", str(text_file), "--out_dir", str(tmp_path / "out")], env=offline_env
    )
    assert_one_line_error(proc, "cannot load the GPT-2 BPE", "set TIKTOKEN_CACHE_DIR", "or connect")
    assert not (tmp_path / "out" / "meta.json").exists()


@pytest.mark.parametrize("name", ["shakespeare_char", "shakespeare"])
def test_prepare_empty_text(tmp_path, name):
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n")
    with pytest.raises(DataError, match="empty"):
        load_prepare(name).prepare(out_dir=tmp_path / "out", input_path=str(empty))
    assert not (tmp_path / "out" / "meta.json").exists()


@pytest.mark.parametrize("name", ["shakespeare_char", "shakespeare"])
def test_prepare_missing_input(tmp_path, name):
    with pytest.raises(DataError, match="not found"):
        load_prepare(name).prepare(out_dir=tmp_path / "out", input_path=str(tmp_path / "missing.txt"))


def test_prepare_cli_missing_input(tmp_path):
    missing = str(tmp_path / "missing.txt")
    proc = run(["data/shakespeare_char/prepare.py", "--input", missing, "--out_dir", str(tmp_path / "out")])
    assert_one_line_error(proc, "not found", missing)  # exit 2, as train.py's user errors


def test_prepare_cli_writes_dataset(tmp_path, text_file):
    out = tmp_path / "out"
    proc = run(["data/shakespeare_char/prepare.py", "--input", str(text_file), "--out_dir", str(out)])
    assert proc.returncode == 0, proc.stderr
    assert dataset.is_prepared(out)


# ----------------------------------------------------------------------------- dtypes and files


def test_token_dtype():
    assert dataset.token_dtype(65) == "uint16"
    assert dataset.token_dtype(50257) == "uint16"
    assert dataset.token_dtype(2**16) == "uint16"  # ids 0..65535 fit
    assert dataset.token_dtype(2**16 + 1) == "uint32"
    assert dataset.token_dtype(70000) == "uint32"


def test_write_dataset_large_vocab(tmp_path):
    train, val = [0, 1, 65535, 65536, 69999, 5], [69998, 70000 - 1, 3]
    token_files.write_dataset(tmp_path, train, val, {"tokenizer": "char", "vocab_size": 70000, "itos": []})
    meta = dataset.read_meta(tmp_path)
    assert meta["dtype"] == "uint32"
    assert (tmp_path / "train.bin").stat().st_size == 4 * len(train)
    assert dataset.load_tokens(tmp_path, "train", meta).dtype == np.uint32
    assert read_split(tmp_path, "train", meta) == train
    assert read_split(tmp_path, "val", meta) == val


def test_write_dataset_small_vocab(tmp_path):
    token_files.write_dataset(tmp_path, [1, 2, 64], [3], {"tokenizer": "char", "vocab_size": 65, "itos": []})
    meta = dataset.read_meta(tmp_path)
    assert meta["dtype"] == "uint16" and (tmp_path / "train.bin").stat().st_size == 2 * 3
    assert read_split(tmp_path, "train", meta) == [1, 2, 64]


def test_read_meta_errors(tmp_path):
    with pytest.raises(DataError, match="meta.json"):
        dataset.read_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="meta.json"):
        dataset.read_meta(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"tokenizer": "char", "vocab_size": 3}))
    with pytest.raises(DataError, match="dtype"):
        dataset.read_meta(tmp_path)


# ----------------------------------------------------------------------------- BatchSampler


def tokens(n=1000):
    return np.arange(n, dtype=np.uint16)  # token i is i: a window's start is its first token


def test_sampler_shapes_and_shift():
    toks = (np.arange(1000) * 7 % 65).astype(np.uint16)
    s = BatchSampler(toks, block_size=8, batch_size=5, seed=0)
    for g in (0, 3, 500):
        x, y = s.get(g)
        assert x.shape == y.shape == (5, 8) and x.dtype == y.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row, start in zip(range(5), s.starts(g)):
            assert x[row].tolist() == toks[start : start + 8].tolist()
            assert y[row].tolist() == toks[start + 1 : start + 9].tolist()


def test_sampler_deterministic():
    a, b = BatchSampler(tokens(), 8, 4, seed=1), BatchSampler(tokens(), 8, 4, seed=1)
    c = BatchSampler(tokens(), 8, 4, seed=2)
    for g in (0, 1, 7, 100, 3):  # any order: a pure function of (seed, g)
        assert torch.equal(a.get(g)[0], b.get(g)[0])
    assert all(not torch.equal(a.get(g)[0], c.get(g)[0]) for g in range(5))  # another seed, other batches


def test_sampler_epoch_visits_every_window_once():
    T, B = 8, 4
    s = BatchSampler(tokens(1000), T, B, seed=3)
    n = s.n
    assert n == (1000 - T) // T
    starts = np.concatenate([s.starts(g) for g in range(n // B)])
    assert len(set(starts.tolist())) == len(starts) == n // B * B
    assert ((starts - starts[0]) % T == 0).all()  # one offset per epoch, windows do not overlap
    assert starts.min() >= 0 and starts.max() + T + 1 <= 1000
    # B=1 covers the epoch exactly: every window once
    one = BatchSampler(tokens(1000), T, 1, seed=3)
    assert sorted(np.concatenate([one.starts(g) for g in range(n)]).tolist()) == sorted(
        (one.starts(0)[0] % T + T * np.arange(n)).tolist()
    )
    # the next epoch is a different order
    second = [s.starts(g).tolist() for g in range(n // B, 2 * (n // B))]
    first = [s.starts(g).tolist() for g in range(n // B)]
    assert first != second


def test_sampler_windows_stay_in_bounds_over_epochs():
    s = BatchSampler(tokens(100), 8, 3, seed=4)
    for g in range(200):  # ~18 epochs, each with its own offset
        x, y = s.get(g)
        starts = torch.from_numpy(s.starts(g))
        assert starts.min() >= 0 and starts.max() + 8 + 1 <= 100
        assert torch.equal(x, starts[:, None] + torch.arange(8)) and torch.equal(y, x + 1)  # token i is i


def test_sampler_ranks_partition_the_batches():
    W, k = 2, 10
    s = BatchSampler(tokens(1000), 8, 4, seed=5)
    ranks = [[s.starts(i * W + r) for i in range(k)] for r in range(W)]
    r0 = set(np.concatenate(ranks[0]).tolist())
    r1 = set(np.concatenate(ranks[1]).tolist())
    assert r0.isdisjoint(r1)
    single = set(np.concatenate([s.starts(g) for g in range(W * k)]).tolist())
    assert r0 | r1 == single
    # a fresh sampler on another "process" agrees
    other = BatchSampler(tokens(1000), 8, 4, seed=5)
    assert all((other.starts(i * W + 1) == ranks[1][i]).all() for i in range(k))


def test_a_small_split_is_estimated_whole_each_window_once():
    """When eval_iters batches would hold more windows than the split has, the estimate reads each window of
    epoch 0 once: the split's non-overlapping windows from one offset, the last batch partial."""
    T, B = 8, 4
    s = BatchSampler(tokens(1000), T, B, seed=6)
    assert s.estimate_samples(5) == 20 and s.describe_estimate(5) == "5 fixed batches"
    samples = s.estimate_samples(1000)
    assert samples == s.n == 124 and s.describe_estimate(1000) == "the whole split (31 batches)"
    rows = [s.read(g * B, rows=min(B, samples - g * B)) for g in range(-(-samples // B))]
    starts = sorted(torch.cat(rows)[:, 0].tolist())  # token i is i: a window's first token is its start
    assert starts == [starts[0] + T * i for i in range(s.n)] and starts[0] < T  # every window once
    assert starts[-1] + T + 1 > 1000 - T  # ... up to the end, but for fewer than block_size tokens
    partial = BatchSampler(tokens(1000 - 2 * T), T, B, seed=6)  # 122 windows: 30 batches of 4 and one of 2
    assert partial.get(30, rows=2)[0].shape == (2, T)


def test_sampler_too_short():
    with pytest.raises(DataError, match="val split"):
        BatchSampler(tokens(15), 8, 2, seed=0, name="val split")
    BatchSampler(tokens(16), 8, 2, seed=0)  # exactly one window of 9 fits with any offset < 8


# ----------------------------------------------------------------------------- ensure_prepared


def test_ensure_prepared_unknown_dataset():
    with pytest.raises(DataError) as e:
        dataset.ensure_prepared("nope")
    msg = str(e.value)
    assert "nope" in msg and "shakespeare_char" in msg and "shakespeare," in msg


def test_ensure_prepared_uses_prepared_data_dir(char_data):
    assert dataset.ensure_prepared("anything", str(char_data)) == char_data


def test_ensure_prepared_runs_prepare_in_its_own_folder(tmp_path, monkeypatch):
    """A dataset not prepared yet is prepared by its script into data/<dataset>, the folder made for it."""
    from gpt_residual import tokens

    root = tmp_path / "data"
    (root / "shakespeare_char").mkdir(parents=True)
    (root / "shakespeare_char" / "prepare.py").write_text((ROOT / "data/shakespeare_char/prepare.py").read_text())
    (root / "shakespeare_char" / "input.txt").write_text(tiny_text(2))
    monkeypatch.setattr(tokens, "DATA_ROOT", root)
    folder = dataset.ensure_prepared("shakespeare_char")
    assert folder == root / "shakespeare_char" and dataset.is_prepared(folder)
    assert dataset.read_meta(folder)["vocab_size"] == len(set(tiny_text(2)))


def test_a_data_dir_of_yours_is_never_prepared_into(tmp_path):
    """A --data_dir without meta.json is the user's folder: refused in one line that says how to prepare it, and
    nothing in it is touched (shakespeare_char's prepare used to run into it and replace its token files)."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "input.txt").write_text(tiny_text(2))
    (folder / "train.bin").write_bytes(b"my own tokens")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    proc = run(["train.py", "--dataset=shakespeare_char", f"--data_dir={folder}", f"--out_dir={tmp_path / 'out'}",
                "--device=cpu", "--max_iters=1"])  # fmt: skip
    assert_one_line_error(proc, str(folder), f"python data/shakespeare_char/prepare.py --out_dir {folder}")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_train_cli_unknown_dataset(tmp_path):
    proc = run(["train.py", "--dataset=nope", f"--out_dir={tmp_path / 'out'}", "--device=cpu"])
    assert_one_line_error(proc, "nope", "shakespeare_char")


# ----------------------------------------------------------------------------- tokenizers


def test_char_tokenizer():
    tok = Tokenizer(token_files.char_meta("hello world"))
    assert tok.vocab_size == len(set("hello world"))
    assert tok.decode(tok.encode("low hero")) == "low hero"
    with pytest.raises(DataError) as e:
        tok.encode("hellZ")
    assert "'Z'" in str(e.value) and "1 character" in str(e.value)
    decode = tok.stream_decoder()
    assert "".join(decode(i) for i in tok.encode("hello")) == "hello"


def test_unknown_tokenizer():
    with pytest.raises(DataError, match="tokenizer"):
        Tokenizer({"tokenizer": "sentencepiece", "vocab_size": 10})


def test_gpt2_stream_decoder_reassembles_utf8(gpt2_bpe):
    text = "héllo wörld 日本 ✓ 🙂 Ünïcödé"
    tok = Tokenizer(token_files.gpt2_meta())
    ids = tok.encode(text)
    assert len(ids) > len(text.split())
    # some token must split a character, or this test would not test anything
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    decode = tok.stream_decoder()
    pieces = [decode(i) for i in ids]
    assert "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)
    assert tok.decode(ids) == text


def test_write_dataset_empty_split_has_no_phantom_token(tmp_path):
    """An empty split is written as an empty file that meta.json counts as 0 tokens, not as a one-token file
    (numpy cannot map 0 bytes, so write_tokens writes the file itself)."""
    meta = {"tokenizer": "char", "vocab_size": 5, "itos": list("abcde")}
    token_files.write_dataset(tmp_path, [1, 2, 3], [], meta)
    meta = dataset.read_meta(tmp_path)
    assert (meta["train_tokens"], meta["val_tokens"]) == (3, 0)
    assert (tmp_path / "val.bin").stat().st_size == 0
    assert read_split(tmp_path, "train", meta) == [1, 2, 3]
    assert not list(tmp_path.glob("*.tmp"))
