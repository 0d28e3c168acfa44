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

Each context runs once: an example is one packed row, the inputs its four rows share (the context) and then
each ending's own, continuing from the context's end (their positions restart there, and the attention mask
lets each ending see the context and itself only), as a shared prefix would; rows of several examples run in
one forward, right-padded, and only the scored positions go through the head. Under torchrun the batches are
strided over the ranks and the results gathered, every rank running the same number of forwards (FSDP needs
that: evaluate.lockstep).
"""

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
from gpt_residual.engine import CpuHead
from gpt_residual.evaluate import Stopped, lockstep

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


def packed_row(enc: Encoded) -> tuple[list[int], list[int], list[int], list[tuple[int, int, int]]]:
    """The example as one row: the inputs (row[:-1]) its four rows share, their longest common prefix (the
    context, when nothing was cut), once, then the rest of each row's inputs, each continuing from the shared
    part's end. Returns (tokens, positions, segments: 0 for the shared part and i + 1 for ending i's, targets:
    (index in the row, token, ending) for every scored token)."""
    inputs, shared = [row[:-1] for row in enc.rows], 0
    while shared < min(map(len, inputs)) and len({x[shared] for x in inputs}) == 1:
        shared += 1
    tokens, positions, segments, targets = inputs[0][:shared], list(range(shared)), [0] * shared, []
    for i, (x, row, n) in enumerate(zip(inputs, enc.rows, enc.scored)):
        start = len(tokens) - shared  # where this ending's own inputs begin, less the shared part
        tokens += x[shared:]
        positions += range(shared, len(x))
        segments += [i + 1] * (len(x) - shared)
        targets += [(p if p < shared else start + p, row[p + 1], i) for p in range(len(x) - n, len(x))]
    return tokens, positions, segments, targets


def pack(batch: list[Encoded]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of packed rows, right-padded, on the host: tokens x and positions (B, T), the attention mask (B, 1,
    T, T: a token sees the shared part before it and its own ending's tokens up to itself; padding sees only
    padding), and per scored token its flat index in x, its target and its ending's row (example x 4 + i)."""
    rows = [packed_row(enc) for enc in batch]
    T = max(len(r[0]) for r in rows)
    x, pos, seg = (torch.full((len(rows), T), fill, dtype=torch.long) for fill in (0, 0, -1))
    flat, target, owner = [], [], []
    for b, (tokens, positions, segments, targets) in enumerate(rows):
        x[b, : len(tokens)], pos[b, : len(tokens)] = torch.tensor(tokens), torch.tensor(positions)
        seg[b, : len(tokens)] = torch.tensor(segments)
        for p, t, i in targets:
            flat.append(b * T + p), target.append(t), owner.append(b * NUM_ENDINGS + i)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = causal & ((seg[:, :, None] == seg[:, None, :]) | (seg == 0)[:, None, :])  # (B, T, T)
    return x, pos, mask[:, None], torch.tensor(flat), torch.stack([torch.tensor(target), torch.tensor(owner)])


def score_batch(model, batch: list[Encoded], vocab_size: int, device, head=None) -> list[list[float]]:
    """Per example of batch: the summed log-likelihood of each ending (nats). One forward of packed rows (each
    example's context once, its endings continuing from it); only the scored positions go through the head
    (head, else the model's own). The sums come back in one read-back."""
    x, pos, mask, flat, (target, owner) = pack(batch)
    forward = dict(pos=pos.to(device), mask=mask.to(device))
    picked = logits_at(model, x.to(device), flat.to(device), forward, head)[:, :vocab_size].float()
    logp = -F.cross_entropy(picked, target.to(device), reduction="none")
    sums = torch.zeros(len(batch) * NUM_ENDINGS, dtype=torch.float64).index_add_(0, owner, logp.double().cpu())
    return sums.view(len(batch), NUM_ENDINGS).tolist()


def logits_at(model, x: torch.Tensor, flat: torch.Tensor, forward: dict, head=None) -> torch.Tensor:
    """The logits (len(flat), model vocab) at the flat positions of x, forward's keywords (a packed row's
    positions and mask) passed to the model. For a GPT, the stream after the final norm is caught by a hook
    and only those positions go through the head: the contexts' logits, most of a row, nobody needs. Under FSDP
    the head's weights are whole only inside the forward: the model's own forward then computes every
    position's logits (given targets, and a loss, unused)."""
    ln_f = getattr(getattr(model, "transformer", None), "ln_f", None)
    if ln_f is None or hasattr(model.lm_head.weight, "full_tensor"):
        logits, _ = model(x, torch.zeros_like(x), **forward)
        return logits.flatten(0, 1)[flat]
    seen = []
    handle = ln_f.register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        model(x, **forward)  # without targets the head computes the last position only
    finally:
        handle.remove()
    return model.softcap((head or model.lm_head)(seen[0].flatten(0, 1)[flat]))


def batches_of(encoded: list[Encoded], batch_size: int) -> list[list[Encoded]]:
    """The examples in batches of batch_size, longest packed row first, so rows of like length share a forward."""
    ordered = sorted(encoded, key=lambda e: -len(packed_row(e)[0]))
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


@torch.no_grad()
def score(model, encoded: list[Encoded], vocab_size: int, rt: runtime.Runtime, batch_size: int, stop=None):
    """Every example's record {index, label, loglik, tokens}, in index order, on every rank; None when the
    ranks agreed to stop (stop: a runtime.GracefulStop, checked before every batch). The batches are strided
    over the ranks (evaluate.lockstep: every rank runs the same number of forwards), then the records are
    gathered."""
    batches = batches_of(encoded, batch_size)
    was_training = model.training
    model.eval()
    records, lm_head = [], getattr(model, "lm_head", None)
    head = CpuHead(lm_head.weight) if rt.device_type == "cpu" and isinstance(lm_head, torch.nn.Linear) else None
    try:
        with rt.autocast():
            for g, keep in lockstep(len(batches), rt, stop):
                logliks = score_batch(model, batches[g], vocab_size, rt.device, head)
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
