"""A prepared dataset as the prepare scripts write it and train.py reads it, without torch (the prepare scripts import
this, and a prepare that imported torch would spend seconds and hundreds of MB on nothing):

    train.bin, val.bin   flat arrays of token ids (numpy memmaps), dtype given in meta.json
    meta.json            {"tokenizer": "char" | "gpt2", "vocab_size": ..., "dtype": "uint16", "train_tokens": ...,
                         "val_tokens": ...}

The tokenizer is described in JSON (a char vocabulary is its list of characters), never pickled. Token files are
checked when opened (load_tokens: a whole number of tokens, as many as meta.json counts; check_ids: every id below
the vocabulary). dataset.py adds the batches for training.
"""

import codecs
import importlib.util
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from tqdm import tqdm

DATA_ROOT = Path(__file__).resolve().parents[1] / "data"  # the repo's data/ folder of datasets


class DataError(ValueError):
    """A dataset problem the user can fix; printed as one line."""


# ----------------------------------------------------------------------------- tokenizers


class Tokenizer:
    """Encode and decode text as described by a dataset's meta.json."""

    def __init__(self, meta: dict):
        self.meta = dict(meta)  # as meta.json (or the checkpoint) gives it
        self.kind = meta.get("tokenizer")
        self.vocab_size = int(meta["vocab_size"])
        if self.kind == "char":
            self.itos = list(meta["itos"])
            self.stoi = {ch: i for i, ch in enumerate(self.itos)}
        elif self.kind == "gpt2":
            self.enc = gpt2_encoding()
        else:
            raise DataError(f"unknown tokenizer {self.kind!r} in meta.json; expected 'char' or 'gpt2'")

    def encode(self, text: str) -> list[int]:
        if self.kind == "gpt2":
            return self.enc.encode_ordinary(text)
        missing = sorted(set(text) - self.stoi.keys())
        if missing:
            shown = "".join(missing[:20])
            raise DataError(
                f"text has {len(missing)} character(s) outside this model's vocabulary: {shown!r}; "
                "use only characters from the training text"
            )
        return [self.stoi[c] for c in text]

    def decode(self, ids) -> str:
        if self.kind == "gpt2":
            return self.enc.decode(list(ids))
        return "".join(self.itos[i] for i in ids)

    def token_bytes(self) -> list[int]:
        """The UTF-8 length of each token id's text, 0 for special tokens (GPT-2's <|endoftext|>): what bits
        per byte divides by. Exact for both tokenizers: a text's bytes are the sum over its tokens'."""
        if self.kind == "char":
            return [len(ch.encode("utf-8")) for ch in self.itos]
        special = {self.enc.encode_single_token(s) for s in self.enc.special_tokens_set}
        return [0 if i in special else len(self.enc.decode_single_token_bytes(i)) for i in range(self.vocab_size)]

    def stream_decoder(self):
        """A function of one token id -> the text it completes (BPE tokens can split a UTF-8 char)."""
        if self.kind == "char":
            return lambda i: self.itos[i]
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda i: utf8.decode(self.enc.decode_single_token_bytes(i))


def gpt2_encoding(pattern: str | None = None):
    """tiktoken's GPT-2 BPE, or a one-line DataError saying what to do when it can be neither read nor downloaded.
    pattern: the same BPE with another pre-tokenizing regex (data/encode.py's, which gives the same tokens faster).

    tiktoken reads two files (~1.5 MB) from TIKTOKEN_CACHE_DIR (default: a folder in the temp dir) and
    downloads them there when missing; offline and without them, it raises a network error."""
    import tiktoken

    try:
        if pattern is None:
            return tiktoken.get_encoding("gpt2")
        return tiktoken.Encoding(**{**gpt2_definition(), "name": "gpt2_pattern", "pat_str": pattern})
    except Exception as e:  # requests' ConnectionError / HTTPError, a hash mismatch (ValueError), a cache OSError
        cache = os.environ.get("TIKTOKEN_CACHE_DIR") or "unset"
        raise DataError(
            f"cannot load the GPT-2 BPE (no network and no cache? {type(e).__name__}): set TIKTOKEN_CACHE_DIR to a "
            f"folder holding tiktoken's cache (now {cache}), or connect to the internet once to download it"
        ) from None


R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"


def gpt2_definition() -> dict:
    """tiktoken's definition of the gpt2 encoding (tiktoken_ext.openai_public.gpt2()). r50k_base has the same ranks,
    pattern and special token in a format read ~6x faster (0.15 s instead of 0.9 on a loaded 2-core machine): its
    file is used when tiktoken's cache already holds it (never downloaded for this)."""
    import hashlib
    import tempfile

    from tiktoken_ext import openai_public

    default = os.path.join(tempfile.gettempdir(), "data-gym-cache")  # where tiktoken caches (tiktoken/load.py)
    cache = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR", default))
    if cache and os.path.isfile(os.path.join(cache, hashlib.sha1(R50K_URL.encode()).hexdigest())):
        return {**openai_public.r50k_base(), "name": "gpt2"}
    return openai_public.gpt2()


def hub_reachable() -> bool:
    """Whether the Hugging Face Hub answers at all. Its client retries a refused or timed-out connection with
    backoff for ~25 s, logging each retry, before it gives up; asking once here finds an offline machine out
    in seconds. HF_ENDPOINT, HF_HUB_ETAG_TIMEOUT (10 s) and the HTTPS_PROXY variables count, as for the client."""
    from huggingface_hub import constants  # installed with datasets and transformers

    request = urllib.request.Request(constants.ENDPOINT, method="HEAD")
    try:
        urllib.request.urlopen(request, timeout=constants.HF_HUB_ETAG_TIMEOUT).close()
    except urllib.error.HTTPError:
        return True  # an answer, even an error status, means the network is there
    except (OSError, ValueError):  # URLError, refused, timed out, a malformed proxy or endpoint
        return False
    return True


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def download(url: str, path: Path):
    """Download url to path with a progress bar; the file appears only when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {path.name}") as bar:
                while chunk := r.read(1 << 16):
                    f.write(chunk)
                    bar.update(len(chunk))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"could not download {url} ({e}); put the file at {path} yourself or pass --input") from None


# ----------------------------------------------------------------------------- reading


def dataset_dir(dataset: str, data_dir: str = "") -> Path:
    return Path(data_dir) if data_dir else DATA_ROOT / dataset


def is_prepared(folder: Path) -> bool:
    return all((folder / f).exists() for f in ("meta.json", "train.bin", "val.bin"))


def ensure_prepared(dataset: str, data_dir: str = "") -> Path:
    """The dataset's folder, running data/<dataset>/prepare.py first if data/<dataset> is not prepared yet. A
    data_dir of the user's is never prepared into: a prepare writes only into the folder made for its dataset."""
    folder = dataset_dir(dataset, data_dir)
    if is_prepared(folder):
        return folder
    script = DATA_ROOT / dataset / "prepare.py"
    if data_dir and folder.resolve() != (DATA_ROOT / dataset).resolve():
        how = f"python data/{dataset}/prepare.py --out_dir {folder}" if script.is_file() else "a data/*/prepare.py"
        raise DataError(
            f"data_dir '{folder}' has no prepared dataset (train.bin, val.bin and meta.json); nothing is written "
            f"into a folder of yours unasked: prepare it yourself ({how}), or leave out data_dir"
        )
    if not script.is_file():
        known = sorted(p.parent.name for p in DATA_ROOT.glob("*/prepare.py"))
        raise DataError(
            f"unknown dataset '{dataset}'; choose one of {', '.join(known)} or point data_dir at a prepared folder"
        )
    print(f"dataset '{dataset}' is not prepared yet: running {script.relative_to(DATA_ROOT.parent)}")
    spec = importlib.util.spec_from_file_location(f"prepare_{dataset}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.prepare(out_dir=folder)
    return folder


DTYPES = ("uint16", "uint32")


def read_meta(folder: Path) -> dict:
    try:
        meta = json.loads((Path(folder) / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {folder}/meta.json ({e}); prepare the dataset again") from None
    if not isinstance(meta, dict):
        raise DataError(f"{folder}/meta.json is not a dataset's meta.json; prepare the dataset again")
    for key in ("tokenizer", "vocab_size", "dtype"):
        if key not in meta:
            raise DataError(f"{folder}/meta.json lacks '{key}'; prepare the dataset again")
    v = meta["vocab_size"]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1 or meta["dtype"] not in DTYPES:
        raise DataError(
            f"{folder}/meta.json has vocab_size {v!r} and dtype {meta['dtype']!r} (need a positive integer and one "
            f"of {', '.join(DTYPES)}); prepare the dataset again"
        )
    return meta


def load_tokens(folder: Path, split: str, meta: dict) -> np.ndarray:
    """split.bin as a read-only memmap, refused in one line when it is not a whole number of tokens or holds another
    count than meta.json's (a meta.json written before the counts were recorded: the size alone is checked)."""
    path = Path(folder) / f"{split}.bin"
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DataError(f"cannot open {path} ({e.strerror}); prepare the dataset again") from None
    itemsize = np.dtype(meta["dtype"]).itemsize
    again = "it is truncated or damaged; prepare the dataset again"
    if size % itemsize:
        raise DataError(f"{path} is {size:,} bytes, not a whole number of {meta['dtype']} tokens: {again}")
    expected = meta.get(f"{split}_tokens")
    if expected is not None and size // itemsize != expected:
        raise DataError(f"{path} holds {size // itemsize:,} tokens but meta.json counts {expected:,}: {again}")
    if size == 0:  # an empty split (numpy cannot map an empty file)
        return np.zeros(0, dtype=meta["dtype"])
    return np.memmap(path, dtype=meta["dtype"], mode="r")


def check_ids(folder: Path, meta: dict, chunk: int = 1 << 24):
    """Every token id of train.bin and val.bin below meta.json's vocab_size, or one line. One pass over the files in
    chunks of 16M tokens (memory: one chunk; ~1 s per GB from the page cache): train.py runs it once per node."""
    vocab = meta["vocab_size"]
    for split in ("train", "val"):
        tokens = load_tokens(folder, split, meta)
        for start in range(0, len(tokens), chunk):
            part = tokens[start : start + chunk]
            if part.max() >= vocab:
                at = start + int(np.argmax(part >= vocab))
                raise DataError(
                    f"{Path(folder) / split}.bin holds token id {int(tokens[at])} at position {at:,}, but meta.json's "
                    f"vocab_size is {vocab}: the token files and meta.json do not belong together; prepare the "
                    "dataset again"
                )


def padded_vocab(meta: dict) -> int:
    """The model's vocabulary for meta's: a char vocabulary as is; a BPE one padded to a multiple of 64
    (50257 -> 50304), which makes the head's matmul faster on GPUs. The extra logits are never targets."""
    v = meta["vocab_size"]
    return v if meta["tokenizer"] == "char" else (v + 63) // 64 * 64


def vocabulary(meta: dict) -> tuple:
    """What makes two datasets' token ids mean the same: the tokenizer, its size, a char vocabulary's order."""
    return meta.get("tokenizer"), meta.get("vocab_size"), meta.get("itos"), meta.get("eot_token")


def describe_vocabulary(meta: dict) -> str:
    if meta.get("tokenizer") == "char":
        return f"a char vocabulary of {meta.get('vocab_size')} characters"
    return f"the {meta.get('tokenizer')} tokenizer ({meta.get('vocab_size')} tokens)"
