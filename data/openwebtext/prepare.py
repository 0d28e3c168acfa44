"""OpenWebText with the GPT-2 BPE (tiktoken): train.bin, val.bin and meta.json, as in nanoGPT.

    python data/openwebtext/prepare.py [--dataset NAME] [--revision REV] [--data_files PATH_OR_GLOB]
                                       [--num_proc N] [--test_size F] [--text_field text] [--cache_dir DIR]
                                       [--out_dir DIR]

Loads the parquet files of the Hub's Skylion007/openwebtext (its auto-converted refs/convert/parquet
branch: current `datasets` releases no longer run the original loading script), or local parquet
files given by --data_files. Each document is encoded and followed by the end-of-text token 50256;
a shuffled test_size fraction of the documents becomes val.bin. The full set is ~9B tokens (~17 GB
train.bin); the downloaded parquet files and tokenized cache need tens of GB more under --cache_dir.
"""

import argparse
import glob
import importlib.util
import os
import sys
from pathlib import Path

import datasets

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for data/token_files.py and gpt_residual
from data import token_files  # noqa: E402
from gpt_residual import tokens  # noqa: E402

HERE = Path(__file__).resolve().parent
HUB_NAME = "Skylion007/openwebtext"
PARQUET_REVISION = "refs/convert/parquet"
DEFAULT_NUM_PROC = max(1, (os.cpu_count() or 2) // 2)


def _load_hf_module():
    """data/hf/prepare.py, whose loading, tokenizing and writing this script shares."""
    spec = importlib.util.spec_from_file_location("hf_prepare", HERE.parent / "hf" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["hf_prepare"] = module  # so datasets' worker processes can find encode_batch by name
    spec.loader.exec_module(module)
    return module


hf = sys.modules.get("hf_prepare") or _load_hf_module()


def prepare(
    out_dir: Path = HERE,
    dataset_name: str = HUB_NAME,
    revision: str | None = PARQUET_REVISION,
    data_files: str | None = None,
    num_proc: int = DEFAULT_NUM_PROC,
    test_size: float = 0.0005,
    seed: int = 2357,
    text_field: str = "text",
    cache_dir: str | None = None,
):
    ds = load(dataset_name, revision, data_files, num_proc, cache_dir)
    tokenize_and_write(ds, Path(out_dir), num_proc, test_size, seed, text_field)


def load(name: str, revision: str | None, data_files: str | None, num_proc: int, cache_dir: str | None):
    """The documents as one datasets.Dataset; any failure becomes a one-line DataError."""
    if data_files:
        if os.path.isdir(data_files):
            data_files = os.path.join(data_files, "**", "*.parquet")  # e.g. a snapshot of the parquet branch
        # load_dataset's own error for a glob that matches nothing is an opaque "{'train': []}"
        if "://" not in data_files and not glob.glob(data_files, recursive=True):
            raise tokens.DataError(f"no files match --data_files '{data_files}'; give a path or glob of parquet files")
        args, kwargs = ("parquet",), {"data_files": data_files}
        advice = "pass --data_files with a path or glob of parquet files"
        what = f"parquet files '{data_files}'"
    else:
        args, kwargs = (name,), {"revision": revision}
        advice = (
            f"check your network and the name, use a parquet revision such as --revision {PARQUET_REVISION}, "
            "or download the parquet files and pass --data_files 'path/*.parquet'"
        )
        what = f"{name} (revision {revision}) from the Hub"
        hf.check_hub(what, "download the parquet files and pass --data_files 'path/*.parquet'")
    return hf.load_or_fail(
        args, {**kwargs, "split": "train", "num_proc": num_proc, "cache_dir": cache_dir}, what, advice
    )


def tokenize_and_write(
    ds: datasets.Dataset,
    out_dir: Path,
    num_proc: int = DEFAULT_NUM_PROC,
    test_size: float = 0.0005,
    seed: int = 2357,
    text_field: str = "text",
) -> dict:
    """Tokenize ds in num_proc processes and write out_dir/{train,val}.bin and meta.json; returns the meta."""
    opt = hf.Options(text_field=text_field, val_fraction=test_size, seed=seed, num_proc=num_proc)
    return hf.tokenize_and_write(ds, Path(out_dir), opt)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=HUB_NAME, help="Hugging Face Hub dataset name")
    parser.add_argument("--revision", default=PARQUET_REVISION, help="Hub branch, tag or commit with parquet files")
    parser.add_argument("--data_files", help="local parquet file, glob or folder to use instead of the Hub")
    parser.add_argument("--num_proc", type=int, default=DEFAULT_NUM_PROC, help="processes for loading and tokenizing")
    parser.add_argument("--test_size", type=float, default=0.0005, help="fraction of documents for val.bin")
    parser.add_argument("--text_field", default="text", help="column holding each document's text")
    parser.add_argument("--cache_dir", help="Hugging Face datasets cache (default ~/.cache/huggingface/datasets)")
    parser.add_argument("--out_dir", default=str(HERE), help="where to write train.bin, val.bin, meta.json")
    args = parser.parse_args()
    try:
        prepare(
            Path(args.out_dir),
            args.dataset,
            args.revision,
            args.data_files,
            max(1, args.num_proc),
            args.test_size,
            text_field=args.text_field,
            cache_dir=args.cache_dir,
        )
    except token_files.ERRORS as e:
        token_files.exit_with_error(e)
