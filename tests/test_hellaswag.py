"""HellaSwag-format multiple choice (gpt_residual/multiple_choice.py, python -m scripts.eval, the training hook),
on small files the tests write, with tiny models and the char tokenizer of conftest's dataset."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, TEXT, assert_one_line_error, metrics_records, run

import train
from gpt_residual import config, dataset, multiple_choice, runtime
from gpt_residual.dataset import DataError
from model import GPT, GPTConfig
from scripts import eval as eval_command

CPU = runtime.Runtime(0, 0, 1, "cpu", torch.float32, False)
WORDS = TEXT.replace("\n", " ").split()


def examples_like_text(n: int, seed: int = 0) -> list[dict]:
    """n examples made of TEXT's words (so the char vocabulary of conftest's dataset encodes them)."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda k: " ".join(WORDS[i] for i in torch.randint(len(WORDS), (k,), generator=g).tolist())
    return [
        {"ctx": pick(2 + i % 5), "endings": [pick(1 + (i + j) % 4) for j in range(4)], "label": i % 4, "ind": i}
        for i in range(n)
    ]


def write_jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


@pytest.fixture
def char_tok(char_data):
    return dataset.Tokenizer(json.loads((char_data / "meta.json").read_text()))


def tiny_gpt(vocab: int, block_size: int = 32, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=block_size, vocab_size=vocab, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=False)
    model = GPT(cfg)
    with torch.no_grad():  # sharper than at init, so that the endings' scores differ clearly
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10)
    return model.eval()


class Bigram(torch.nn.Module):
    """A model whose logits at a position depend only on that position's token: table[token]. Called as a GPT
    is (a packed row's positions and mask it needs nothing from; without targets, the last position's logits only)."""

    def __init__(self, vocab: int, block_size: int):
        super().__init__()
        self.config = GPTConfig(block_size=block_size, vocab_size=vocab, n_layer=1, n_head=1, n_embd=8)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(1)))

    def forward(self, idx, targets=None, pos=None, mask=None):
        return self.table[idx] if targets is not None else self.table[idx[:, -1:]], None


def direct_loglik(model, ctx: list[int], end: list[int]) -> float:
    """The summed log-likelihood of end after ctx, one example at a time (F.cross_entropy over the ending)."""
    row = torch.tensor(ctx + end)
    logits, _ = model(row[None, :-1], row[None, 1:])
    return -F.cross_entropy(logits[0, len(ctx) - 1 :], row[len(ctx) :], reduction="sum").item()


# ----------------------------------------------------------------------------- the scores


def test_scores_are_the_hand_computed_log_likelihoods(tmp_path, char_tok):
    """Bigram model: each ending's log-likelihood is the sum of log softmax(table[previous token])[token] over
    the ending's tokens (" " + ending, the first one predicted from ctx's last token); acc and acc_norm pick
    the largest sum and the largest mean."""
    examples = multiple_choice.read_examples(write_jsonl(tmp_path / "mc.jsonl", examples_like_text(9)))
    model = Bigram(char_tok.vocab_size, 64)
    result = multiple_choice.evaluate(model, examples, char_tok, CPU, batch_size=4)
    logp = torch.log_softmax(model.table.detach().double(), dim=-1)
    right = {"acc": 0, "acc_norm": 0}
    for ex, rec in zip(examples, result["examples"], strict=True):
        assert (rec["index"], rec["label"]) == (ex.index, ex.label)
        ctx = char_tok.encode(ex.ctx)
        want = []
        for end_text in ex.endings:
            end = char_tok.encode(" " + end_text)
            prev = [ctx[-1], *end[:-1]]
            want.append(sum(logp[p, t].item() for p, t in zip(prev, end)))
        assert rec["tokens"] == [len(" " + e) for e in ex.endings]  # one char, one token
        assert rec["loglik"] == pytest.approx(want, rel=1e-5)
        right["acc"] += max(range(4), key=lambda i: want[i]) == ex.label
        right["acc_norm"] += max(range(4), key=lambda i: want[i] / rec["tokens"][i]) == ex.label
    assert result["n"] == len(examples)
    assert result["acc"] == right["acc"] / len(examples) and result["acc_norm"] == right["acc_norm"] / len(examples)


def test_gpt_scores_equal_a_direct_computation_batched_or_one_by_one(tmp_path, char_tok):
    examples = multiple_choice.read_examples(write_jsonl(tmp_path / "mc.jsonl", examples_like_text(11)))
    model = tiny_gpt(char_tok.vocab_size, block_size=64)
    one = multiple_choice.evaluate(model, examples, char_tok, CPU, batch_size=1)
    many = multiple_choice.evaluate(model, examples, char_tok, CPU, batch_size=5)
    for ex, a, b in zip(examples, one["examples"], many["examples"], strict=True):
        ctx = char_tok.encode(ex.ctx)
        direct = [direct_loglik(model, ctx, char_tok.encode(" " + e)) for e in ex.endings]
        assert a["loglik"] == pytest.approx(direct, rel=1e-4, abs=1e-4)
        assert b["loglik"] == pytest.approx(a["loglik"], rel=1e-4, abs=1e-4) and a["tokens"] == b["tokens"]
    assert (one["acc"], one["acc_norm"]) == (many["acc"], many["acc_norm"])
    assert len({tuple(r["loglik"]) for r in one["examples"]}) == len(examples)  # the scores are not constant


def test_each_context_runs_once_in_a_packed_row(tmp_path, char_tok):
    """An example is one row: its context once, then each ending continuing from the context's end (positions
    restarting there, each ending seeing the context and itself only; one ending a single token, fed nothing
    of its own). The model sees each context once, and the log-likelihoods equal whole rows run one by one,
    in a batch of rows of different lengths or one by one."""
    records = [{"ctx": c, "endings": ["", "speak.", "All: resolved", "you"], "label": i}
               for i, c in enumerate(["First Citizen", "hear me speak", "Before we pro"])]  # fmt: skip
    records.append({"ctx": "All", "endings": ["a", "e", "c", "Speak, speak."], "label": 0})
    examples = multiple_choice.read_examples(write_jsonl(tmp_path / "mc.jsonl", records))
    model, shapes = tiny_gpt(char_tok.vocab_size, block_size=64), []
    model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    result = multiple_choice.evaluate(model, examples, char_tok, CPU, batch_size=3)
    # 13 context characters, then " " + each ending less its last character (0 + 6 + 13 + 3): 35 a row;
    # "All" and " a", " e", " c", " Speak, speak.": the inputs share "All " (4), then "Speak, speak" (12)
    assert shapes == [(3, 35), (1, 16)]
    for ex, rec in zip(examples, result["examples"], strict=True):
        c = char_tok.encode(ex.ctx)
        direct = [direct_loglik(model, c, char_tok.encode(" " + e)) for e in ex.endings]
        assert rec["loglik"] == pytest.approx(direct, rel=1e-4, abs=1e-4)
        assert rec["tokens"] == [len(" " + e) for e in ex.endings]
    alone = multiple_choice.evaluate(model, examples, char_tok, CPU, batch_size=1)
    for a, b in zip(alone["examples"], result["examples"], strict=True):
        assert a["loglik"] == pytest.approx(b["loglik"], rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("switches", [{}, {"positions": "rope", "qk_norm": True}, {"value_residual": True}],
                         ids=["learned", "rope", "value_residual"])  # fmt: skip
def test_a_packed_row_computes_what_its_rows_compute(switches):
    """GPT.forward with pos and mask (what scoring packs): rows of different packings in one batch, padded; each
    continuation's logits equal those of its own row run alone (the context, then it)."""
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=32, bias=False, **switches)
    model = GPT(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ctx, ends = [torch.randint(37, (n,), generator=g) for n in (5, 3)], [[3, 1], [4]]
    ends = [[torch.randint(37, (n,), generator=g) for n in lengths] for lengths in ends]
    T = 12  # the longest packed row: 5 + 3 + 1, padded to 12
    x, pos, seg = torch.zeros(2, T, dtype=torch.long), torch.zeros(2, T, dtype=torch.long), torch.full((2, T), -1)
    where = []  # (row, first index in the packed row, context, continuation)
    for b, (c, conts) in enumerate(zip(ctx, ends)):
        tokens, positions, segments = [c], [torch.arange(len(c))], [torch.zeros(len(c), dtype=torch.long)]
        for i, e in enumerate(conts):
            where.append((b, sum(map(len, tokens)), c, e))
            tokens.append(e), positions.append(torch.arange(len(c), len(c) + len(e)))
            segments.append(torch.full((len(e),), i + 1))
        n = sum(map(len, tokens))
        x[b, :n], pos[b, :n], seg[b, :n] = torch.cat(tokens), torch.cat(positions), torch.cat(segments)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = (causal & ((seg[:, :, None] == seg[:, None, :]) | (seg == 0)[:, None, :]))[:, None]
    with torch.no_grad():
        packed, _ = model(x, x, pos=pos, mask=mask)  # with targets: every position's logits
        for b, start, c, e in where:
            alone, _ = model(torch.cat([c, e])[None], torch.cat([c, e])[None])
            assert torch.allclose(packed[b, start : start + len(e)], alone[0, len(c) :], atol=1e-5)
            assert torch.allclose(packed[b, len(c) - 1], alone[0, len(c) - 1], atol=1e-5)


def test_a_long_context_keeps_its_last_tokens(tmp_path, char_tok):
    """block_size 16: a row keeps its last 17 tokens, so the first of them is input only; an ending longer
    than block_size has its last 16 tokens scored."""
    long_ctx, long_end = " ".join(WORDS[:12]), " ".join(WORDS[:8])
    record = {"ctx": long_ctx, "endings": ["speak.", long_end, "All:", "First"], "label": 1}
    examples = multiple_choice.read_examples(write_jsonl(tmp_path / "mc.jsonl", [record]))
    model = tiny_gpt(char_tok.vocab_size, block_size=16)
    result = multiple_choice.evaluate(model, examples, char_tok, CPU, batch_size=1)
    rec, ctx = result["examples"][0], char_tok.encode(long_ctx)
    ends = [char_tok.encode(" " + e) for e in record["endings"]]
    assert rec["tokens"] == [min(len(e), 16) for e in ends] and result["truncated"] == 1
    for i, end in enumerate(ends):
        row = (ctx + end)[-17:]
        scored = min(len(end), 16)
        assert rec["loglik"][i] == pytest.approx(direct_loglik(model, row[:-scored], row[-scored:]), rel=1e-4)
    assert "1 context(s) longer than block_size 16 kept their last tokens" in multiple_choice.describe(result, 16)


def test_wilson_interval_matches_scipy():
    from scipy import stats  # requirements-dev.txt: never skipped where the tests' requirements are installed

    for k, n in ((0, 10), (3, 10), (287, 1000), (2959, 10042)):
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert multiple_choice.wilson(k, n) == pytest.approx((ci.low, ci.high), rel=1e-9, abs=1e-12)


# ----------------------------------------------------------------------------- files


BAD_FILES = {
    "missing field": ([{"ctx": "a", "endings": ["b", "c", "d", "e"]}], "line 1 has no label"),
    "label out of range": ([{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 4}], "line 1: label"),
    "empty": ([], "holds no examples"),
    "not JSON": ([{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 0}, "{ctx: a"], "line 2 is not JSON"),
    "three endings": ([{"ctx": "a", "endings": ["b", "c", "d"], "label": 0}], "line 1 has 3 endings, not 4"),
    "not an object": (["[1, 2]"], "line 1 is a JSON list"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_file_is_one_line_naming_file_and_line(tmp_path, case):
    lines, needle = BAD_FILES[case]
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match=needle):
        multiple_choice.read_examples(path)
    argv = [f"--data={path}", f"--out_dir={tmp_path / 'no-run'}"]  # the data is read before the model
    if case == "not JSON":  # through the command as a user runs it
        assert_one_line_error(run(["-m", "scripts.eval", *argv], timeout=120), path, needle)
    else:
        assert_one_line_error_in_process(argv, path, needle)


def assert_one_line_error_in_process(argv, *needles):
    """scripts.eval.main(argv) as the command runs it: exit code 2 and one line on stderr starting with error:."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert eval_command.main(argv) == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err.getvalue()
    assert all(needle in lines[0] for needle in needles), lines[0]


def test_the_validation_split_is_downloaded_checked_and_cached(tmp_path, monkeypatch):
    source = tmp_path / "published.jsonl"
    write_jsonl(source, examples_like_text(5))
    cache = tmp_path / "data" / "hellaswag" / "hellaswag_val.jsonl"
    monkeypatch.setattr(multiple_choice, "HELLASWAG_FILE", cache)
    monkeypatch.setattr(multiple_choice, "HELLASWAG_URL", source.as_uri())
    monkeypatch.setattr(multiple_choice, "HELLASWAG_COUNT", 5)
    assert [e.index for e in multiple_choice.load()] == list(range(5)) and cache.read_text() == source.read_text()
    source.unlink()  # the second load reads the cache
    assert len(multiple_choice.load()) == 5
    monkeypatch.setattr(multiple_choice, "HELLASWAG_COUNT", 10042)
    with pytest.raises(DataError, match="holds 5 examples, HellaSwag's validation split 10,042; delete the file"):
        multiple_choice.load()
    cache.unlink()
    monkeypatch.setattr(multiple_choice, "HELLASWAG_URL", "http://127.0.0.1:9/hellaswag_val.jsonl")
    with pytest.raises(DataError) as e:
        multiple_choice.load()
    assert "http://127.0.0.1:9/hellaswag_val.jsonl" in str(e.value) and "--data=FILE.jsonl" in str(e.value)
    assert "\n" not in str(e.value) and not cache.exists()


# ----------------------------------------------------------------------------- the command


def test_eval_command_writes_the_results_json(tmp_path, tiny_cfg, char_tok):
    cfg = tiny_cfg(max_iters=2, eval_interval=2, out_dir=str(tmp_path / "run"))
    train.train(cfg)
    data = write_jsonl(tmp_path / "mc.jsonl", examples_like_text(6))
    out = tmp_path / "scores.json"
    proc = run(["-m", "scripts.eval", "--task=hellaswag", f"--out_dir={cfg.out_dir}", f"--data={data}",
                f"--out={out}", "--limit=5", "--batch_size=2", "--device=cpu"], timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "hellaswag: n=5, acc " in proc.stdout and "95% CI" in proc.stdout
    result = json.loads(out.read_text())
    assert {"task", "n", "acc", "acc_norm"} <= result.keys() and result["task"] == "hellaswag" and result["n"] == 5
    assert [set(r) for r in result["examples"]] == [{"index", "label", "loglik", "tokens"}] * 5
    assert [r["index"] for r in result["examples"]] == list(range(5))
    hits = [max(range(4), key=lambda i: r["loglik"][i]) == r["label"] for r in result["examples"]]
    assert result["acc"] == sum(hits) / 5
    assert all(len(r["loglik"]) == len(r["tokens"]) == 4 and max(r["loglik"]) < 0 for r in result["examples"])


def test_eval_command_refuses_bad_flags():
    assert_one_line_error_in_process(["--task=mmlu"], "task must be one of hellaswag")
    assert_one_line_error_in_process(["--limitt=3"], "did you mean 'limit'")
    assert_one_line_error_in_process(["--batch_size=0"], "batch_size must be positive")


# ----------------------------------------------------------------------------- two ranks


def torchrun(args: list[str], world: int, timeout: float = 300):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TORCH_CPP_LOG_LEVEL="ERROR")
    prefix = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"])
    return subprocess.run([*prefix, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def test_two_ranks_score_what_one_process_scores(tmp_path, tiny_cfg):
    cfg = tiny_cfg(max_iters=2, eval_interval=2, out_dir=str(tmp_path / "run"))
    train.train(cfg)
    data = write_jsonl(tmp_path / "mc.jsonl", examples_like_text(7))  # odd: the ranks get 4 and 3 examples
    results = {}
    for world in (1, 2):
        out = tmp_path / f"scores-{world}.json"
        args = ["-m", "scripts.eval", f"--out_dir={cfg.out_dir}", f"--data={data}", f"--out={out}", "--batch_size=1"]
        proc = torchrun([*args, "--device=cpu"], world)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("hellaswag: n=7") == 1  # rank 0 prints
        results[world] = json.loads(out.read_text())
    single, multi = results[1], results[2]
    assert [r["index"] for r in multi["examples"]] == list(range(7))
    for a, b in zip(single["examples"], multi["examples"], strict=True):
        assert a["loglik"] == pytest.approx(b["loglik"], rel=1e-5) and a["tokens"] == b["tokens"]
    assert (single["acc"], single["acc_norm"]) == (multi["acc"], multi["acc_norm"])


# ----------------------------------------------------------------------------- while training


def test_config_keys_are_checked():
    with pytest.raises(config.ConfigError, match="hellaswag_interval .* multiple of eval_interval"):
        config.parse_args(config.TrainConfig, ["--hellaswag_interval=3", "--eval_interval=2"])
    with pytest.raises(config.ConfigError, match="hellaswag_examples must be positive"):
        config.parse_args(config.TrainConfig, ["--hellaswag_examples=0"])


def test_training_logs_hellaswag_at_its_eval_steps(tmp_path, tiny_cfg, capsys):
    data = write_jsonl(tmp_path / "mc.jsonl", examples_like_text(12))
    cfg = tiny_cfg(max_iters=25, eval_interval=5, hellaswag_interval=10, hellaswag_examples=8, hellaswag_data=data)
    train.train(cfg)
    records = [r for r in metrics_records(cfg.out_dir) if "hellaswag_acc_norm" in r]
    assert [r["step"] for r in records] == [0, 10, 20, 25]  # every hellaswag_interval steps, and the last
    assert all(r["hellaswag_n"] == 8 and 0 <= r["hellaswag_acc"] <= 1 for r in records)
    assert "step 10: hellaswag: n=8, acc " in capsys.readouterr().out
    train.train(tiny_cfg(max_iters=5, out_dir=str(tmp_path / "off"), hellaswag_data=data))
    assert not [r for r in metrics_records(tmp_path / "off") if "hellaswag_acc" in r]  # off by default


def test_training_with_a_vocabulary_that_cannot_spell_the_file_is_one_line(tmp_path, tiny_cfg):
    data = write_jsonl(tmp_path / "mc.jsonl", [{"ctx": "Zebra #42", "endings": ["a", "b", "c", "d"], "label": 0}])
    with pytest.raises(DataError, match="example 0: text has .* outside this model's vocabulary"):
        train.train(tiny_cfg(max_iters=2, eval_interval=2, hellaswag_interval=2, hellaswag_data=data))


def test_the_hook_never_recompiles_compiled_blocks(tmp_path, tiny_cfg, char_tok):
    """compile_scope=blocks compiles the blocks in place; the endings' lengths vary from batch to batch. The
    hook scores eagerly: nothing compiles after the warm-up, and the scores equal an uncompiled model's."""
    from torch._dynamo.utils import counters

    data = write_jsonl(tmp_path / "mc.jsonl", examples_like_text(6))
    cfg = tiny_cfg(hellaswag_interval=10, hellaswag_data=data, block_size=64)  # no row is cut to block_size
    model = tiny_gpt(char_tok.vocab_size, block_size=cfg.block_size)
    hook = multiple_choice.training_hook(cfg, {"tokenizer": "char", "vocab_size": char_tok.vocab_size,
                                               "itos": char_tok.itos}, CPU)  # fmt: skip
    eager = hook(model, 0, Log())
    torch._dynamo.reset()
    model.compile_regions()
    x = torch.zeros(cfg.batch_size, cfg.block_size, dtype=torch.long)
    with torch.no_grad():
        model(x, x)  # the warm-up's shape
    counters.clear()
    compiled = hook(model, 10, Log())
    assert not counters["stats"]["unique_graphs"], dict(counters["stats"])
    assert compiled["hellaswag_acc"] == eager["hellaswag_acc"]
    assert compiled["hellaswag_acc_norm"] == eager["hellaswag_acc_norm"]


class Log:
    def log(self, record):
        self.record = record


def test_fsdp_training_scores_what_one_process_scores(tmp_path, char_data):
    """2 ranks under FSDP with an odd subset (one example per forward: 4 forwards on rank 0, 3 on rank 1, padded
    to 4), at block_size 48, where 3 of the 7 examples are cut to block_size: the run finishes, and the scores at
    step 0 (the same weights) are the single process's."""
    data = write_jsonl(tmp_path / "mc.jsonl", examples_like_text(7))
    base = ["train.py", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=48", "--batch_size=4",
            "--device=cpu", "--dtype=float32", "--compile=False", f"--data_dir={char_data}", "--max_iters=2",
            "--eval_interval=2", "--eval_iters=2", "--hellaswag_interval=2", f"--hellaswag_data={data}"]  # fmt: skip
    scores = {}
    for world, extra in ((1, ["--gradient_accumulation_steps=2"]), (2, ["--parallel=fsdp"])):
        out = tmp_path / f"run-{world}"
        proc = torchrun([*base, *extra, f"--out_dir={out}"], world)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        scores[world] = [r for r in metrics_records(out) if "hellaswag_acc" in r]
    assert [r["step"] for r in scores[2]] == [0, 2]
    for key in ("hellaswag_acc", "hellaswag_acc_norm", "hellaswag_n"):
        assert scores[2][0][key] == scores[1][0][key]
    assert math.isfinite(scores[2][1]["hellaswag_acc_norm"])
