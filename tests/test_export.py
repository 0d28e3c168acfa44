"""scripts/export.py and gpt_residual/hf_export.py: a run as a Hugging Face GPT-2 folder that transformers loads
with its Auto classes, computing our logits, with a tokenizer that encodes and decodes as ours."""

import dataclasses
import importlib.util
import json
import os
import shlex
import subprocess
import sys

import pytest
import torch
from conftest import TINY, assert_one_line_error, run

import sample
import train
from data import token_files
from gpt_residual import checkpoint, config, dataset, hf_export, pretrained
from model import GPT, GPTConfig

transformers = pytest.importorskip("transformers")

HARD = [
    "First Citizen:\nBefore we proceed",
    "  runs   of    spaces  ",
    "\n\n\nnewlines\n \n\ttabs\t\t and\r\n",
    "unicode: héllo wörld — “quotes” 日本語 😀 emoji\u200b zero-width",
    " 's 'll 've 're 'd 'm 't  ",
    "123 4567 3.14 a1b2",
    "",
]


def save_run(out_dir, model_cfg: GPTConfig, meta: dict, seed: int = 0):
    """A checkpoint of a random model (biases and norms randomised, so every weight counts) as train.py saves it."""
    torch.manual_seed(seed)
    model = GPT(model_cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    cfg = config.TrainConfig(out_dir=str(out_dir), dataset="tiny")
    state = {
        "model": model.state_dict(),
        "model_config": config.to_dict(model_cfg),
        "config": config.to_dict(cfg),
        "tokenizer": json.dumps(meta),
        "step": 7,
        "last_eval": {"step": 7, "train": 1.5, "val": 1.25},
        "data": {"dataset": "tiny"},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.save(state, out_dir / "ckpt.pt")
    return model.eval()


def char_meta():
    return token_files.char_meta("".join(HARD[:2]) + "FirstCizn:\nBefor")


def small(vocab_size: int, **overrides) -> GPTConfig:
    return GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=vocab_size), **overrides})


@pytest.fixture
def char_run(tmp_path):
    meta = char_meta()
    model = save_run(tmp_path / "run", small(meta["vocab_size"]), meta)
    return tmp_path / "run", model, meta


@pytest.fixture
def bpe_run(tmp_path, gpt2_bpe):
    meta = token_files.gpt2_meta()
    model = save_run(tmp_path / "run", small(50304, bias=False), meta)  # the padded vocabulary, as train.py's
    return tmp_path / "run", model, meta


def logits(model, idx):
    with torch.no_grad():
        return model(idx, targets=idx)[0]


def test_char_export_loads_with_auto_classes_and_matches(char_run, tmp_path):
    out, model, meta = char_run
    diff = hf_export.export(str(out), str(tmp_path / "hf"))
    assert diff <= hf_export.TOLERANCE
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    idx = torch.randint(0, meta["vocab_size"], (2, 16))
    torch.testing.assert_close(hf(idx).logits, logits(model, idx), atol=1e-5, rtol=0)
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "steps: 7" in card and "val loss: 1.2500" in card and "tiny" in card


def test_bpe_export_cuts_vocab_zero_biases_and_ties_head(bpe_run, tmp_path):
    out, model, _ = bpe_run
    hf_export.export(str(out), str(tmp_path / "hf"))
    folder = tmp_path / "hf"
    assert {"model.safetensors", "config.json", "generation_config.json", "vocab.json", "merges.txt"} <= {
        p.name for p in folder.iterdir()
    }
    from safetensors.torch import load_file

    weights = load_file(folder / "model.safetensors")
    assert weights["transformer.wte.weight"].shape == (50257, 32)  # cut back from 50304
    assert "lm_head.weight" not in weights  # tied: saved once
    biases = [k for k in weights if k.endswith(".bias") and ".h." in k and "ln_" not in k]
    assert biases and all(not weights[k].any() for k in biases)  # bias=False: zeros
    torch.testing.assert_close(
        weights["transformer.h.0.attn.c_attn.weight"], model.transformer.h[0].attn.c_attn.weight.t()
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    assert hf.config.eos_token_id == 50256
    idx = torch.randint(0, 50257, (2, 16))
    torch.testing.assert_close(hf(idx).logits, logits(model, idx)[..., :50257], atol=1e-5, rtol=0)


def test_gpt2_tokenizer_equals_tiktoken_on_hard_strings(bpe_run, tmp_path, gpt2_bpe):
    hf_export.export(str(bpe_run[0]), str(tmp_path / "hf"))
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in HARD:
        ids = gpt2_bpe.encode_ordinary(text)
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == text


def test_char_tokenizer_encodes_and_decodes_as_ours(tmp_path):
    meta = token_files.char_meta("".join(HARD))  # every hard character is in the vocabulary
    save_run(tmp_path / "run", small(meta["vocab_size"]), meta)
    hf_export.export(str(tmp_path / "run"), str(tmp_path / "hf"))
    tok, ours = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf"), dataset.Tokenizer(meta)
    for text in [*HARD, "".join(reversed("".join(HARD)))]:
        ids = ours.encode(text)
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == text
    with pytest.raises(Exception, match="UNK|unk"):  # a character outside the vocabulary is refused, as by ours
        tok.encode("#")


SWITCHES = {
    "norm": "rmsnorm",
    "norm_position": "post",
    "deepnorm": True,
    "residual": False,
    "positions": "rope",
    "qk_norm": True,
    "norm_affine": False,
    "embed_norm": True,
    "logit_softcap": 15.0,
    "residual_scalars": True,
    "value_residual": True,
    "attn_gate": "head",
    "norm_scaling": True,
    "depth_scaling": 1.0,
    "hyper_connections": "hc",
    "attn_residuals": "full",
}


def test_every_switch_of_the_config_is_covered():
    """A new GPTConfig switch must be decided here: exportable (a shape, init, dropout, bias, or how the model runs:
    activation_checkpointing) or refused."""
    shape = {"block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "init"}
    shape |= {"activation_checkpointing"}  # recomputes activations in training; the weights are the same
    shape |= {"mix_ln_frac", "dyt_alpha_attn", "dyt_alpha_mlp", "dyt_alpha_final", "base_depth"}  # inert when
    # their switch (norm_position="mix", norm="dyt"|"derf", depth_scaling) is off, and that switch is refused
    shape |= {"n_streams", "attn_residual_blocks"}  # sizes of hyper_connections / attn_residuals, refused when on
    assert {f.name for f in dataclasses.fields(GPTConfig)} - shape == set(SWITCHES) == set(hf_export.EXPORT_ARCH)


@pytest.mark.parametrize("key", sorted(SWITCHES))
def test_switch_gpt2_cannot_express_is_refused_before_writing(tmp_path, key):
    extra = {"norm_position": "post"} if key == "deepnorm" else {}
    meta = char_meta()
    save_run(tmp_path / "run", small(meta["vocab_size"], **{key: SWITCHES[key], **extra}), meta)
    with pytest.raises(hf_export.ExportError, match=f"{key}=") as e:
        hf_export.export(str(tmp_path / "run"), str(tmp_path / "hf"))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "hf").exists() and list(tmp_path.iterdir()) == [tmp_path / "run"]


def test_logit_mismatch_fails_and_removes_the_export(char_run, tmp_path, monkeypatch):
    real = hf_export.to_hf

    def corrupt(model, meta):
        hf = real(model, meta)
        with torch.no_grad():
            hf.transformer.h[0].mlp.c_fc.weight.add_(0.01)
        return hf

    monkeypatch.setattr(hf_export, "to_hf", corrupt)
    with pytest.raises(hf_export.ExportError, match="logits differ"):
        hf_export.export(str(char_run[0]), str(tmp_path / "hf"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # neither the folder nor its temp


def test_every_position_is_compared(tmp_path, monkeypatch):
    """An export wrong from position 64 on (past where an earlier check stopped looking) is refused."""
    meta = char_meta()
    save_run(tmp_path / "run", small(meta["vocab_size"], block_size=80), meta)
    real = hf_export.to_hf

    def wrong_late(model, meta):
        hf = real(model, meta)
        with torch.no_grad():
            hf.transformer.wpe.weight[64:].add_(0.01 * torch.randn_like(hf.transformer.wpe.weight[64:]))
        return hf

    monkeypatch.setattr(hf_export, "to_hf", wrong_late)
    with pytest.raises(hf_export.ExportError, match="logits differ"):
        hf_export.export(str(tmp_path / "run"), str(tmp_path / "hf"))
    monkeypatch.undo()
    assert hf_export.export(str(tmp_path / "run"), str(tmp_path / "hf")) <= hf_export.TOLERANCE


def test_the_card_quotes_the_runs_first_command(char_data, tmp_path, capsys):
    """The model card gives the command that started the run, shell-quoted, not the last resume's; config.json
    records it and each resume's."""
    out = tmp_path / "the run's out"  # a space and a quote: only a quoted command can be pasted back
    common = [*(f"--{k}={v}" for k, v in TINY.items()), f"--data_dir={char_data}", f"--out_dir={out}"]
    first = [*common, "--max_iters=4", "--eval_interval=2"]
    assert train.main(first) == 0
    assert train.main([*common, "--max_iters=6", "--eval_interval=2", "--init_from=resume"]) == 0
    capsys.readouterr()
    hf_export.export(str(out), str(tmp_path / "hf"), command="python -m scripts.export ...")
    card = (tmp_path / "hf" / "README.md").read_text().splitlines()
    trained = card[card.index("Trained with:") + 3]
    assert shlex.split(trained) == ["python", "train.py", *first], trained
    record = json.loads((out / "config.json").read_text())
    assert record["command"] == trained
    assert shlex.split(record["resumes"][0]["command"])[-1] == "--init_from=resume"


def test_init_from_export_round_trip_bpe(bpe_run, tmp_path):
    out, model, meta = bpe_run
    hf_export.export(str(out), str(tmp_path / "hf"))
    back = pretrained.load_pretrained(str(tmp_path / "hf")).eval()
    idx = torch.randint(0, 50257, (2, 16))
    torch.testing.assert_close(logits(back, idx), logits(model, idx)[..., :50257], atol=1e-6, rtol=0)
    loaded, tok = sample.load_model("unused", "cpu", str(tmp_path / "hf"))
    assert tok.kind == "gpt2"
    train.resolve_model(config.TrainConfig(init_from=str(tmp_path / "hf"), block_size=16), meta, None)


def test_init_from_export_round_trip_char(char_run, tmp_path):
    out, model, meta = char_run
    hf_export.export(str(out), str(tmp_path / "hf"))
    loaded, tok = sample.load_model("unused", "cpu", str(tmp_path / "hf"))
    assert tok.kind == "char" and tok.itos == meta["itos"]
    idx = torch.randint(0, meta["vocab_size"], (2, 16))
    torch.testing.assert_close(logits(loaded, idx), logits(model, idx), atol=1e-6, rtol=0)
    cfg = config.TrainConfig(init_from=str(tmp_path / "hf"), block_size=16)
    model_cfg, fine = train.resolve_model(cfg, meta, None)
    torch.testing.assert_close(logits(fine.eval(), idx), logits(model, idx), atol=1e-6, rtol=0)
    other = token_files.char_meta("abc")
    with pytest.raises(pretrained.PretrainedError, match="char vocabulary of"):
        train.resolve_model(cfg, other, None)


def test_cli_exports_and_prints_the_difference(char_run, tmp_path):
    proc = run(["-m", "scripts.export", f"--out_dir={char_run[0]}", f"--to={tmp_path / 'hf'}"])
    assert proc.returncode == 0, proc.stderr
    assert "largest logit difference" in proc.stdout
    assert "python -m scripts.export --out_dir=" in (tmp_path / "hf" / "README.md").read_text()


@pytest.mark.parametrize("case", ["no_checkpoint", "no_to", "not_empty", "refused"])
def test_cli_errors_are_one_line(tmp_path, case):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    meta = char_meta()
    save_run(tmp_path / "run", small(meta["vocab_size"], positions="rope" if case == "refused" else "learned"), meta)
    args = {
        "no_checkpoint": [f"--out_dir={tmp_path / 'nothing'}", f"--to={tmp_path / 'hf'}"],
        "no_to": [f"--out_dir={tmp_path / 'run'}"],
        "not_empty": [f"--out_dir={tmp_path / 'run'}", f"--to={tmp_path / 'full'}"],
        "refused": [f"--out_dir={tmp_path / 'run'}", f"--to={tmp_path / 'hf'}"],
    }[case]
    needle = {"no_checkpoint": "no checkpoint", "no_to": "--to=", "not_empty": "not empty", "refused": "positions="}
    assert_one_line_error(run(["-m", "scripts.export", *args]), needle[case])
    assert (tmp_path / "full" / "keep.txt").read_text() == "x" and not (tmp_path / "hf").exists()


def test_lm_eval_harness_logliks_equal_ours(char_run, tmp_path):
    """lm-eval-harness scores a local multiple-choice file on an export offline, each ending's summed
    log-likelihood given its context equal to our model's. lm-eval runs in its own environment, as a user runs it
    (CI: .ci/run's virtual environment, named by LM_EVAL_PYTHON); where none is set up, this one's lm_eval."""
    python = lm_eval_python()
    out, model, meta = char_run
    hf_export.export(str(out), str(tmp_path / "hf"))
    docs = [
        {"ctx": "Fi\nBefo", "endings": ["re", "r", "irst"], "label": 0},
        {"ctx": "Ci", "endings": ["tizen", "z"], "label": 1},
    ]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    validation: {tmp_path / 'mc.jsonl'}\nvalidation_split: validation\noutput_type: multiple_choice\n"
        'doc_to_text: "{{ctx}}"\ndoc_to_choice: "{{endings}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    newline = meta["itos"].index("\n")  # a char vocabulary has no end-of-text token: lm-eval needs a prefix id
    args = [
        python,
        "-m",
        "lm_eval",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={tmp_path / 'hf'},dtype=float32,prefix_token_id={newline}",
        "--tasks",
        "tiny_mc",
        "--include_path",
        str(tmp_path / "tasks"),
        "--device",
        "cpu",
        "--output_path",
        str(tmp_path / "lm"),
        "--log_samples",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "ds")}
    proc = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = [json.loads(line) for f in (tmp_path / "lm").rglob("samples_tiny_mc_*.jsonl") for line in open(f)]
    tok = dataset.Tokenizer(meta)
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        doc = docs[s["doc_id"]]
        for ending, resp in zip(doc["endings"], s["resps"]):
            ctx, cont = tok.encode(doc["ctx"]), tok.encode(" " + ending)
            idx = torch.tensor([ctx + cont])
            logp = torch.log_softmax(logits(model, idx)[0, :-1].double(), -1)
            ours = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
            assert float(resp[0][0]) == pytest.approx(ours, abs=1e-4)
    assert len(samples) == len(docs)


def lm_eval_python() -> str:
    """The Python that runs lm-eval: $LM_EVAL_PYTHON when set (then it must work: CI sets it, so the test cannot
    skip there), else this one when it has lm_eval; skips only where neither is set up (pip install lm-eval[hf])."""
    chosen = os.environ.get("LM_EVAL_PYTHON")
    if chosen:
        return chosen
    if importlib.util.find_spec("lm_eval") is None:
        pytest.skip("lm-eval is not installed here; set LM_EVAL_PYTHON to a Python that has it (.ci/run makes one)")
    return sys.executable
