"""What train.py and sample.py read of a prepared dataset: its tokenizer, its token files, and batches of them.

A prepared dataset is a folder with three files:
    train.bin, val.bin   flat arrays of token ids (numpy memmaps), dtype given in meta.json
    meta.json            {"tokenizer": "char" | "gpt2", "vocab_size": ..., "dtype": "uint16", ...}
The tokenizer is described in JSON (a char vocabulary is its list of characters), never pickled.
"""

import codecs
import importlib.util
import json
import os
import queue
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

DATA_ROOT = Path(__file__).resolve().parents[1] / "data"  # the repo's data/ folder of datasets


class DataError(ValueError):
    """A dataset problem the user can fix; printed as one line."""


# ----------------------------------------------------------------------------- tokenizers


class Tokenizer:
    """Encode and decode text as described by a dataset's meta.json."""

    def __init__(self, meta: dict):
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


def gpt2_encoding():
    """tiktoken's GPT-2 BPE, or a one-line DataError saying what to do when it can be neither read nor downloaded.

    tiktoken reads two files (~1.5 MB) from TIKTOKEN_CACHE_DIR (default: a folder in the temp dir) and
    downloads them there when missing; offline and without them, it raises a network error."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # requests' ConnectionError / HTTPError, a hash mismatch (ValueError), a cache OSError
        cache = os.environ.get("TIKTOKEN_CACHE_DIR") or "unset"
        raise DataError(
            f"cannot load the GPT-2 BPE (no network and no cache? {type(e).__name__}): set TIKTOKEN_CACHE_DIR to a "
            f"folder holding tiktoken's cache (now {cache}), or connect to the internet once to download it"
        ) from None


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
    """The dataset's folder, running data/<dataset>/prepare.py first if it has not been prepared."""
    folder = dataset_dir(dataset, data_dir)
    if is_prepared(folder):
        return folder
    script = DATA_ROOT / dataset / "prepare.py"
    if not script.is_file():
        known = sorted(p.parent.name for p in DATA_ROOT.glob("*/prepare.py"))
        where = f"'{folder}' has no train.bin/val.bin/meta.json and " if data_dir else ""
        raise DataError(
            f"{where}unknown dataset '{dataset}'; choose one of {', '.join(known)} "
            "or point data_dir at a prepared folder"
        )
    print(f"dataset '{dataset}' is not prepared yet: running {script.relative_to(DATA_ROOT.parent)}")
    spec = importlib.util.spec_from_file_location(f"prepare_{dataset}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.prepare(out_dir=folder)
    return folder


def read_meta(folder: Path) -> dict:
    try:
        meta = json.loads((Path(folder) / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {folder}/meta.json ({e}); prepare the dataset again") from None
    for key in ("tokenizer", "vocab_size", "dtype"):
        if key not in meta:
            raise DataError(f"{folder}/meta.json lacks '{key}'; prepare the dataset again")
    return meta


def load_tokens(folder: Path, split: str, meta: dict) -> np.ndarray:
    path = Path(folder) / f"{split}.bin"
    if path.stat().st_size == 0:  # an empty split (numpy cannot map an empty file)
        return np.zeros(0, dtype=meta["dtype"])
    return np.memmap(path, dtype=meta["dtype"], mode="r")


class BatchSampler:
    """Deterministic batches of (x, y) windows of one split, a pure function of (seed, sample index).

    Epoch e cuts the tokens into windows of block_size + 1 starting at a random offset and visits
    each window once, in an order fixed by (seed, e): sampling without replacement. Sample k of the
    endless sequence is window k % n of epoch k // n. A batch is B consecutive samples: micro-batch g
    holds samples [g*B, (g+1)*B). Training reads by sample position (micro_batches), so a run resumed
    with another batch_size or number of processes goes on from the same sample. Nothing here is random
    state that needs saving: a resumed run asks for the same samples and gets the same batches.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int, name: str = "data"):
        self.tokens, self.T, self.B, self.seed = tokens, block_size, batch_size, seed
        self.n = (len(tokens) - block_size) // block_size  # windows per epoch (for any offset)
        if self.n < 1:
            raise DataError(
                f"{name} has {len(tokens)} tokens, too few for block_size {block_size}; "
                "lower block_size or give more text"
            )
        self._epochs: dict[int, tuple[int, np.ndarray]] = {}

    def _epoch(self, e: int):
        if e not in self._epochs:
            rng = np.random.default_rng([self.seed, e])
            self._epochs = {e: (int(rng.integers(self.T)), rng.permutation(self.n))}  # keep one epoch
        return self._epochs[e]

    def window_starts(self, first: int, rows: int | None = None) -> np.ndarray:
        """Token offsets of samples first, first + 1, ..., first + B - 1 (or of `rows` samples)."""
        out = np.empty(rows or self.B, dtype=np.int64)
        for i, k in enumerate(range(first, first + len(out))):
            shift, perm = self._epoch(k // self.n)
            out[i] = shift + perm[k % self.n] * self.T
        return out

    def starts(self, g: int) -> np.ndarray:
        """Start offsets of the B windows of micro-batch g."""
        return self.window_starts(g * self.B)

    def read(self, first: int, pin: bool = False, rows: int | None = None) -> torch.Tensor:
        """Samples [first, first + B) as a (B, T + 1) tensor in the tokens' own narrow dtype (uint16 for
        vocabularies up to 65,536): a quarter of the bytes of int64 to copy to the device. rows: fewer."""
        idx = self.window_starts(first, rows)[:, None] + np.arange(self.T + 1)
        data = torch.from_numpy(self.tokens[idx])
        return data.pin_memory() if pin else data

    def get(self, g: int, device: str = "cpu", rows: int | None = None):
        """Micro-batch g as (x, y) on device (its first `rows` samples only, when given)."""
        return to_device(self.read(g * self.B, device.startswith("cuda"), rows), device)

    def estimate_samples(self, batches: int) -> int:
        """How many samples a loss estimate of `batches` batches reads: that many batches' worth, or, when
        the split holds fewer windows, each window of epoch 0 once. Those are the split's non-overlapping
        windows from one offset: the estimate is then the loss over the whole split (all but < block_size
        tokens at each end), exact, and cheaper than reading windows twice."""
        return min(batches * self.B, self.n)

    def describe_estimate(self, batches: int) -> str:
        """'the whole split (7 batches)' or '20 fixed batches': what estimate_samples reads."""
        samples = self.estimate_samples(batches)
        if samples < batches * self.B:
            return f"the whole split ({-(-samples // self.B)} batches)"
        return f"{batches} fixed batches"


def to_device(data: torch.Tensor, device: str):
    """A (B, T + 1) batch of narrow token ids -> (x, y), int64 on device (widened there, after the copy)."""
    data = data.to(device, non_blocking=True).long()
    return data[:, :-1], data[:, 1:]


def micro_batches(sampler: BatchSampler, first: int, rank: int, world: int, device: str, ahead: int = 0):
    """The training micro-batches from sample `first` on, endlessly: rank r's micro-step m of each step
    reads samples first + (m * world + r) * B onwards, so ranks never read the same sample and together
    read what one process with world times the micro-steps would. With ahead > 0 a background thread
    gathers and pins that many batches ahead of the training step (for GPUs); the order is the same."""
    step = world * sampler.B

    def positions():
        k = first + rank * sampler.B
        while True:
            yield k
            k += step

    pin = device.startswith("cuda")
    host = (sampler.read(k, pin) for k in positions())
    if ahead:
        host = prefetch(host, ahead)
    for data in host:
        yield to_device(data, device)


def prefetch(items, depth: int):
    """Yield the items of an iterator in order, computed by a daemon thread up to depth items ahead."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = threading.Event()

    def work():
        try:
            for item in items:
                while not done.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if done.is_set():
                    return
        except BaseException as e:  # re-raised in the consumer
            q.put(e)

    threading.Thread(target=work, daemon=True).start()
    try:
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        done.set()
