"""data/text/prepare.py: a text file or a folder of them becomes a dataset train.py can use by name."""

import importlib.util
import json

import numpy as np
import pytest
from conftest import ROOT, assert_one_line_error, run, tiny_text

from gpt_residual import tokens
from gpt_residual.dataset import DataError


def load_script():
    spec = importlib.util.spec_from_file_location("prepare_text", ROOT / "data" / "text" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


text_prep = load_script()


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    """data/ in a temporary folder, so --name NAME writes there and train.py --dataset=NAME reads there."""
    root = tmp_path / "data"
    root.mkdir()
    monkeypatch.setattr(tokens, "DATA_ROOT", root)
    return root


def test_char_file_trains_by_name(tmp_path, data_root, tiny_cfg):
    src = tmp_path / "book.txt"
    src.write_text(tiny_text())
    meta = text_prep.prepare(str(src), name="book")
    folder = data_root / "book"
    ids = np.concatenate([np.fromfile(folder / f"{s}.bin", dtype=meta["dtype"]) for s in ("train", "val")])
    assert meta["tokenizer"] == "char" and "".join(meta["itos"][i] for i in ids) == tiny_text()
    assert meta["val_tokens"] == len(tiny_text()) - int(len(tiny_text()) * 0.9)

    import train  # the prepared folder is used as is: no prepare.py needed in data/book

    result = train.train(tiny_cfg(dataset="book", data_dir="", max_iters=2, eval_interval=2))
    assert np.isfinite(result["val_loss"])


def test_gpt2_folder_joins_files_with_eot(tmp_path, data_root, gpt2_bpe):
    src = tmp_path / "essays"
    (src / "b").mkdir(parents=True)
    (src / "a.txt").write_text("First essay. " * 20)
    (src / "b" / "c.txt").write_text("Third, in a subfolder. " * 20)
    (src / "b.txt").write_text("Second essay. " * 20)
    (src / "skip.md").write_text("not text")
    meta = text_prep.prepare(str(src), tokenizer="gpt2", val_fraction=0.2, out_dir=str(tmp_path / "out"))
    ids = np.concatenate([np.fromfile(tmp_path / "out" / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")])
    enc = gpt2_bpe
    want = [*enc.encode_ordinary("First essay. " * 20), 50256, *enc.encode_ordinary("Third, in a subfolder. " * 20)]
    want += [50256, *enc.encode_ordinary("Second essay. " * 20)]  # sorted paths: a.txt, b/c.txt, b.txt
    assert ids.tolist() == want and json.loads((tmp_path / "out" / "meta.json").read_text()) == meta
    assert not list(data_root.iterdir())  # --out_dir: nothing under data/


@pytest.mark.parametrize(
    "setup, kwargs, match",
    [
        (None, {"name": "x"}, "not found"),
        ("folder", {"name": "x"}, "no .txt files"),
        ("empty", {"name": "x"}, "is empty"),
        ("text", {"name": "x", "tokenizer": "bpe"}, "unknown tokenizer 'bpe'"),
        ("text", {"name": "a b"}, "--name must be a folder name"),
        ("text", {}, "give --name"),
    ],
)
def test_errors(tmp_path, data_root, setup, kwargs, match):
    src = tmp_path / "in"
    if setup == "folder":
        src.mkdir()
    elif setup:
        src.write_text("" if setup == "empty" else tiny_text())
    with pytest.raises(DataError, match=match):
        text_prep.prepare(str(src), **kwargs)


def test_cli_error_is_one_line(tmp_path):
    result = run(["data/text/prepare.py", "--input", str(tmp_path / "missing.txt"), "--name", "x"], timeout=60)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: input") and "not found" in lines[0]


def test_cli_refuses_another_datasets_folder(tmp_path):
    (tmp_path / "t.txt").write_text(tiny_text())
    result = run(["data/text/prepare.py", "--input", str(tmp_path / "t.txt"), "--name", "shakespeare_char"])
    assert result.returncode != 0 and result.stderr.strip() == (
        "error: data/shakespeare_char belongs to its own prepare.py; choose another --name"
    )


def test_cli_gpt2_offline_without_cache_is_one_line(tmp_path, offline_env):
    (tmp_path / "t.txt").write_text(tiny_text())
    args = [
        "data/text/prepare.py",
        "--input",
        str(tmp_path / "t.txt"),
        "--tokenizer=gpt2",
        "--out_dir",
        str(tmp_path / "o"),
    ]
    assert_one_line_error(run(args, env=offline_env), "cannot load the GPT-2 BPE", "set TIKTOKEN_CACHE_DIR")
