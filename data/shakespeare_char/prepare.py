"""TinyShakespeare, one token per character: train.bin, val.bin (90/10 split) and meta.json.

    python data/shakespeare_char/prepare.py [--input PATH] [--out_dir DIR]

Reads --input, else data/shakespeare_char/input.txt, else downloads the canonical char-rnn file.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for data/token_files.py and gpt_residual
from data import token_files  # noqa: E402

HERE = Path(__file__).resolve().parent


def prepare(out_dir: Path = HERE, input_path: str | None = None, val_fraction: float = 0.1):
    text = token_files.read_text(Path(out_dir), input_path)
    meta = token_files.char_meta(text)
    stoi = {ch: i for i, ch in enumerate(meta["itos"])}
    ids = [stoi[c] for c in text]
    n = int(len(ids) * (1 - val_fraction))
    token_files.write_dataset(out_dir, ids[:n], ids[n:], meta)


if __name__ == "__main__":
    token_files.text_prepare_main(prepare, __doc__, HERE)
