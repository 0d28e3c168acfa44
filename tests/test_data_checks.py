"""Damaged or mismatched data is refused in one line before training, not trained on or crashed late: token files
checked when opened (size, count, every id below the vocabulary), and a resume that would read other token ids or
run another context than its checkpoint's."""

import json
import shutil

import numpy as np
import pytest
from conftest import TINY, assert_one_line_error, run, tiny_text

import train
from data import token_files
from gpt_residual import checkpoint, dataset, run_dir
from gpt_residual.dataset import DataError


@pytest.fixture
def data(tmp_path, char_data):
    """A copy of the char dataset to damage."""
    return shutil.copytree(char_data, tmp_path / "data")


def train_cli(data, tmp_path, *extra):
    flags = [f"--{k}={v}" for k, v in {**TINY, "data_dir": data, "out_dir": tmp_path / "out"}.items()]
    return run(["train.py", *flags, *extra], timeout=300)


def truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def test_truncated_to_an_odd_size(data, tmp_path):
    """numpy's traceback before: a uint16 file of an odd number of bytes."""
    truncate(data / "train.bin", (data / "train.bin").stat().st_size - 1)
    proc = train_cli(data, tmp_path)
    assert_one_line_error(proc, "train.bin is", "not a whole number of uint16 tokens", "prepare the dataset again")


def test_truncated_to_an_even_size(data, tmp_path):
    """Trained silently on what was left before; meta.json's count says it is not the whole file."""
    n = dataset.read_meta(data)["train_tokens"]
    truncate(data / "train.bin", n // 20 * 2)
    proc = train_cli(data, tmp_path)
    assert_one_line_error(proc, f"train.bin holds {n // 20:,} tokens but meta.json counts {n:,}")
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_an_old_meta_json_without_counts_is_still_checked(data, tmp_path):
    meta = dataset.read_meta(data)
    del meta["train_tokens"], meta["val_tokens"]
    (data / "meta.json").write_text(json.dumps(meta))
    truncate(data / "val.bin", (data / "val.bin").stat().st_size - 1)
    assert_one_line_error(train_cli(data, tmp_path), "val.bin is", "not a whole number")


@pytest.mark.parametrize("damage", ["an id past the vocabulary", "meta.json's vocabulary too small"])
def test_ids_at_or_past_the_vocabulary(data, tmp_path, damage):
    """An IndexError at step 24 (or at the first eval) before; now one line at start, naming the id and where."""
    meta = dataset.read_meta(data)
    ids = np.memmap(data / "train.bin", dtype=meta["dtype"], mode="r+")
    if damage == "an id past the vocabulary":
        ids[5000] = bad = meta["vocab_size"] + 3
        ids.flush()
        at, vocab = 5000, meta["vocab_size"]
    else:  # the largest id of train.bin no longer fits
        bad = vocab = int(ids.max())
        at = int(np.argmax(ids == vocab))
        (data / "meta.json").write_text(json.dumps({**meta, "vocab_size": vocab, "itos": meta["itos"][:vocab]}))
    del ids
    proc = train_cli(data, tmp_path)
    assert_one_line_error(proc, f"train.bin holds token id {bad} at position {at:,}", f"vocab_size is {vocab}")
    assert "step 0" not in proc.stdout and not (tmp_path / "out" / "ckpt.pt").exists()  # refused before any step


def test_check_ids_reads_in_chunks(tmp_path):
    """The scan is chunked (memory: one chunk), and finds an id past the vocabulary in any chunk."""
    meta = {"tokenizer": "char", "vocab_size": 50, "itos": [chr(65 + i) for i in range(50)]}
    ids = np.arange(10_000) % 50
    ids[7777] = 50
    token_files.write_dataset(tmp_path, ids[:9000], ids[9000:], meta)
    with pytest.raises(DataError, match="holds token id 50 at position 7,777"):
        dataset.check_ids(tmp_path, dataset.read_meta(tmp_path), chunk=1000)


def test_a_resume_on_another_vocabulary_is_refused(tmp_path, tiny_cfg, char_data):
    """Same dataset name, another data_dir whose characters differ: the ids would mean other characters."""
    train.train(tiny_cfg(max_iters=10))
    other = tmp_path / "other"
    token_files.write_dataset(other, list(range(5)) * 300, list(range(5)) * 30, token_files.char_meta("vwxyz"))
    with pytest.raises(checkpoint.CheckpointError) as e:
        train.train(tiny_cfg(max_iters=20, init_from="resume", data_dir=str(other)))
    msg = str(e.value)
    n = len(set(tiny_text()))
    assert f"trained on a char vocabulary of {n} characters" in msg and "a char vocabulary of 5 characters" in msg
    assert f"--data_dir={char_data}" in msg


def test_a_resume_on_a_reordered_vocabulary_of_the_same_size_is_refused(tiny_cfg, tmp_path):
    train.train(tiny_cfg(max_iters=10))
    meta = dataset.read_meta(tiny_cfg().data_dir)
    chars = meta["itos"][::-1]  # the same characters, other ids
    other = tmp_path / "reordered"
    token_files.write_dataset(other, [1, 2, 3] * 400, [3, 2, 1] * 40, {**meta, "itos": chars})
    with pytest.raises(checkpoint.CheckpointError, match="but .*meta.json has another char vocabulary of"):
        train.train(tiny_cfg(max_iters=20, init_from="resume", data_dir=str(other)))


def test_a_fine_tuned_run_resumed_with_another_block_size_is_refused(tmp_path, tiny_cfg, gpt2_bpe):
    """A fine-tuned model's shape is GPT-2's, but its context is the run's: another block_size crashed (larger) or
    trained on (smaller) before."""
    from test_pretrained import bpe_dataset, save_hf  # a small random GPT-2 in Hugging Face format

    src = tmp_path / "hf"
    save_hf(src, vocab_size=50257)
    common = dict(data_dir=str(bpe_dataset(tmp_path / "bpe")), eval_interval=2)
    train.train(tiny_cfg(init_from=str(src), max_iters=2, block_size=16, **common))
    for other in (8, 32):
        with pytest.raises(checkpoint.CheckpointError, match=f"block_size=16 but the config says {other}"):
            train.train(tiny_cfg(init_from="resume", max_iters=4, block_size=other, **common))
    assert train.train(tiny_cfg(init_from="resume", max_iters=4, block_size=16, **common))["step"] == 4


def test_check_resume_without_a_tokenizer_record_passes():
    """A checkpoint without a tokenizer record is not refused for it; token counts are not the vocabulary."""
    saved = {"model_config": {}, "config": {"dataset": "d"}, "data": {"dataset": "d"}}
    cfg = type("C", (), {"dataset": "d", "data_dir": "", "init_from": "resume", "optimizer": "adamw"})()
    run_dir.check_resume(cfg, saved, {"tokenizer": "char", "vocab_size": 3, "itos": list("abc")})
    saved["tokenizer"] = json.dumps({"tokenizer": "char", "vocab_size": 3, "itos": list("abc"), "train_tokens": 9})
    run_dir.check_resume(cfg, saved, {"tokenizer": "char", "vocab_size": 3, "itos": list("abc"), "train_tokens": 5})
    with pytest.raises(checkpoint.CheckpointError, match="another char vocabulary of 3"):
        run_dir.check_resume(cfg, saved, {"tokenizer": "char", "vocab_size": 3, "itos": list("abd")})
