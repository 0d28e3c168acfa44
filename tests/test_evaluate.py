"""gpt_residual/evaluate.py: bits per byte beside every loss estimate, and sample_interval's samples while training."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import metrics_records, tiny_text

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
    """Counts the calls of the engine's generate made by the training sampler (then runs the real one)."""
    calls = []

    def counted(model, idx, max_new_tokens, **kw):
        calls.append((idx.tolist(), max_new_tokens, kw, model.training))
        return real(model, idx, max_new_tokens, **kw)

    real = evaluate.generate
    monkeypatch.setattr(evaluate, "generate", counted)
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
