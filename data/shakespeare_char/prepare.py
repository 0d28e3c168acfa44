"""TinyShakespeare, one token per character: train.bin, val.bin (90/10 split) and meta.json.

    python data/shakespeare_char/prepare.py [--input PATH] [--out_dir DIR]

Reads --input, else data/shakespeare_char/input.txt, else downloads the canonical char-rnn file.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for data/token_files.py and gpt_residual
from data import token_files  # noqa: E402

HERE = Path(__file__).resolve().parent


def prepare(out_dir: Path = HERE, input_path: str | None = None, val_fraction: float = 0.1) -> dict:
    path = token_files.input_file(Path(out_dir), input_path)
    return token_files.prepare_text(path, Path(out_dir), "char", val_fraction)


if __name__ == "__main__":
    token_files.text_prepare_main(prepare, __doc__, HERE)
