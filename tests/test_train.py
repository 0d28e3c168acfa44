"""train.py and sample.py: schedule, outputs, checkpoints, resume, accumulation, errors, and the real command lines."""

import dataclasses
import functools
import io
import json
import math
import re
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, metrics_records, run, tiny_text

import sample
import train
from gpt_residual import checkpoint, config, dataset, evaluate, runtime
from gpt_residual.health import TrainingError
from model import GPT, GPTConfig

# a tiny model on the CPU, as train.py command-line flags
TINY_FLAGS = ["--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4"]
CKPT_KEYS = {"model", "optimizer", "step", "config", "model_config", "tokenizer", "rng"}


def load_weights(path) -> dict:
    return checkpoint.load(path)["model"]


def call_main(module, argv: list[str], capsys) -> subprocess.CompletedProcess:
    """module.main(argv) in this process, as a CompletedProcess; an exception escaping main() fails the test."""
    capsys.readouterr()
    try:
        code = module.main(argv)
    except SystemExit as e:
        code = e.code
    except Exception as e:  # what a user would see as a traceback
        pytest.fail(f"{module.__name__}.main({argv}) raised {type(e).__name__}: {e}; expected a one-line error")
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


# ----------------------------------------------------------------------------- learning-rate schedule


def lr_cfg(**kw):
    values = dict(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=100, lr_decay_iters=0)
    values.update(kw)
    return config.parse_args(config.TrainConfig, [], overrides=values)


def test_lr_schedule():
    cfg = lr_cfg()
    lrs = [train.get_lr(s, cfg) for s in range(130)]
    warm = lrs[:11]
    assert all(b > a for a, b in zip(warm, warm[1:])), warm
    assert 0 < lrs[0] < 0.2 * cfg.learning_rate
    assert max(lrs) == pytest.approx(cfg.learning_rate)
    assert lrs.index(max(lrs)) in (9, 10)
    decay = lrs[10:101]
    assert all(b <= a for a, b in zip(decay, decay[1:]))
    assert lrs[100] == pytest.approx(cfg.min_lr)
    assert all(lr == pytest.approx(cfg.min_lr) for lr in lrs[100:])
    assert lrs[55] == pytest.approx((cfg.learning_rate + cfg.min_lr) / 2, rel=1e-6)  # cosine midpoint
    assert all(cfg.min_lr - 1e-12 <= lr <= cfg.learning_rate + 1e-12 for lr in lrs[10:])


def test_lr_decay_iters_and_no_decay():
    cfg = lr_cfg(lr_decay_iters=50)
    assert train.get_lr(50, cfg) == pytest.approx(1e-4) and train.get_lr(80, cfg) == pytest.approx(1e-4)
    assert train.get_lr(30, cfg) > 1e-4
    flat = lr_cfg(decay_lr=False)
    assert {train.get_lr(s, flat) for s in (0, 5, 10, 50, 100, 500)} == {1e-3}


def test_lr_no_warmup():
    cfg = lr_cfg(warmup_iters=0)
    assert train.get_lr(0, cfg) == pytest.approx(1e-3)


# ----------------------------------------------------------------------------- a run's outputs


def test_train_outputs(tiny_cfg, char_data):
    cfg = tiny_cfg()
    result = train.train(cfg)
    out = Path(cfg.out_dir)
    meta = dataset.read_meta(char_data)
    assert result["step"] == 20 and math.isfinite(result["val_loss"]) and not result["interrupted"]

    resolved = json.loads((out / "config.json").read_text())
    assert resolved["vocab_size"] == meta["vocab_size"]
    assert "git_commit" in resolved and resolved["n_layer"] == 2 and resolved["tokens_per_step"] == 4 * 16
    model_cfg = dataclasses.replace(cfg.model_config(), vocab_size=meta["vocab_size"])
    assert resolved["num_params"] == GPT(model_cfg).num_params()
    assert cfg == tiny_cfg()  # train() resolves the model without changing the config it was given

    recs = metrics_records(out)
    train_recs = [r for r in recs if "loss" in r]
    eval_recs = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in train_recs] == [5, 10, 15, 20]
    for r in train_recs:
        assert {"step", "loss", "lr", "ms_per_step", "tokens_per_sec"} <= r.keys()
        assert math.isfinite(r["loss"]) and r["ms_per_step"] > 0 and r["tokens_per_sec"] > 0
        assert r["lr"] == pytest.approx(train.get_lr(r["step"] - 1, cfg))
    assert [r["step"] for r in eval_recs] == [0, 10, 20]
    for r in eval_recs:
        assert math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"])
    assert eval_recs[-1]["val_loss"] == pytest.approx(result["val_loss"])
    assert eval_recs[-1]["val_loss"] < eval_recs[0]["val_loss"]

    state = checkpoint.load(out / "ckpt.pt")
    assert CKPT_KEYS <= state.keys()
    assert state["step"] == 20
    assert json.loads(state["tokenizer"]) == meta
    assert state["model_config"] == config.to_dict(model_cfg)
    assert state["config"]["n_layer"] == 2
    for key in state["model"]:
        assert not key.startswith(("_orig_mod.", "module.")), key
    model = GPT(GPTConfig(**state["model_config"]))
    model.load_state_dict(state["model"])  # strict: every key matches
    assert state["optimizer"]["state"]  # Adam moments were saved
    assert not list(out.glob(".ckpt.pt.tmp*"))


def test_checkpoint_keys_unprefixed_when_compiled(tiny_cfg, monkeypatch):
    """With compile=True the saved state dict is the raw module's (no '_orig_mod.' prefix)."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", functools.partial(real, backend="eager"))  # no C++ toolchain needed
    for scope in ("blocks", "model"):
        cfg = tiny_cfg(compile=True, compile_scope=scope, max_iters=2, eval_interval=2, log_interval=1, overwrite=True)
        train.train(cfg)
        assert json.loads((Path(cfg.out_dir) / "config.json").read_text())["compile"] is True
        keys = load_weights(Path(cfg.out_dir) / "ckpt.pt").keys()
        assert "transformer.wte.weight" in keys
        assert not any(k.startswith(("_orig_mod.", "module.", "_compiled")) for k in keys)


def test_checkpoint_interval(tiny_cfg, monkeypatch, tmp_path):
    saved_steps = []
    real = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda state, path: (saved_steps.append(state["step"]), real(state, path)))
    train.train(tiny_cfg(max_iters=25, checkpoint_interval=10))
    assert saved_steps == [10, 20, 25]
    saved_steps.clear()
    train.train(tiny_cfg(max_iters=7, checkpoint_interval=0, out_dir=str(tmp_path / "b")))
    assert saved_steps == [7]


# ----------------------------------------------------------------------------- resume


def test_resume_continues(tiny_cfg):
    cfg = tiny_cfg(max_iters=10)
    train.train(cfg)
    out = Path(cfg.out_dir)
    n_before = len(metrics_records(out))
    result = train.train(tiny_cfg(init_from="resume", max_iters=20))
    assert result["step"] == 20
    new = metrics_records(out)[n_before:]
    new_train = [r for r in new if "loss" in r]
    assert new_train and new_train[0]["step"] > 10 and new_train[-1]["step"] == 20
    assert all(r["step"] >= 10 for r in new)
    assert checkpoint.load(out / "ckpt.pt")["step"] == 20


def test_a_new_run_starts_a_new_log_and_keeps_the_last(tiny_cfg):
    """Resuming appends (above); a scratch run into the same out_dir starts metrics.jsonl afresh."""
    cfg = tiny_cfg(max_iters=4)
    train.train(cfg)
    out = Path(cfg.out_dir)
    first = (out / "metrics.jsonl").read_text()
    train.train(tiny_cfg(max_iters=6, overwrite=True))
    assert (out / "metrics.prev.jsonl").read_text() == first
    steps = [r["step"] for r in metrics_records(out) if "val_loss" in r]
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == 6  # one run only


def test_resume_is_exact(tiny_cfg, tmp_path):
    """10 steps + resume to 20 == 20 steps straight (same schedule, same data, same optimizer state)."""
    common = dict(lr_decay_iters=20, checkpoint_interval=0)
    straight = tiny_cfg(max_iters=20, out_dir=str(tmp_path / "straight"), **common)
    train.train(straight)
    train.train(tiny_cfg(max_iters=10, out_dir=str(tmp_path / "split"), **common))
    train.train(tiny_cfg(max_iters=20, out_dir=str(tmp_path / "split"), init_from="resume", **common))
    a, b = load_weights(tmp_path / "straight/ckpt.pt"), load_weights(tmp_path / "split/ckpt.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k


def test_resume_with_different_shape(tiny_cfg):
    train.train(tiny_cfg(max_iters=4, eval_interval=4, log_interval=2))
    with pytest.raises(checkpoint.CheckpointError) as e:
        train.train(tiny_cfg(init_from="resume", max_iters=8, n_layer=3))
    assert "n_layer=2" in str(e.value) and "3" in str(e.value)


def test_resume_without_checkpoint(tiny_cfg):
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        train.train(tiny_cfg(init_from="resume"))


def test_cli_resume_errors(tiny_cfg, tmp_path, char_data, capsys):
    base = [f"--data_dir={char_data}", *TINY_FLAGS, "--eval_iters=2", "--eval_interval=5", "--log_interval=5"]
    proc = run(["train.py", *base, f"--out_dir={tmp_path / 'empty'}", "--init_from=resume", "--max_iters=5"])
    assert_one_line_error(proc, "no checkpoint")
    cfg = tiny_cfg(max_iters=5)
    train.train(cfg)
    proc = call_main(
        train, [*base, f"--out_dir={cfg.out_dir}", "--init_from=resume", "--max_iters=10", "--n_embd=64"], capsys
    )
    assert_one_line_error(proc, "n_embd", "32", "64")


# ----------------------------------------------------------------------------- gradient accumulation


def test_gradient_accumulation_trains(tiny_cfg):
    cfg = tiny_cfg(gradient_accumulation_steps=2, max_iters=60, eval_interval=30, eval_iters=4)
    result = train.train(cfg)
    recs = [r for r in metrics_records(Path(cfg.out_dir)) if "val_loss" in r]
    assert recs[-1]["val_loss"] < recs[0]["val_loss"] - 0.5
    assert result["step"] == 60


def test_gradient_accumulation_matches_bigger_batch(tiny_cfg, tmp_path):
    """Batch 4 x 2 micro-steps reads the same samples as batch 8 x 1 and averages the same loss,
    so the weights after a few steps agree."""
    common = dict(max_iters=3, eval_interval=100, checkpoint_interval=0, grad_clip=0.0)
    train.train(tiny_cfg(batch_size=4, gradient_accumulation_steps=2, out_dir=str(tmp_path / "accum"), **common))
    train.train(tiny_cfg(batch_size=8, gradient_accumulation_steps=1, out_dir=str(tmp_path / "big"), **common))
    a, b = load_weights(tmp_path / "accum/ckpt.pt"), load_weights(tmp_path / "big/ckpt.pt")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4, rtol=0), k
    (loss_a,) = [r["loss"] for r in metrics_records(tmp_path / "accum") if "loss" in r]
    (loss_b,) = [r["loss"] for r in metrics_records(tmp_path / "big") if "loss" in r]
    assert loss_a == pytest.approx(loss_b, abs=1e-5)  # the logged loss is the mean over micro-batches


# ----------------------------------------------------------------------------- failures


def test_unwritable_out_dir(tiny_cfg, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(config.ConfigError, match="out_dir"):
        train.train(tiny_cfg(out_dir=str(blocker / "sub")))
    proc = call_main(train, [f"--out_dir={blocker / 'sub'}", "--device=cpu", "--max_iters=1"], capsys)
    assert_one_line_error(proc, "out_dir", str(blocker / "sub"))


def nan_from(monkeypatch, micro_batch: int):
    """Every training micro-batch from the given one (1-based) on has a NaN loss."""
    real_forward = GPT.forward
    calls = {"train": 0}

    def forward(self, idx, targets=None, cache=None):
        logits, loss = real_forward(self, idx, targets, cache)
        if self.training:
            calls["train"] += 1
            if calls["train"] >= micro_batch:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward)


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tiny_cfg, monkeypatch):
    """The 13th micro-batch is the 13th step: the log lines' "step 13", after the last good one, step 12."""
    nan_from(monkeypatch, 13)
    cfg = tiny_cfg(max_iters=20, checkpoint_interval=10, log_interval=1)
    with pytest.raises(TrainingError) as e:
        train.train(cfg)
    assert str(e.value).startswith("step 13: loss nan") and "the last checkpoint (step 10) is kept" in str(e.value)
    logged = [r for r in metrics_records(Path(cfg.out_dir)) if "loss" in r]
    assert logged[-1]["step"] == 12 and math.isfinite(logged[-1]["loss"])  # the log's last step, before the NaN
    state = checkpoint.load(Path(cfg.out_dir) / "ckpt.pt")
    assert state["step"] == 10
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    monkeypatch.undo()
    model = GPT(GPTConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    x = torch.zeros(1, 4, dtype=torch.long)
    _, loss = model(x, x)
    assert torch.isfinite(loss)


def test_nan_before_any_checkpoint_says_there_is_none(tiny_cfg, monkeypatch):
    nan_from(monkeypatch, 3)
    cfg = tiny_cfg(max_iters=20, checkpoint_interval=10, log_interval=5)
    with pytest.raises(TrainingError) as e:
        train.train(cfg)
    assert str(e.value).startswith("step 3: loss nan") and "no checkpoint was written yet" in str(e.value)
    assert "is kept" not in str(e.value) and str(e.value).endswith("then start again")
    assert not list(Path(cfg.out_dir).glob("ckpt*.pt"))


def test_cli_diverging_run_fails_with_one_line(tmp_path, char_data, capsys):
    """A learning rate of 1e30 makes the weights (and then the loss) non-finite within a few steps."""
    argv = [
        f"--data_dir={char_data}",
        f"--out_dir={tmp_path}",
        *TINY_FLAGS,
        "--max_iters=50",
        "--eval_interval=100",
        "--eval_iters=2",
        "--learning_rate=1e30",
        "--warmup_iters=0",
        "--checkpoint_interval=1",
        "--compile=False",
    ]
    proc = call_main(train, argv, capsys)
    assert_one_line_error(proc, "step", "not finite", code=1)
    step = int(re.search(r"step (\d+)", proc.stderr).group(1))
    state = checkpoint.load(tmp_path / "ckpt.pt")
    assert state["step"] == step - 1  # the checkpoint of the last good step, the one before the first bad one
    assert f"the last checkpoint (step {step - 1}) is kept" in proc.stderr
    assert all(torch.isfinite(v).all() for v in state["model"].values())


# ----------------------------------------------------------------------------- the real command lines


@pytest.fixture(scope="module")
def trained(tmp_path_factory, char_data):
    out = tmp_path_factory.mktemp("e2e") / "out"
    proc = run(
        [
            "train.py",
            "configs/small.py",
            f"--data_dir={char_data}",
            f"--out_dir={out}",
            "--max_iters=30",
            "--n_layer=2",
            "--n_embd=32",
            "--n_head=2",
            "--block_size=16",
            "--batch_size=4",
            "--eval_interval=15",
            "--eval_iters=2",
            "--log_interval=10",
            "--device=cpu",
        ]
    )
    return out, proc


def sample_cli(out, *flags):
    return run(["sample.py", f"--out_dir={out}", "--device=cpu", *flags])


def sample_here(out, *flags) -> list[str]:
    """sample.sample in this process; returns the samples."""
    cfg = config.parse_args(sample.SampleConfig, [f"--out_dir={out}", "--device=cpu", *flags], allow_file=False)
    buf, log = io.StringIO(), io.StringIO()
    samples = sample.sample(cfg, out=buf, log=log)
    assert buf.getvalue() == "".join(s + "\n" for s in samples)  # only the samples: timings go to log
    assert "tok/s" in log.getvalue()
    return samples


def test_e2e_train_cli(trained):
    out, proc = trained
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert (out / "ckpt.pt").is_file() and (out / "config.json").is_file()
    assert checkpoint.load(out / "ckpt.pt")["step"] == 30
    recs = metrics_records(out)
    assert [r["step"] for r in recs if "loss" in r] == [10, 20, 30]
    assert [r["step"] for r in recs if "val_loss" in r] == [0, 15, 30]
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["n_layer"] == 2 and resolved["learning_rate"] == 5e-3  # the file, then the flags


def test_e2e_sample_cli(trained):
    out, _ = trained
    proc = sample_cli(out, "--num_samples=2", "--max_new_tokens=50", "--start=First")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.count("First") >= 2
    samples = sample_here(out, "--num_samples=2", "--max_new_tokens=50", "--start=First")
    assert proc.stdout == "".join(s + "\n" for s in samples)  # stdout is the samples, nothing else
    assert "2 sample(s) x 50 tokens" in proc.stderr
    assert len(samples) == 2
    vocab = set(tiny_text())
    for s in samples:
        assert s.startswith("First")
        assert len(s) == len("First") + 50
        assert set(s) <= vocab, set(s) - vocab


def test_e2e_sample_greedy_is_repeatable(trained):
    out, _ = trained
    flags = ["--num_samples=2", "--max_new_tokens=40", "--start=First", "--temperature=0"]
    proc = sample_cli(out, *flags)
    assert proc.returncode == 0, proc.stderr
    first = sample_here(out, *flags)
    assert proc.stdout == "".join(s + "\n" for s in first)  # another run, another process: the same text
    assert first[0] == first[1]  # greedy: both samples of one run agree too
    assert sample_here(out, *flags, "--use_cache=False") == first


def test_sample_prompt_from_file(trained, tmp_path):
    out, _ = trained
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("All:\nSpeak")
    (s,) = sample_here(out, "--num_samples=1", "--max_new_tokens=20", f"--start=FILE:{prompt}", "--temperature=0")
    assert s.startswith("All:\nSpeak") and len(s) == len("All:\nSpeak") + 20


def test_sample_seeded_sampling(trained):
    out, _ = trained
    flags = ["--num_samples=2", "--max_new_tokens=60", "--start=First", "--temperature=1.0"]
    a, b = sample_here(out, *flags, "--seed=1"), sample_here(out, *flags, "--seed=1")
    c = sample_here(out, *flags, "--seed=2")
    assert a == b
    assert a != c
    assert a[0] != a[1]  # the two samples of one run differ
    top = sample_here(out, *flags, "--seed=3", "--top_k=1")  # top_k=1 is greedy whatever the seed
    assert top == sample_here(out, *flags[:3], "--temperature=0")


def test_e2e_sample_errors(trained):
    out, _ = trained
    assert_one_line_error(sample_cli(out, "--start=FirstZ"), "'Z'", "vocabulary")
    assert_one_line_error(sample_cli(out, "--top_k=1000"), "top_k")


def test_sample_errors(trained, tmp_path, capsys):
    out, _ = trained
    base = [f"--out_dir={out}", "--device=cpu", "--max_new_tokens=5"]
    assert_one_line_error(call_main(sample, [*base, "--top_k=0"], capsys), "top_k")
    assert_one_line_error(call_main(sample, [*base, "--start="], capsys), "prompt")
    assert_one_line_error(call_main(sample, [*base, f"--start=FILE:{tmp_path / 'no.txt'}"], capsys), "no.txt")
    assert_one_line_error(call_main(sample, [*base, "--dtype=float16"], capsys), "float16")
    assert_one_line_error(call_main(sample, [f"--out_dir={tmp_path}", "--device=cpu"], capsys), "no checkpoint")


def test_sample_bad_device(trained, capsys):
    """sample.py must reject an unknown device as train.py does: one line naming it, exit 2, no traceback."""
    out, _ = trained
    assert_one_line_error(call_main(sample, [f"--out_dir={out}", "--device=tpu"], capsys), "device")


def test_sample_empty_prompt_hint_works(trained, capsys):
    """The empty-prompt error suggests a --start value; typing that suggestion must then work."""
    out, _ = trained
    base = [f"--out_dir={out}", "--device=cpu", "--max_new_tokens=5", "--num_samples=1"]
    proc = call_main(sample, [*base, "--start="], capsys)
    assert_one_line_error(proc, "prompt")
    m = re.search(r"--start='([^']*)'", proc.stderr)  # the suggested flag, as a shell passes it on
    assert m, proc.stderr
    proc = call_main(sample, [*base, f"--start={m.group(1)}"], capsys)
    assert proc.returncode == 0, f"the suggested --start={m.group(1)} fails: {proc.stderr.strip()}"


def test_evaluation_of_a_small_split_is_its_exact_loss(tiny_cfg):
    """The whole-split estimate weights each window once, the partial last batch by its rows: it equals the
    mean loss over all the split's windows computed in one pass."""
    cfg = tiny_cfg(eval_iters=10_000, batch_size=7)
    rt = runtime.init_runtime("cpu", "float32")
    data = train.load_data(cfg, rt)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=65)).eval()
    got = evaluate.estimate_losses(model, {"val": data.evals["val"]}, cfg, rt, runtime.GracefulStop(rt))["val"]
    sampler = data.evals["val"]
    assert sampler.n % sampler.B, "the last batch should be partial for this test"
    x, y = dataset.to_device(sampler.read(0, rows=sampler.n), "cpu")  # every window in one batch
    with torch.no_grad():
        assert got == pytest.approx(model(x, y)[1].item(), rel=1e-5)


def test_an_estimate_after_the_compile_warm_up_compiles_nothing(tiny_cfg, monkeypatch):
    """A split estimated whole ends with a partial batch; it is padded to the warm-up's shape (its padded rows'
    targets ignored), so the compiled blocks see no new shape and the estimate's time is not compile time."""
    from torch._dynamo.utils import counters

    compiled_during = []

    def counting(*args, **kwargs):
        before = counters["stats"]["unique_graphs"]
        out = evaluate.estimate_losses(*args, **kwargs)
        compiled_during.append(counters["stats"]["unique_graphs"] - before)
        return out

    monkeypatch.setattr(train, "estimate_losses", counting)
    torch._dynamo.reset()
    cfg = tiny_cfg(compile=True, eval_iters=10_000, batch_size=7, max_iters=1, eval_interval=1)
    result = train.train(cfg)
    assert len(compiled_during) == 2 and compiled_during == [0, 0], compiled_during
    assert math.isfinite(result["val_loss"])
