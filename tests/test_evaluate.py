"""gpt_residual/evaluate.py: bits per byte beside every loss estimate, and sample_interval's samples while training."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, TINY, metrics_records, tiny_text

import train
from data import token_files
from gpt_residual import config, dataset, evaluate, runtime
from model import GPT, GPTConfig

EOT = 50256


def estimate(model, data, cfg):
    rt = runtime.init_runtime("cpu", "float32")
    table = evaluate.byte_table(data.meta, model.config.vocab_size, "cpu")
    return evaluate.estimate_losses(model, data.evals, cfg, rt, runtime.GracefulStop(rt), table)


def test_char_bpb_on_ascii_is_loss_over_ln2(tiny_cfg):
    """A char of ASCII text is one byte: bits per byte is the loss in nats per token over ln 2."""
    cfg = tiny_cfg(eval_iters=3)
    data = train.load_data(cfg, runtime.init_runtime("cpu", "float32"))
    assert all(ord(ch) < 128 for ch in data.meta["itos"])
    torch.manual_seed(0)
    got = estimate(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=65)), data, cfg)
    for split in ("train", "val"):
        assert got[f"{split}_bpb"] == pytest.approx(got[split] / math.log(2), rel=1e-5)


@pytest.fixture
def bpe_data(tmp_path, gpt2_bpe):
    """A GPT-2 BPE dataset with multi-byte characters and an end-of-text token between paragraphs."""
    text = tiny_text(6).replace("famish", "famish — naïve café, ☃").replace("people", "people 😀")
    ids = []
    for paragraph in text.split("\n\n"):
        ids += [*gpt2_bpe.encode_ordinary(paragraph + "\n\n"), EOT]
    cut = int(len(ids) * 0.8)
    token_files.write_dataset(tmp_path / "bpe", ids[:cut], ids[cut:], token_files.gpt2_meta())
    return tmp_path / "bpe"


def test_bpe_bpb_is_a_direct_computation_over_the_same_windows(tiny_cfg, bpe_data, gpt2_bpe):
    """Summed cross-entropy over the targets that are not end-of-text, in bits, over the UTF-8 bytes of those
    targets (tiktoken's own bytes), for the windows the estimate read; the loss itself still counts every target."""
    cfg = tiny_cfg(data_dir=str(bpe_data), eval_iters=2)
    data = train.load_data(cfg, runtime.init_runtime("cpu", "float32"))
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50304)).eval()
    got = estimate(model, data, cfg)
    for split, sampler in data.evals.items():
        x, y = dataset.to_device(sampler.read(0, rows=sampler.estimate_samples(cfg.eval_iters)), "cpu")
        with torch.no_grad():
            logits, loss = model(x, y)
        nats = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        targets = y.flatten().tolist()
        assert EOT in targets, "the windows should hold end-of-text targets for this test"
        kept = [i for i, t in enumerate(targets) if t != EOT]
        nbytes = sum(len(gpt2_bpe.decode_single_token_bytes(targets[i])) for i in kept)
        assert nbytes > len(kept)  # multi-byte tokens: bpb is not loss / ln 2 here
        want = nats[kept].sum().item() / math.log(2) / nbytes
        assert got[f"{split}_bpb"] == pytest.approx(want, rel=1e-5)
        assert got[split] == pytest.approx(loss.item(), rel=1e-5)


def test_byte_table_pads_and_special_tokens_have_no_bytes(gpt2_bpe):
    table = evaluate.byte_table(token_files.gpt2_meta(), 50304, "cpu")
    assert table[EOT] == 0 and table[50257:].abs().sum() == 0
    assert table[gpt2_bpe.encode_ordinary(" the")[0]] == 4
    char = evaluate.byte_table(token_files.char_meta("aé☃😀"), 6, "cpu").tolist()
    assert char == [1, 2, 3, 4, 0, 0]


# ----------------------------------------------------------------------------- samples while training


@pytest.fixture
def count_generate(monkeypatch):
    """Counts the calls of the engine's draw made by the training sampler (then runs the real one)."""
    calls = []

    def counted(model, tok, idx, max_new_tokens, **kw):
        calls.append((idx.tolist(), max_new_tokens, kw, model.training))
        return real(model, tok, idx, max_new_tokens, **kw)

    real = evaluate.draw
    monkeypatch.setattr(evaluate, "draw", counted)
    return calls


def run(tiny_cfg, capsys, out, **kw) -> tuple[dict, list[dict], str]:
    capsys.readouterr()
    summary = train.train(tiny_cfg(out_dir=str(out), dropout=0.1, **kw))  # dropout: the RNG stream matters
    return summary, metrics_records(out), capsys.readouterr().out


def losses(records: list[dict]) -> list:
    return [(r["step"], r.get("loss"), r.get("train_loss"), r.get("val_loss")) for r in records if "sample" not in r]


def test_samples_while_training(tiny_cfg, capsys, tmp_path, count_generate):
    """Off: no generation at all. On: a sample at each sample_interval eval step and the last, printed and logged,
    through the KV-cached engine in eval mode, the same in two runs; the losses equal those of the run without."""
    off_summary, off, off_out = run(tiny_cfg, capsys, tmp_path / "off", max_iters=30)
    assert count_generate == [] and not any("sample" in r for r in off) and ": sample after" not in off_out
    evals = [r for r in off if "val_loss" in r]
    assert evals and all(r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2)) for r in evals)
    assert off_summary["val_bpb"] == evals[-1]["val_bpb"] and off_summary["train_bpb"] == evals[-1]["train_bpb"]

    flags = dict(sample_interval=20, sample_tokens=12, sample_prompt="First")
    summary, on, out = run(tiny_cfg, capsys, tmp_path / "on", max_iters=30, **flags)
    samples = {r["step"]: r["sample"] for r in on if "sample" in r}
    assert list(samples) == [0, 20, 30]  # the eval steps at multiples of 20, and the last
    assert len(count_generate) == 3 and all(n == 12 and not training for _, n, _, training in count_generate)
    assert all(kw.get("use_cache", True) for _, _, kw, _ in count_generate)
    assert all(f"  | {text.splitlines()[0]}" in out for text in samples.values() if text.strip())
    again = {r["step"]: r["sample"] for r in run(tiny_cfg, capsys, tmp_path / "again", max_iters=30, **flags)[1]
             if "sample" in r}  # fmt: skip
    assert again == samples
    assert len(set(samples.values())) > 1  # the model changes between samples; the draw does not
    assert losses(on) == losses(off)  # every training and eval loss, exactly


def test_sample_settings_are_checked(tiny_cfg):
    with pytest.raises(config.ConfigError, match="multiple of eval_interval"):
        tiny_cfg(sample_interval=15)
    with pytest.raises(config.ConfigError, match="sample_prompt is empty"):
        tiny_cfg(sample_interval=10, sample_prompt="")
    with pytest.raises(config.ConfigError, match="sample_tokens must be positive"):
        tiny_cfg(sample_tokens=0)
    with pytest.raises(config.ConfigError, match="parallel=fsdp"):
        tiny_cfg(sample_interval=10, parallel="fsdp").for_world(2)
    assert tiny_cfg(sample_interval=10, parallel="fsdp").for_world(1).sample_interval == 10
    rt = runtime.init_runtime("cpu", "float32")
    meta = token_files.char_meta(tiny_text(1))
    with pytest.raises(dataset.DataError, match="outside this model's vocabulary"):
        evaluate.TrainingSampler(tiny_cfg(sample_interval=10, sample_prompt="€"), rt, meta)
    rank1 = runtime.Runtime(1, 1, 2, "cpu", torch.float32, False)  # a rank that never draws checks the prompt too
    with pytest.raises(dataset.DataError, match="outside this model's vocabulary"):
        evaluate.TrainingSampler(tiny_cfg(sample_interval=10, sample_prompt="€"), rank1, meta)


class Log:
    def log(self, record):
        self.record = record


def test_training_samples_never_pick_padded_ids(tiny_cfg, gpt2_bpe):
    """A BPE model (50257 ids padded to 50304) whose padded ids win every logit: the sample is drawn as sample.py
    draws (vocab_limit), so it holds real tokens only and decodes (tiktoken raises KeyError on a padded id)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=1, n_embd=8)).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[50300:].fill_(1.0)
        model.lm_head.weight[:50257, 0] = torch.linspace(-1, 1, 50257)  # the real ids differ among themselves
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(3.0)  # the stream after ln_f: all 3s, so the padded ids' logits are 24
    cfg = tiny_cfg(sample_interval=10, sample_tokens=8, sample_prompt="Hello")
    sampler = evaluate.TrainingSampler(cfg, runtime.init_runtime("cpu", "float32"), token_files.gpt2_meta())
    log = Log()
    text = sampler(model, 10, log)
    assert text and text == log.record["sample"]


@pytest.mark.parametrize("hook", ["samples", "hellaswag"])
def test_sigterm_during_samples_or_hellaswag_stops_within_seconds(tmp_path, char_data, hook):
    """A real SIGTERM at a random instant while the training samples (a million tokens) or HellaSwag (20,000
    examples) run, each minutes of work: the run stops within seconds, exit 0, with the resume command, the
    checkpoint untouched, and nothing logged for the abandoned work. Two trials, each resuming the same run."""
    base = [f"--{k}={v}" for k, v in TINY.items()] + [f"--data_dir={char_data}", f"--out_dir={tmp_path / 'out'}"]
    subprocess.run([sys.executable, "train.py", *base, "--max_iters=10"], cwd=ROOT, check=True, capture_output=True)
    if hook == "samples":
        flags = ["--sample_interval=10", "--sample_tokens=1000000"]
    else:
        words = tiny_text(1).split()
        line = lambda i: json.dumps({"ctx": " ".join(words[i % 9 : i % 9 + 4]), "endings": words[:4], "label": i % 4})
        (tmp_path / "mc.jsonl").write_text("".join(line(i) + "\n" for i in range(20_000)))
        flags = ["--hellaswag_interval=10", "--hellaswag_examples=20000", f"--hellaswag_data={tmp_path / 'mc.jsonl'}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    before = (tmp_path / "out" / "ckpt.pt").read_bytes()
    for _ in range(2):
        cmd = [sys.executable, "train.py", *base, "--max_iters=30", "--init_from=resume", *flags]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            for line in proc.stdout:  # the eval line of step 10 comes right before the hooks
                if line.startswith("step 10: train loss"):
                    break
            time.sleep(random.uniform(0.0, 1.0))
            t0 = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
            seconds = time.perf_counter() - t0
        finally:
            proc.kill()
        assert proc.returncode == 0, err[-2000:]
        assert seconds < 15, f"{hook}: {seconds:.1f}s from SIGTERM to exit"
        assert "stopped by SIGTERM at step 10" in out and "resume with:" in out
        assert not [r for r in metrics_records(tmp_path / "out") if "sample" in r or "hellaswag_acc" in r]
    assert (tmp_path / "out" / "ckpt.pt").read_bytes() == before
