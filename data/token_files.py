"""What the prepare scripts write with: the input text (given or downloaded), the token files (train.bin, val.bin)
written as they are encoded, meta.json (the tokenizer as JSON and each split's token count, written last) and a
prepare script's command line. What training reads of them, and how it checks them, is gpt_residual/tokens.py.

Memory is bounded by a chunk of text (data/encode.py), never the input's size. A token file is written in order
into a temp file, fsynced and renamed when complete: a full disk is one line naming the file (no memmap over a
sparse file, whose page faults on a full disk are a SIGBUS), and no temp file is left. Nothing here imports torch.
"""

import argparse
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data import encode
from gpt_residual import files, tokens
from gpt_residual.files import WriteError
from gpt_residual.tokens import DataError, download, token_dtype

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SPLITS = ("train", "val")
ERRORS = (DataError, WriteError)  # what a prepare script reports in one line


def char_meta(text: str | list[str]) -> dict:
    """A char vocabulary: the sorted characters of text (or the list vocabulary() returns)."""
    chars = sorted(set(text))
    return {"tokenizer": "char", "vocab_size": len(chars), "itos": chars}


def gpt2_meta() -> dict:
    return {"tokenizer": "gpt2", "vocab_size": 50257, "eot_token": 50256}


def input_file(folder: Path, input_path: str | None = None, url: str = SHAKESPEARE_URL) -> Path:
    """The input text's path: --input PATH, else folder/input.txt, else downloaded from url into it."""
    path = Path(input_path) if input_path else Path(folder) / "input.txt"
    if input_path is None and not path.exists():
        download(url, path)
    if not path.is_file():
        raise DataError(f"input text '{path}' not found; pass --input PATH to a text file")
    return path


def count_chars(chunks: Iterable[str], path) -> int:
    """How many characters the chunks hold; an error when they are all whitespace."""
    n, blank = 0, True
    for chunk in chunks:
        n += len(chunk)
        blank = blank and not chunk.strip()
    if blank:
        raise DataError(f"input text '{path}' is empty; give a file with some text in it")
    return n


# ----------------------------------------------------------------------------- writing


class TokenFile:
    """One token file, written in order into path.tmp and renamed to path by finish(); abort() removes the temp."""

    def __init__(self, path: Path, dtype: str):
        self.path, self.tmp, self.dtype, self.n = Path(path), Path(f"{path}.tmp"), dtype, 0
        with self.guard():
            self.f = open(self.tmp, "wb")

    def guard(self):
        return files.writing(self.path, self.path.name, after="nothing was kept", cleanup=[self.tmp])

    def write(self, ids):
        ids = np.ascontiguousarray(ids, dtype=self.dtype)
        with self.guard():
            self.f.write(ids.data)
        self.n += len(ids)

    def finish(self):
        with self.guard():
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            os.replace(self.tmp, self.path)

    def abort(self):
        try:
            self.f.close()  # may fail again flushing what a full disk refused
        except OSError:
            pass
        files.remove(self.tmp)


class DatasetWriter:
    """train.bin and val.bin written as the ids come (to one split, or to train up to n_train tokens then val),
    then meta.json with the counts: `with DatasetWriter(folder, meta, n_train) as w: w.write(ids)`. On any error
    the temp files are removed and the folder's earlier meta.json is gone, so a half-written dataset is never used."""

    def __init__(self, folder: Path, meta: dict, n_train: int | None = None):
        self.folder, self.n_train = Path(folder), n_train
        self.meta = {**meta, "dtype": token_dtype(meta["vocab_size"])}
        self.files: dict[str, TokenFile] = {}

    def __enter__(self):
        with files.writing(self.folder, f"the dataset folder {self.folder}"):
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / "meta.json").unlink(missing_ok=True)  # incomplete until the new meta.json
        self.files = {s: TokenFile(self.folder / f"{s}.bin", self.meta["dtype"]) for s in SPLITS}
        return self

    def write(self, ids, split: str | None = None):
        """ids to split, or (split None) to train until it holds n_train tokens, the rest to val."""
        if split is None:
            room = len(ids) if self.n_train is None else max(0, self.n_train - self.files["train"].n)
            if room:
                self.files["train"].write(ids[:room])
            split, ids = "val", ids[room:]
        if len(ids):
            self.files[split].write(ids)

    def move_tail(self, n_train: int):
        """Everything was written to train: move its tokens from n_train on to val (read back a chunk at a time)."""
        train, val = self.files["train"], self.files["val"]
        item = np.dtype(train.dtype).itemsize
        with train.guard():
            train.f.flush()
            with open(train.tmp, "rb") as f:
                f.seek(n_train * item)
                while block := f.read(encode.CHUNK * item):
                    val.write(np.frombuffer(block, dtype=train.dtype))
            train.f.truncate(n_train * item)
        train.n = n_train

    def __exit__(self, kind, error, tb):
        if kind is None:
            try:
                for f in self.files.values():
                    f.finish()
                self.meta.update({f"{s}_tokens": f.n for s, f in self.files.items()})
                write_meta(self.folder, self.meta)
                return False
            except BaseException:
                self.__exit__(True, None, None)
                raise
        for f in self.files.values():
            f.abort()
        return False

    def counts(self) -> tuple[int, int]:
        return self.files["train"].n, self.files["val"].n


def write_meta(folder: Path, meta: dict):
    files.write_atomic(Path(folder) / "meta.json", json.dumps(meta, indent=1))


def write_tokens(path: Path, chunks: Iterable, total: int, dtype: str, desc: str = "writing"):
    """Write an iterable of int arrays (total tokens in all) as one token file, in order, atomically."""
    out = TokenFile(Path(path), dtype)
    try:
        with tqdm(total=total, unit="tok", unit_scale=True, desc=desc, disable=None) as bar:  # None: on a terminal
            for chunk in chunks:
                out.write(chunk)
                bar.update(len(chunk))
        assert out.n == total, f"wrote {out.n} tokens, expected {total}"
        out.finish()
    except BaseException:
        out.abort()
        raise


def write_dataset(folder: Path, train_ids, val_ids, meta: dict):
    """Write train.bin, val.bin and meta.json (last, so a folder with meta.json is complete) from two id lists."""
    with DatasetWriter(folder, meta) as w:
        w.write(np.asarray(train_ids), "train")
        w.write(np.asarray(val_ids), "val")
    report(folder, w)


def report(folder: Path, w: DatasetWriter):
    n_train, n_val = w.counts()
    print(f"{folder}: {n_train:,} train and {n_val:,} val tokens, vocab {w.meta['vocab_size']:,}")


# ----------------------------------------------------------------------------- one text, split by characters


def split_chars(chunks: Iterable[str], n: int) -> tuple[Iterator[str], Iterator[str]]:
    """The first n characters of the concatenated chunks and the rest, as two iterators read in that order."""
    it, rest = iter(chunks), []

    def first():
        left = n
        for chunk in it:
            if len(chunk) >= left:
                yield chunk[:left]
                rest.append(chunk[left:])
                return
            yield chunk
            left -= len(chunk)

    def second():
        yield from rest
        yield from it

    return first(), second()


def prepare_text(path: Path, out_dir: Path, tokenizer: str, val_fraction: float = 0.1) -> dict:
    """Encode one text file into out_dir: its first (1 - val_fraction) of characters to train.bin, the rest to
    val.bin, each encoded on its own (as nanoGPT's prepare scripts do). One reading of the text counts its
    characters (char: and collects its vocabulary), one encodes it; memory: a few chunks. Returns the meta."""
    if tokenizer == "char":
        itos, n = encode.vocabulary(encode.read_chunks(path))
        if not "".join(itos).strip():
            raise DataError(f"input text '{path}' is empty; give a file with some text in it")
        meta = char_meta(itos)
        encoder = encode.CharEncoder(itos, token_dtype(meta["vocab_size"])).encode
    else:
        encoder = encode.BPEEncoder().encode  # the BPE's one-line error before reading a large file
        n, meta = count_chars(encode.read_chunks(path), path), gpt2_meta()
    train, val = split_chars(encode.read_chunks(path), int(n * (1 - val_fraction)))
    with tqdm(total=n, unit="char", unit_scale=True, desc=f"tokenizing {Path(path).name}", disable=None) as bar:
        with DatasetWriter(out_dir, meta) as w:
            for split, chunks in (("train", train), ("val", val)):
                for ids in encoder(progress(chunks, bar)):
                    w.write(ids, split)
    report(out_dir, w)
    return w.meta


def progress(chunks: Iterable[str], bar) -> Iterator[str]:
    for chunk in chunks:
        bar.update(len(chunk))
        yield chunk


# ----------------------------------------------------------------------------- folders and command lines


def named_dataset_dir(name: str | None, out_dir: str | None) -> Path:
    """Where a prepare script writes: --out_dir, else data/NAME, refusing names train.py cannot use
    (dataset=NAME) and folders that belong to another prepare script."""
    if out_dir:
        return Path(out_dir)
    if not name:
        raise DataError("give --name NAME (written to data/NAME) or --out_dir DIR")
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name) or name in (".", ".."):
        raise DataError(f"--name must be a folder name of letters, digits, '_', '.' or '-'; got {name!r}")
    if (tokens.DATA_ROOT / name / "prepare.py").exists():
        raise DataError(f"data/{name} belongs to its own prepare.py; choose another --name")
    return tokens.DATA_ROOT / name


def text_prepare_main(prepare, doc: str, here: Path):
    """The command line of a prepare script that reads one text: --input PATH and --out_dir DIR."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="text file to use instead of input.txt / the download")
    parser.add_argument("--out_dir", default=str(here), help="where to write train.bin, val.bin, meta.json")
    args = parser.parse_args()
    try:
        prepare(Path(args.out_dir), args.input)
    except ERRORS as e:
        exit_with_error(e)


def exit_with_error(e: Exception):
    """How a prepare script reports a problem the user can fix: one line on stderr, exit 2 (as train.py does)."""
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
