"""Your own text -> data/NAME/{train.bin, val.bin, meta.json}, ready for train.py --dataset=NAME.

    python data/text/prepare.py --input book.txt --name book                    # one char per token
    python data/text/prepare.py --input essays/ --tokenizer=gpt2 --name essays  # every *.txt below essays/
    python train.py configs/small.py --dataset=book

--input is a text file (UTF-8) or a folder: its *.txt files, recursively, in sorted order. With the char
tokenizer the files are joined with a blank line; with gpt2 (the GPT-2 BPE, as for fine-tuning GPT-2)
each is encoded on its own and the end-of-text token 50256 separates them. The last val_fraction of the
tokens becomes val.bin. --out_dir writes elsewhere (then train with --data_dir=DIR).
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for data/token_files.py and gpt_residual
from data import encode, token_files  # noqa: E402
from gpt_residual import tokens  # noqa: E402
from gpt_residual.tokens import DataError  # noqa: E402

TOKENIZERS = ("char", "gpt2")


def input_files(path: str) -> list[Path]:
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.txt") if f.is_file())
        if not files:
            raise DataError(f"folder '{p}' has no .txt files; give a text file or a folder of .txt files")
        return files
    if not p.is_file():
        raise DataError(f"input '{p}' not found; give a text file or a folder of .txt files")
    return [p]


def empty(files: list[Path]) -> DataError:
    where = f"'{files[0]}' is" if len(files) == 1 else f"all {len(files)} .txt files are"
    return DataError(f"{where} empty; give some text")


def too_few(n: int, val_fraction: float) -> DataError:
    return DataError(f"{n} tokens are too few to split with val_fraction {val_fraction}; give more text")


def joined(files: list[Path]):
    """The files' text joined by a blank line, chunk by chunk."""
    for i, f in enumerate(tqdm(files, desc="reading", unit="file", disable=len(files) < 2 or None)):
        if i:
            yield "\n\n"
        yield from encode.read_chunks(f)


def write_char(files: list[Path], folder: Path, val_fraction: float):
    """One reading for the vocabulary and the length, one to encode; the last val_fraction of tokens to val."""
    itos, n = encode.vocabulary(joined(files))
    if not "".join(itos).strip():
        raise empty(files)
    n_train = int(n * (1 - val_fraction))
    if n_train == 0 or n_train == n:
        raise too_few(n, val_fraction)
    meta = token_files.char_meta(itos)
    encoder = encode.CharEncoder(itos, tokens.token_dtype(meta["vocab_size"]))
    with token_files.DatasetWriter(folder, meta, n_train) as w:
        for ids in encoder.encode(joined(files)):
            w.write(ids)
    token_files.report(folder, w)


def write_gpt2(files: list[Path], folder: Path, val_fraction: float):
    """Each file encoded on its own, end-of-text between them, all into train.bin; then the last val_fraction of
    the tokens moves to val.bin."""
    bpe, meta = encode.BPEEncoder(), token_files.gpt2_meta()  # the BPE's one-line error before reading the files
    text_seen = []
    with token_files.DatasetWriter(folder, meta) as w:
        for i, f in enumerate(tqdm(files, desc="encoding", unit="file", disable=len(files) < 2 or None)):
            if i:  # between files: where one document ends and the next begins
                w.write(np.array([meta["eot_token"]]), "train")
            for ids in bpe.encode(watch(encode.read_chunks(f), text_seen)):
                w.write(ids, "train")
        if not text_seen:
            raise empty(files)
        total = w.files["train"].n
        n_train = int(total * (1 - val_fraction))
        if n_train == 0 or n_train == total:
            raise too_few(total, val_fraction)
        w.move_tail(n_train)
    token_files.report(folder, w)


def watch(chunks, text_seen: list):
    """The chunks, noting in text_seen whether any holds more than whitespace."""
    for chunk in chunks:
        if not text_seen and chunk.strip():
            text_seen.append(True)
        yield chunk


def prepare(
    input_path: str,
    name: str | None = None,
    tokenizer: str = "char",
    val_fraction: float = 0.1,
    out_dir: str | None = None,
) -> dict:
    """Tokenize input_path and write train.bin, val.bin and meta.json; returns the meta."""
    if tokenizer not in TOKENIZERS:
        raise DataError(f"unknown tokenizer {tokenizer!r}; choose {' or '.join(TOKENIZERS)}")
    if not 0 < val_fraction < 1:
        raise DataError(f"--val_fraction must be between 0 and 1, got {val_fraction}")
    folder = token_files.named_dataset_dir(name, out_dir)
    files = input_files(input_path)
    (write_gpt2 if tokenizer == "gpt2" else write_char)(files, folder, val_fraction)
    return tokens.read_meta(folder)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="a text file, or a folder of .txt files (recursive)")
    parser.add_argument("--name", help="dataset name: writes data/NAME, used as train.py --dataset=NAME")
    parser.add_argument("--tokenizer", default="char", help="char (one token per character) or gpt2 (BPE)")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="the last fraction of tokens for val.bin")
    parser.add_argument("--out_dir", help="write here instead of data/NAME; train with --data_dir=DIR")
    args = parser.parse_args()
    try:
        prepare(args.input, args.name, args.tokenizer, args.val_fraction, args.out_dir)
    except token_files.ERRORS as e:
        token_files.exit_with_error(e)
    how = f"--data_dir={args.out_dir}" if args.out_dir else f"--dataset={args.name}"
    print(f"train on it: python train.py configs/small.py {how}")
