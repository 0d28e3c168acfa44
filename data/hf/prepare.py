"""Any Hugging Face text dataset -> data/NAME/{train.bin, val.bin, meta.json}, tokenized in parallel.

    python data/hf/prepare.py --dataset roneneldan/TinyStories                       # -> data/tinystories
    python data/hf/prepare.py --dataset HuggingFaceFW/fineweb-edu --subset sample-10BT \\
                              --streaming --max_tokens 100_000_000 --name fineweb_edu_100M
    python data/hf/prepare.py --dataset 'shards/*.parquet' --name mine              # local parquet/json/csv/txt
    python train.py configs/small.py --dataset=tinystories                           # then train on it

--dataset is a Hub name or a local file, folder or glob (parquet, json/jsonl, csv, or txt: one document
per file). Each document is encoded with the GPT-2 BPE (tiktoken) and followed by the end-of-text token
50256, or, with --tokenizer=char (not with --streaming), one token per character and followed by a blank
line. A val_fraction of the documents (shuffled) goes to val.bin. Without --streaming the whole split is
downloaded and tokenized in --num_proc processes (--max_tokens then only cuts what is written); with it,
documents are read as they arrive and reading stops once --max_tokens tokens (train + val) are written.
"""

import argparse
import glob
import itertools
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for data/token_files.py and gpt_residual
from data import token_files  # noqa: E402
from gpt_residual import tokens  # noqa: E402
from gpt_residual.tokens import DataError  # noqa: E402

DEFAULT_NUM_PROC = max(1, (os.cpu_count() or 2) // 2)
LOCAL_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text"}
CHAR_SEP = "\n\n"  # after each document with the char tokenizer


# ----------------------------------------------------------------------------- loading


def local_files(path: str) -> tuple[str, list[str]] | None:
    """(builder, files) when path is a local file, folder or glob; None when it is a Hub name."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.suffix in LOCAL_BUILDERS and f.is_file())
    elif any(c in path for c in "*?["):
        files = sorted(f for f in glob.glob(str(p), recursive=True) if os.path.isfile(f))
    elif p.is_file() or p.suffix in LOCAL_BUILDERS or path.startswith((".", "/", "~")):
        files = [str(p)] if p.is_file() else []
    else:
        return None
    if not files:
        raise DataError(
            f"no data files at '{path}'; give a Hub name or a parquet/json/jsonl/csv/txt file, folder or glob"
        )
    kinds = {LOCAL_BUILDERS.get(Path(f).suffix) for f in files}
    if len(kinds) > 1 or None in kinds:
        raise DataError(
            f"'{path}' matches files of several or unknown kinds; give files of one kind ({', '.join(LOCAL_BUILDERS)})"
        )
    return kinds.pop(), files


def check_hub(what: str, local_alternative: str):
    """A DataError at once when the Hub cannot be reached (its client would retry for ~25 s); with
    HF_HUB_OFFLINE=1, datasets reads its cache instead, so nothing is checked."""
    if not datasets.config.HF_HUB_OFFLINE and not tokens.hub_reachable():
        raise DataError(
            f"could not load {what}: no network to the Hugging Face Hub; connect, set HF_HUB_OFFLINE=1 to use a "
            f"cached copy, or {local_alternative}"
        )


def load_or_fail(args: tuple, kwargs: dict, what: str, advice: str):
    """datasets.load_dataset(*args, **kwargs); any failure becomes a one-line DataError."""
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # loading fails in many ways (ConnectionError, FileNotFoundError, DatasetNotFoundError,
        # ArrowInvalid, ValueError for a split, ...); all mean "this source cannot be read", said in one line
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise DataError(f"could not load {what} ({type(e).__name__}: {first}); {advice}") from None


def load(name: str, subset=None, split="train", streaming=False, revision=None, num_proc=1, cache_dir=None):
    """One split of a Hub dataset or of local files: a datasets.Dataset, or an IterableDataset when streaming."""
    local = local_files(name)
    if local:
        builder, files = local
        args, kwargs = (builder,), {"data_files": files}
        if builder == "text":
            kwargs["sample_by"] = "document"  # a text file is one document, not one per line
        what, advice = f"{builder} files '{name}'", f"check that they are valid {builder} files"
    else:
        args, kwargs = (name, subset), {"revision": revision}
        what = f"'{name}'" + (f" (subset {subset})" if subset else "") + f" split '{split}' from the Hugging Face Hub"
        advice = (
            "check the name, --subset and --split, and your network (HF_HUB_OFFLINE=1 allows only cached "
            "datasets), or give local parquet/json/txt files as --dataset"
        )
        check_hub(what, "give local parquet/json/txt files as --dataset")
    if not streaming:
        kwargs["num_proc"] = num_proc
    return load_or_fail(args, {**kwargs, "split": split, "streaming": streaming, "cache_dir": cache_dir}, what, advice)


# ----------------------------------------------------------------------------- tokenizing


def encode_batch(batch: dict, text_field: str, itos: str | None = None, num_threads: int = 1) -> dict:
    """GPT-2 BPE ids of each document + EOT, or (itos given) char ids of each document + a blank line."""
    texts = [t or "" for t in batch[text_field]]
    if itos is None:
        enc = tokens.gpt2_encoding()  # per worker process; tiktoken caches it, so this is cheap after the first call
        # encode_ordinary ignores special tokens written in the text; EOT marks where each document ends
        ids = [x + [enc.eot_token] for x in enc.encode_ordinary_batch(texts, num_threads=num_threads)]
    else:  # itos is sorted, so a character's id is where its code point falls among them
        points = np.array([ord(c) for c in itos])
        ids = [np.searchsorted(points, np.frombuffer((t + CHAR_SEP).encode("utf-32-le"), np.uint32)) for t in texts]
    return {"ids": ids, "len": [len(x) for x in ids]}


def chars_batch(batch: dict, text_field: str) -> dict:
    return {"chars": ["".join(set("".join(t or "" for t in batch[text_field])))]}


def char_vocab_meta(chars) -> dict:
    itos = sorted(set("".join(chars)) | set(CHAR_SEP))
    return {"tokenizer": "char", "vocab_size": len(itos), "itos": itos}


def check_text_field(columns, text_field: str, text_like: bool = True):
    if columns is not None and text_field not in columns:
        raise DataError(
            f"the dataset has no '{text_field}' column; its columns are {', '.join(columns)}; pass --text_field NAME"
        )
    if not text_like:
        raise DataError(f"column '{text_field}' does not hold text; pass --text_field NAME of a text column")


def caps(max_tokens: int, val_fraction: float) -> dict:
    """The most tokens each split may take: max_tokens in all (0: no limit)."""
    if not max_tokens:
        return {"train": None, "val": None}
    val = max(1, round(max_tokens * val_fraction))
    return {"train": max_tokens - val, "val": val}


def finish(out_dir: Path, meta: dict, source: dict | None) -> dict:
    if not meta["train_tokens"] or not meta["val_tokens"]:
        raise DataError(
            f"got {meta['train_tokens']} train and {meta['val_tokens']} val tokens; give more documents, "
            "a larger --max_tokens or a larger --val_fraction"
        )
    if source:
        meta["source"] = source
    token_files.write_meta(out_dir, meta)  # last, so a folder with meta.json is complete
    n_train, n_val = meta["train_tokens"], meta["val_tokens"]
    print(f"{out_dir}: {n_train:,} train and {n_val:,} val tokens, vocab {meta['vocab_size']:,}")
    return meta


@dataclass
class Options:
    text_field: str = "text"  # column holding each document's text
    tokenizer: str = "gpt2"  # "gpt2" (BPE, vocab 50257) | "char"
    val_fraction: float = 0.01  # fraction of the documents for val.bin
    max_tokens: int = 0  # stop after this many tokens, train + val (0: all)
    seed: int = 2357  # seed of the train/val split
    num_proc: int = DEFAULT_NUM_PROC  # processes (threads when streaming) for tokenizing

    def __post_init__(self):
        if self.tokenizer not in ("gpt2", "char"):
            raise DataError(f"unknown tokenizer {self.tokenizer!r}; choose gpt2 or char")
        if not 0 < self.val_fraction < 1:
            raise DataError(f"the fraction of documents for val.bin must be in (0, 1), got {self.val_fraction}")
        if self.max_tokens < 0 or self.num_proc < 1:
            raise DataError(f"need --max_tokens >= 0 and --num_proc >= 1, got {self.max_tokens}, {self.num_proc}")


def tokenize_and_write(ds: datasets.Dataset, out_dir: Path, opt: Options, source: dict | None = None) -> dict:
    """Tokenize ds in opt.num_proc processes and write out_dir/{train,val}.bin and meta.json; returns the meta."""
    check_text_field(ds.column_names, opt.text_field)
    feature = ds.features[opt.text_field]
    check_text_field(ds.column_names, opt.text_field, getattr(feature, "dtype", None) in ("string", "large_string"))
    try:
        splits = ds.train_test_split(test_size=opt.val_fraction, seed=opt.seed, shuffle=True)
    except ValueError as e:  # too few documents
        raise DataError(f"cannot split {len(ds)} documents with val_fraction {opt.val_fraction}: {e}") from None
    kw = dict(batched=True, remove_columns=ds.column_names, num_proc=min(opt.num_proc, len(ds)))
    itos = None
    if opt.tokenizer == "char":
        chars = ds.map(chars_batch, fn_kwargs={"text_field": opt.text_field}, desc="finding the characters", **kw)
        meta = char_vocab_meta(chars["chars"])
        itos = "".join(meta["itos"])
    else:
        tokens.gpt2_encoding()  # a missing BPE fails here, in one line, rather than in every tokenizing process
        meta = token_files.gpt2_meta()
    meta["dtype"] = tokens.token_dtype(meta["vocab_size"])
    # storing ids as uint16 in the map's cache files keeps them 4x smaller than the default int64;
    # Sequence rather than List, which datasets < 4 lacks
    features = datasets.Features(
        {"ids": datasets.Sequence(datasets.Value(meta["dtype"])), "len": datasets.Value("int64")}
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    limit = caps(opt.max_tokens, opt.val_fraction)
    for split, part in (("train", splits["train"]), ("val", splits["test"])):
        kw = dict(batched=True, remove_columns=part.column_names, num_proc=min(opt.num_proc, len(part)))
        fn_kwargs = {"text_field": opt.text_field, "itos": itos}
        encoded = part.map(encode_batch, fn_kwargs=fn_kwargs, features=features, desc=f"tokenizing {split}", **kw)
        encoded = encoded.with_format("arrow")
        total = pc.sum(encoded["len"]).as_py() or 0
        total = total if limit[split] is None else min(total, limit[split])
        # a batch of documents at a time, so memory stays bounded however many tokens there are
        chunks = (pc.list_flatten(batch["ids"]).to_numpy() for batch in encoded.iter(batch_size=4096))
        path, dtype = out_dir / f"{split}.bin", meta["dtype"]
        token_files.write_tokens(path, take(chunks, total), total, dtype, desc=f"writing {split}.bin")
        meta[f"{split}_tokens"] = total
    return finish(out_dir, meta, source)


def take(chunks, n: int):
    """The first n tokens of an iterable of arrays."""
    for chunk in chunks:
        if n <= 0:
            return
        yield chunk[:n]
        n -= len(chunk)


# ----------------------------------------------------------------------------- streaming


def stream_and_write(ds, out_dir: Path, opt: Options, source: dict | None = None) -> dict:
    """Read an IterableDataset document by document into out_dir/{train,val}.bin until max_tokens (0: all)."""
    if opt.tokenizer == "char":
        raise DataError("--tokenizer=char reads every document to find its characters first; drop --streaming")

    rows = iter(ds)
    first = next(rows, None)
    if first is None:
        raise DataError("the dataset has no documents; check --dataset, --subset and --split")
    check_text_field(list(first), opt.text_field, isinstance(first.get(opt.text_field), (str, type(None))))
    documents = (row[opt.text_field] or "" for row in itertools.chain([first], rows))
    meta = token_files.gpt2_meta()
    meta["dtype"] = tokens.token_dtype(meta["vocab_size"])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)  # the folder is incomplete until the new meta.json
    limit, rng = caps(opt.max_tokens, opt.val_fraction), np.random.default_rng(opt.seed)
    files = {s: token_files.TokenFile(out_dir / f"{s}.bin", meta["dtype"]) for s in ("train", "val")}
    full = lambda s: limit[s] is not None and files[s].n >= limit[s]
    try:
        with tqdm(total=opt.max_tokens or None, unit="tok", unit_scale=True, desc="streaming") as bar:
            for batch in batched(documents, 1024):  # tiktoken encodes a batch in num_proc threads
                for ids in encode_batch({"text": batch}, "text", None, opt.num_proc)["ids"]:
                    split = "val" if rng.random() < opt.val_fraction else "train"
                    if full(split):
                        split = "train" if split == "val" else "val"
                    room = None if limit[split] is None else limit[split] - files[split].n
                    ids = np.asarray(ids, dtype=meta["dtype"])[:room]
                    files[split].write(ids)
                    bar.update(len(ids))
                if full("train") and full("val"):
                    break
        for f in files.values():
            f.finish()
    except BaseException:  # no half-written files left behind (Ctrl-C, network error, a full disk, ...)
        for f in files.values():
            f.abort()
        raise
    for s, f in files.items():
        meta[f"{s}_tokens"] = f.n
    return finish(out_dir, meta, source)


def batched(items, n: int):
    it = iter(items)  # itertools.batched from Python 3.12
    while batch := list(itertools.islice(it, n)):
        yield batch


# ----------------------------------------------------------------------------- command line


def default_name(name: str, subset: str | None) -> str:
    """roneneldan/TinyStories -> tinystories; shards/*.parquet -> shards; docs.jsonl -> docs."""
    path = Path(re.split(r"[*?\[]", name)[0].rstrip("/") or "dataset")  # a glob's fixed part
    base = path.stem if path.suffix in LOCAL_BUILDERS else path.name
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", base + (f"_{subset}" if subset else "")).strip("_.").lower() or "dataset"


def prepare(
    source: str,
    name=None,
    out_dir=None,
    subset=None,
    split="train",
    streaming=False,
    revision=None,
    cache_dir=None,
    **options,
) -> dict:
    """Load source (a Hub name or local files), tokenize and write data/NAME or out_dir; returns the meta."""
    opt = Options(**options)
    folder = token_files.named_dataset_dir(name or default_name(source, subset), out_dir)
    ds = load(source, subset, split, streaming, revision, opt.num_proc, cache_dir)
    info = {"dataset": source, "subset": subset, "split": split, "text_field": opt.text_field}
    return (stream_and_write if streaming else tokenize_and_write)(ds, folder, opt, info)


def count(text: str) -> int:
    """100_000_000, 1e8 -> 100000000."""
    return int(float(text)) if re.fullmatch(r"[0-9.]+e[0-9]+", text.lower()) else int(text)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--dataset",
        dest="source",
        metavar="NAME_OR_PATH",
        required=True,
        help="Hub name (ORG/NAME) or local file, folder or glob",
    )
    p.add_argument("--subset", help="the dataset's configuration, e.g. sample-10BT for FineWeb-Edu")
    p.add_argument("--split", default="train", help="which split to read")
    p.add_argument("--text_field", default="text", help="column holding each document's text")
    p.add_argument("--tokenizer", default="gpt2", help="gpt2 (BPE, vocab 50257) or char")
    p.add_argument("--streaming", action="store_true", help="read documents as they arrive; stop at --max_tokens")
    p.add_argument("--max_tokens", type=count, default=0, help="stop after this many tokens, train + val (0: all)")
    p.add_argument("--val_fraction", type=float, default=0.01, help="fraction of documents for val.bin")
    p.add_argument("--name", help="write data/NAME (default: from --dataset); train with --dataset=NAME")
    p.add_argument("--out_dir", help="write here instead of data/NAME; train with --data_dir=OUT_DIR")
    p.add_argument("--num_proc", type=int, default=DEFAULT_NUM_PROC, help="processes for loading and tokenizing")
    p.add_argument("--seed", type=int, default=2357, help="seed of the train/val split")
    p.add_argument("--revision", help="Hub branch, tag or commit")
    p.add_argument("--cache_dir", help="Hugging Face datasets cache (default ~/.cache/huggingface/datasets)")
    try:
        prepare(**vars(p.parse_args()))
    except token_files.ERRORS as e:
        token_files.exit_with_error(e)
