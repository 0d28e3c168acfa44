"""HellaSwag, and any multiple-choice file in its format, scored "completion style" (llm.c, build-nanogpt).

A file holds one JSON object per line with at least
    ctx       the context (text)
    endings   its 4 candidate endings (texts)
    label     the index of the right ending (0-3)
Each ending is scored as a continuation: the tokens of ctx, then the tokens of " " + ending, and only the
ending's tokens count. acc picks the ending with the smallest summed loss (the largest log-likelihood),
acc_norm the one with the smallest mean loss per token. A context whose tokens and ending's do not fit in
block_size keeps its last block_size + 1 tokens (the ending's last block_size tokens, at most, are scored).
The log-likelihoods are over the tokenizer's own vocabulary (a padded model's extra logits are left out).

Each context runs once: the contexts of a batch of examples (of one context length) go through the model into
a KV cache, and their endings continue from it, four rows per context, padded on the right (where the causal
mask keeps the padding out of every scored position); only the scored positions go through the head. An
example whose rows were cut to block_size (each ending keeps its own last tokens) runs as four whole rows.
Under torchrun the batches are strided over the ranks and the results gathered, every rank running the same
number of forwards (FSDP needs that: evaluate.lockstep).
"""

import itertools
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from gpt_residual import dataset, runtime
from gpt_residual.dataset import DataError
from gpt_residual.evaluate import Stopped, lockstep
from model import KVCache

NUM_ENDINGS = 4
HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_COUNT = 10042  # examples in the validation split
HELLASWAG_FILE = dataset.DATA_ROOT / "hellaswag" / "hellaswag_val.jsonl"
SUBSET_SEED = 0  # the fixed subset scored while training: the same examples in every run


@dataclass
class Example:
    index: int  # position in the file (0-based)
    ctx: str
    endings: list[str]
    label: int


# ----------------------------------------------------------------------------- reading


def check_record(record, where: str) -> Example:
    """One line's JSON value as an Example, or a DataError that names the line and what is wrong."""
    fix = f"each line must be a JSON object with ctx (text), endings ({NUM_ENDINGS} texts) and label (0-3)"
    if not isinstance(record, dict):
        raise DataError(f"{where} is a JSON {type(record).__name__}, not an object; {fix}")
    missing = [k for k in ("ctx", "endings", "label") if k not in record]
    if missing:
        raise DataError(f"{where} has no {', '.join(missing)}; {fix}")
    ctx, endings, label = record["ctx"], record["endings"], record["label"]
    if not isinstance(ctx, str) or not ctx:
        raise DataError(f"{where}: ctx must be non-empty text, got {ctx!r:.60}; {fix}")
    if not isinstance(endings, list) or not all(isinstance(e, str) for e in endings):
        raise DataError(f"{where}: endings must be a list of texts, got {endings!r:.60}; {fix}")
    if len(endings) != NUM_ENDINGS:
        raise DataError(f"{where} has {len(endings)} endings, not {NUM_ENDINGS}; {fix}")
    if isinstance(label, str) and label.isdigit():
        label = int(label)  # the Hub's copy of HellaSwag writes the label as text
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < NUM_ENDINGS:
        raise DataError(f"{where}: label must be an integer from 0 to {NUM_ENDINGS - 1}, got {label!r}; {fix}")
    return Example(0, ctx, endings, label)


def read_examples(path) -> list[Example]:
    """Every example of a HellaSwag-format .jsonl file; a DataError naming the file and line for a bad one."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"multiple-choice file '{path}' not found; give a .jsonl file with --data=FILE") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read '{path}' ({e}); give a UTF-8 .jsonl file") from None
    examples = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path} line {n} is not JSON ({e}); write one JSON object per line") from None
        example = check_record(record, f"{path} line {n}")
        example.index = len(examples)
        examples.append(example)
    if not examples:
        raise DataError(f"'{path}' holds no examples; write one JSON object (ctx, endings, label) per line")
    return examples


def fetch_hellaswag(path: Path | None = None, url: str | None = None) -> Path:
    """The validation split's file (HELLASWAG_FILE), downloaded from url on first use, with a progress bar."""
    path, url = path or HELLASWAG_FILE, url or HELLASWAG_URL
    if path.is_file():
        return path
    try:
        dataset.download(url, path)
    except DataError as e:
        cause = e.__context__ or e
        raise DataError(
            f"HellaSwag's validation split is not in {path} and could not be downloaded from {url} "
            f"({type(cause).__name__}: {cause}); download that file to {path}, or pass --data=FILE.jsonl"
        ) from None
    return path


def load(data: str = "", rt: runtime.Runtime | None = None) -> list[Example]:
    """The examples of a local file (data), else HellaSwag's validation split, fetched by one process per node
    and checked: its count and every line's fields."""
    if data:
        return read_examples(data)
    if rt is None or rt.local_rank == 0:
        try:
            fetch_hellaswag()
        finally:
            if rt is not None and rt.ddp:
                dist.barrier()  # the other ranks wait for the download (and see a failure as a missing file)
    elif rt.ddp:
        dist.barrier()
    examples = read_examples(HELLASWAG_FILE)
    if len(examples) != HELLASWAG_COUNT:
        raise DataError(
            f"{HELLASWAG_FILE} holds {len(examples):,} examples, HellaSwag's validation split {HELLASWAG_COUNT:,}; "
            "delete the file to download it again"
        )
    return examples


def fixed_subset(examples: list[Example], k: int) -> list[Example]:
    """k examples drawn once with a fixed seed, in file order (all of them if there are no more than k)."""
    if k >= len(examples):
        return examples
    chosen = np.random.default_rng(SUBSET_SEED).choice(len(examples), size=k, replace=False)
    return [examples[i] for i in sorted(chosen.tolist())]


# ----------------------------------------------------------------------------- scoring


@dataclass
class Encoded:
    index: int
    label: int
    rows: list[list[int]]  # per ending: the tokens (context, then ending), cut to block_size + 1
    scored: list[int]  # per ending: how many of the row's last tokens are the ending's, scored
    truncated: bool  # some ending lost context tokens to block_size

    @property
    def context(self) -> int:
        """The context's tokens, which every row begins with (0 when the rows were cut)."""
        return 0 if self.truncated else len(self.rows[0]) - self.scored[0]


def encode(examples: list[Example], tok: dataset.Tokenizer, block_size: int) -> list[Encoded]:
    out = []
    for ex in examples:
        try:
            ctx, ends = tok.encode(ex.ctx), [tok.encode(" " + e) for e in ex.endings]
        except DataError as e:
            raise DataError(f"example {ex.index}: {e}") from None
        rows = [(ctx + end)[-(block_size + 1) :] for end in ends]
        scored = [min(len(end), len(row) - 1) for end, row in zip(ends, rows)]
        out.append(Encoded(ex.index, ex.label, rows, scored, any(len(ctx) + len(e) > block_size + 1 for e in ends)))
    return out


def pack(rows: list[list[int]], scored: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows right-padded (on the host) into inputs x = row[:-1] and targets y, -1 but at each row's last
    `scored` positions; at least one position wide."""
    width = max(1, max(len(r) for r in rows) - 1)
    x = torch.zeros(len(rows), width, dtype=torch.long)
    y = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, (row, n) in enumerate(zip(rows, scored)):
        if len(row) > 1:
            x[i, : len(row) - 1] = torch.tensor(row[:-1])
        if n:
            y[i, len(row) - 1 - n : len(row) - 1] = torch.tensor(row[len(row) - n :])
    return x, y


def row_logliks(model, x: torch.Tensor, y: torch.Tensor, vocab_size: int, device, cache=None) -> torch.Tensor:
    """(rows,) float64 on the host: per row of x, the summed log-likelihood of its targets y (>= 0), over the
    tokenizer's vocabulary; one read-back."""
    flat = (y >= 0).flatten().nonzero().squeeze(1)  # the scored positions (on the host: no device sync)
    owner = flat // y.size(1)  # the row each scored position belongs to
    x, y, on_device = x.to(device), y.to(device), flat.to(device)
    picked = logits_at(model, x, y, on_device, cache)[:, :vocab_size].float()
    logp = -F.cross_entropy(picked, y.flatten()[on_device], reduction="none")
    return torch.zeros(len(x), dtype=torch.float64).index_add_(0, owner, logp.double().cpu())


def score_rows(model, batch: list[Encoded], vocab_size: int, device) -> list[list[float]]:
    """Per example of batch: the summed log-likelihood of each ending (nats). One forward over every ending's
    whole row (context and ending, as cut to block_size), right-padded."""
    rows = [row for enc in batch for row in enc.rows]
    scored = [n for enc in batch for n in enc.scored]
    return row_logliks(model, *pack(rows, scored), vocab_size, device).view(len(batch), NUM_ENDINGS).tolist()


def score_shared(model, batch: list[Encoded], vocab_size: int, device) -> list[list[float]]:
    """score_rows for examples whose rows are whole, all with contexts of one length: the contexts run once,
    in one forward into a KV cache (its last position predicts every ending's first token), and the endings
    continue from it in a second forward, NUM_ENDINGS rows per context. Always two forwards (FSDP counts
    them: see evaluate.lockstep)."""
    n = batch[0].context
    ends = [row[n:] for enc in batch for row in enc.rows]
    x, y = pack(ends, [len(e) - 1 for e in ends])
    cache = KVCache(model.config, n + x.size(1))
    cache.reset(device)
    contexts = torch.tensor([enc.rows[0][:n] for enc in batch], device=device)
    last, _ = model(contexts, cache=cache)  # (E, 1, vocab): without targets, the last position's logits
    firsts = torch.tensor([e[0] for e in ends], device=device)
    each = last[:, 0, :vocab_size].float().repeat_interleave(NUM_ENDINGS, 0)  # a context's, for each ending
    first = -F.cross_entropy(each, firsts, reduction="none")
    cache.repeat_rows(NUM_ENDINGS)
    rest = row_logliks(model, x, y, vocab_size, device, cache)
    return (rest + first.double().cpu()).view(len(batch), NUM_ENDINGS).tolist()


def logits_at(model, x: torch.Tensor, y: torch.Tensor, flat: torch.Tensor, cache=None) -> torch.Tensor:
    """The logits (len(flat), model vocab) at the flat positions of x (continuing the cache's context, if
    any). For a GPT, the stream after the final norm is caught by a hook and only the scored positions go
    through the head: most of a row is context, whose logits nobody needs. Under FSDP the head's weights are
    whole only inside the forward: the model's own forward then computes every position's logits (and a
    loss, unused)."""
    ln_f = getattr(getattr(model, "transformer", None), "ln_f", None)
    if ln_f is None or hasattr(model.lm_head.weight, "full_tensor"):
        logits, _ = model(x, y, cache=cache)
        return logits.flatten(0, 1)[flat]
    seen = []
    handle = ln_f.register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        model(x, cache=cache)  # without targets the head computes the last position only
    finally:
        handle.remove()
    return model.softcap(model.lm_head(seen[0].flatten(0, 1)[flat]))


def batches_of(encoded: list[Encoded], batch_size: int) -> tuple[list[list[Encoded]], list[list[Encoded]]]:
    """(shared, cut): the examples whose rows are whole in batches of batch_size with one context length each
    (score_shared), and those whose rows were cut to block_size in batches of like length (score_rows);
    longest first."""
    whole = sorted((e for e in encoded if not e.truncated), key=lambda e: (-e.context, e.index))
    shared = []
    for _, group in itertools.groupby(whole, key=lambda e: e.context):
        group = list(group)
        shared += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    cut = sorted((e for e in encoded if e.truncated), key=lambda e: -max(len(r) for r in e.rows))
    return shared, [cut[i : i + batch_size] for i in range(0, len(cut), batch_size)]


@torch.no_grad()
def score(model, encoded: list[Encoded], vocab_size: int, rt: runtime.Runtime, batch_size: int, stop=None):
    """Every example's record {index, label, loglik, tokens}, in index order, on every rank; None when the
    ranks agreed to stop (stop: a runtime.GracefulStop, checked before every batch). The batches are strided
    over the ranks (evaluate.lockstep: every rank runs the same number of forwards), then the records are
    gathered."""
    was_training = model.training
    model.eval()
    records = []
    try:
        with rt.autocast():
            for batches, run in zip(batches_of(encoded, batch_size), (score_shared, score_rows)):
                for g, keep in lockstep(len(batches), rt, stop):
                    logliks = run(model, batches[g], vocab_size, rt.device)
                    if keep:  # else a repeat that only kept this rank in step with the others
                        records += [{"index": enc.index, "label": enc.label, "loglik": ll, "tokens": enc.scored}
                                    for enc, ll in zip(batches[g], logliks)]  # fmt: skip
    except Stopped:
        return None
    finally:
        model.train(was_training)
    if rt.ddp:
        gathered = [None] * rt.world_size
        dist.all_gather_object(gathered, records)
        records = [r for part in gathered for r in part]
    return sorted(records, key=lambda r: r["index"])


# ----------------------------------------------------------------------------- results


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval for a proportion k / n (sound near 0 and 1 and for small n, unlike p +- 2 se)."""
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    p, d = k / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize(task: str, records: list[dict], truncated: int) -> dict:
    """{"task", "n", "acc", "acc_norm", their 95% Wilson intervals, "truncated", "examples"}."""
    right = {"acc": 0, "acc_norm": 0}
    for r in records:
        means = [ll / max(n, 1) for ll, n in zip(r["loglik"], r["tokens"])]
        right["acc"] += max(range(NUM_ENDINGS), key=lambda i: r["loglik"][i]) == r["label"]
        right["acc_norm"] += max(range(NUM_ENDINGS), key=lambda i: means[i]) == r["label"]
    n = len(records)
    out = {"task": task, "n": n, "acc": right["acc"] / n, "acc_norm": right["acc_norm"] / n}
    out |= {f"{k}_ci95": wilson(v, n) for k, v in right.items()}
    return {**out, "truncated": truncated, "examples": records}


def describe(result: dict, block_size: int) -> str:
    """One line: acc and acc_norm with n and their intervals, and how many contexts were cut."""

    def pct(key):
        lo, hi = result[key + "_ci95"]
        return f"{result[key] * 100:.2f}% (95% CI {lo * 100:.1f}-{hi * 100:.1f})"

    cut = result["truncated"]
    note = f"; {cut} context(s) longer than block_size {block_size} kept their last tokens" if cut else ""
    return f"{result['task']}: n={result['n']}, acc {pct('acc')}, acc_norm {pct('acc_norm')}{note}"


def evaluate(model, examples, tok, rt, batch_size: int, task: str = "hellaswag", block_size: int | None = None):
    """Score examples with model (a GPT, eval mode is set and restored); the summarize() dict on every rank."""
    block_size = block_size or model.config.block_size
    encoded = encode(examples, tok, block_size)
    records = score(model, encoded, tok.vocab_size, rt, batch_size)
    return summarize(task, records, sum(e.truncated for e in encoded))


# ----------------------------------------------------------------------------- while training


class TrainingScorer:
    """train.py's hook: a fixed subset scored at eval steps (every hellaswag_interval steps, and at the end),
    printed and logged as hellaswag_acc, hellaswag_acc_norm, hellaswag_n, hellaswag_time. Runs the unwrapped
    model eagerly (torch.compiler.set_stance("force_eager")), so compiled blocks never recompile for the
    lengths of the endings; under FSDP every rank runs the same number of forwards."""

    def __init__(self, cfg, meta: dict, rt: runtime.Runtime):
        self.cfg, self.rt, self.tok = cfg, rt, dataset.Tokenizer(meta)
        examples = fixed_subset(load(cfg.hellaswag_data, rt), cfg.hellaswag_examples)
        self.encoded = encode(examples, self.tok, cfg.block_size)
        self.batch_size = max(1, cfg.batch_size // NUM_ENDINGS)  # rows of at most block_size: a training batch

    def __call__(self, model, step: int, logger, final: bool = False, stop=None) -> dict | None:
        """The logged record; None when none is due, or when the ranks agreed to stop (stop.agreed() before
        every batch: within one batch of a signal), leaving nothing printed or logged."""
        if step % self.cfg.hellaswag_interval and not final:
            return None
        t0 = time.perf_counter()
        with torch.compiler.set_stance("force_eager"):
            records = score(model, self.encoded, self.tok.vocab_size, self.rt, self.batch_size, stop)
        if records is None:
            return None
        result = summarize("hellaswag", records, sum(e.truncated for e in self.encoded))
        seconds = time.perf_counter() - t0
        self.rt.print(f"step {step}: {describe(result, self.cfg.block_size)} ({seconds:.1f}s)")
        record = {"step": step, "hellaswag_acc": result["acc"], "hellaswag_acc_norm": result["acc_norm"]}
        logger.log({**record, "hellaswag_n": result["n"], "hellaswag_time": seconds})
        return record


def training_hook(cfg, meta: dict, rt: runtime.Runtime) -> TrainingScorer | None:
    """The training hook, or None when hellaswag_interval is 0 (nothing is read or spent)."""
    return TrainingScorer(cfg, meta, rt) if cfg.hellaswag_interval else None
