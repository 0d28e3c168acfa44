"""What the prepare scripts use to write a dataset: the input text (read or downloaded), the token files
(train.bin, val.bin: flat memmaps, written atomically), meta.json (the tokenizer, as JSON) and a prepare
script's command line. What training reads of them is gpt_residual/tokens.py.
"""

import argparse
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gpt_residual import dataset
from gpt_residual.dataset import DataError, download, token_dtype

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def char_meta(text: str) -> dict:
    chars = sorted(set(text))
    return {"tokenizer": "char", "vocab_size": len(chars), "itos": chars}


def gpt2_meta() -> dict:
    return {"tokenizer": "gpt2", "vocab_size": 50257, "eot_token": 50256}


def read_text(folder: Path, input_path: str | None = None, url: str = SHAKESPEARE_URL) -> str:
    """The input text: --input PATH, else folder/input.txt, else downloaded from url into it."""
    path = Path(input_path) if input_path else Path(folder) / "input.txt"
    if input_path is None and not path.exists():
        download(url, path)
    if not path.is_file():
        raise DataError(f"input text '{path}' not found; pass --input PATH to a text file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read input text '{path}': {e}") from None
    if not text.strip():
        raise DataError(f"input text '{path}' is empty; give a file with some text in it")
    return text


def write_tokens(path: Path, chunks, total: int, dtype: str, desc: str = "writing"):
    """Write an iterable of int arrays (total tokens in all) as one flat memmap, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    if total == 0:  # numpy cannot map an empty file
        tmp.write_bytes(b"")
        os.replace(tmp, path)
        return
    arr = np.memmap(tmp, dtype=dtype, mode="w+", shape=(total,))
    pos = 0
    with tqdm(total=total, unit="tok", unit_scale=True, desc=desc) as bar:
        for chunk in chunks:
            arr[pos : pos + len(chunk)] = chunk
            pos += len(chunk)
            bar.update(len(chunk))
    assert pos == total, f"wrote {pos} tokens, expected {total}"
    arr.flush()
    del arr
    os.replace(tmp, path)


def write_dataset(folder: Path, train_ids, val_ids, meta: dict):
    """Write train.bin, val.bin and meta.json (last, so a folder with meta.json is complete)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "dtype": token_dtype(meta["vocab_size"])}
    for split, ids in (("train", train_ids), ("val", val_ids)):
        ids = np.asarray(ids, dtype=meta["dtype"])
        write_tokens(folder / f"{split}.bin", [ids], len(ids), meta["dtype"], desc=f"writing {split}.bin")
        meta[f"{split}_tokens"] = len(ids)
    write_meta(folder, meta)
    n_train, n_val = meta["train_tokens"], meta["val_tokens"]
    print(f"{folder}: {n_train:,} train and {n_val:,} val tokens, vocab {meta['vocab_size']:,}")


def write_meta(folder: Path, meta: dict):
    tmp = Path(folder) / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, Path(folder) / "meta.json")


def named_dataset_dir(name: str | None, out_dir: str | None) -> Path:
    """Where a prepare script writes: --out_dir, else data/NAME, refusing names train.py cannot use
    (dataset=NAME) and folders that belong to another prepare script."""
    if out_dir:
        return Path(out_dir)
    if not name:
        raise DataError("give --name NAME (written to data/NAME) or --out_dir DIR")
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name) or name in (".", ".."):
        raise DataError(f"--name must be a folder name of letters, digits, '_', '.' or '-'; got {name!r}")
    if (dataset.DATA_ROOT / name / "prepare.py").exists():
        raise DataError(f"data/{name} belongs to its own prepare.py; choose another --name")
    return dataset.DATA_ROOT / name


def text_prepare_main(prepare, doc: str, here: Path):
    """The command line of a prepare script that reads one text: --input PATH and --out_dir DIR."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="text file to use instead of input.txt / the download")
    parser.add_argument("--out_dir", default=str(here), help="where to write train.bin, val.bin, meta.json")
    args = parser.parse_args()
    try:
        prepare(Path(args.out_dir), args.input)
    except DataError as e:
        exit_with_error(e)


def exit_with_error(e: Exception):
    """How a prepare script reports a problem the user can fix: one line on stderr, exit 2 (as train.py does)."""
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
