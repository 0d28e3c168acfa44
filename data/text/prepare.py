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

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for data/token_files.py and gpt_residual
from data import token_files  # noqa: E402
from gpt_residual import dataset  # noqa: E402
from gpt_residual.dataset import DataError  # noqa: E402

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


def read_texts(files: list[Path]) -> list[str]:
    texts = []
    for f in tqdm(files, desc="reading", unit="file", disable=len(files) < 2):
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read '{f}' as UTF-8 text: {e}") from None
    if not any(t.strip() for t in texts):
        where = f"'{files[0]}' is" if len(files) == 1 else f"all {len(files)} .txt files are"
        raise DataError(f"{where} empty; give some text")
    return texts


def encode(texts: list[str], tokenizer: str) -> tuple[list[int], dict]:
    """The token ids of all texts and the dataset's meta (tokenizer description)."""
    if tokenizer == "char":
        text = "\n\n".join(texts)
        meta = token_files.char_meta(text)
        return dataset.Tokenizer(meta).encode(text), meta
    meta = token_files.gpt2_meta()
    tok = dataset.Tokenizer(meta)
    ids: list[int] = []
    for i, text in enumerate(tqdm(texts, desc="encoding", unit="file", disable=len(texts) < 2)):
        if i:
            ids.append(meta["eot_token"])  # between files: where one document ends and the next begins
        ids.extend(tok.encode(text))
    return ids, meta


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
    if tokenizer == "gpt2":
        dataset.gpt2_encoding()  # fail now, with what to do, rather than after reading a large folder
    ids, meta = encode(read_texts(input_files(input_path)), tokenizer)
    n = int(len(ids) * (1 - val_fraction))
    if n == 0 or n == len(ids):
        raise DataError(f"{len(ids)} tokens are too few to split with val_fraction {val_fraction}; give more text")
    token_files.write_dataset(folder, ids[:n], ids[n:], meta)
    return dataset.read_meta(folder)


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
    except DataError as e:
        token_files.exit_with_error(e)
    how = f"--data_dir={args.out_dir}" if args.out_dir else f"--dataset={args.name}"
    print(f"train on it: python train.py configs/small.py {how}")
