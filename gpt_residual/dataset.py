"""What train.py reads of a prepared dataset: its token files in deterministic batches, on the device.

The dataset itself (meta.json, the tokenizer, the token files and their checks) is gpt_residual/tokens.py, which
needs no torch; its names are here too, so `dataset.Tokenizer`, `dataset.read_meta` and the like work as before.
"""

import queue
import threading
from pathlib import Path

import numpy as np
import torch

from gpt_residual.tokens import (  # noqa: F401  (the dataset's names, for the modules that use them from here)
    DATA_ROOT,
    DataError,
    Tokenizer,
    check_ids,
    dataset_dir,
    download,
    ensure_prepared,
    gpt2_encoding,
    hub_reachable,
    is_prepared,
    load_tokens,
    padded_vocab,
    read_meta,
    token_dtype,
)


def prepare_and_check(dataset: str, data_dir: str = "") -> Path:
    """ensure_prepared, then every id of the token files checked against the vocabulary: what one process per node
    runs before training (the others wait for it)."""
    folder = ensure_prepared(dataset, data_dir)
    check_ids(folder, read_meta(folder))
    return folder


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
