"""pretrained.py: a small random GPT-2 saved in Hugging Face format loads into our GPT and computes the same thing."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, assert_one_line_error, run, tiny_text

import sample
import train
from data import token_files
from gpt_residual import dataset, optim
from gpt_residual.engine import generate
from gpt_residual.pretrained import PretrainedError, check_compatible, load_pretrained
from model import GPT, GPTConfig

transformers = pytest.importorskip("transformers")  # CI installs it; this guard is for bare checkouts

SMALL = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=100, bos_token_id=None, eos_token_id=None)


def save_hf(folder, **overrides):
    """A random HF GPT-2 (eval mode) saved to folder; returns it."""
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**SMALL, **overrides})).eval()
    with torch.no_grad():  # HF zeroes biases and sets LayerNorms to 1/0: randomise them so every weight counts
        for _name, p in hf.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(folder)
    return hf


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_gpt2")
    save_hf(folder)
    return folder


def test_logits_match_huggingface(hf_dir):
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    model = load_pretrained(str(hf_dir)).eval()
    c = model.config
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size) == (2, 2, 32, 64, 100)
    assert (c.norm, c.norm_position, c.bias, c.residual, c.deepnorm) == ("layernorm", "pre", True, True, False)
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied after loading
    idx = torch.randint(0, 100, (3, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(idx, targets=idx)  # with targets: the logits of every position
        theirs = hf(idx).logits
    assert ours.shape == theirs.shape == (3, 64, 100)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_greedy_generation_matches_huggingface(hf_dir):
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    model = load_pretrained(str(hf_dir)).eval()
    prompt = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(2))
    ours = generate(model, prompt, 20, temperature=0.0)
    theirs = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, min_new_tokens=20, do_sample=False,
        pad_token_id=0,
    )  # fmt: skip
    assert ours.shape == (2, 25)
    assert torch.equal(ours, theirs)


def test_dropout_and_cropped_block_size(hf_dir):
    full = load_pretrained(str(hf_dir)).eval()
    model = load_pretrained(str(hf_dir), dropout=0.1, block_size=16)
    assert model.config.dropout == 0.1 and model.transformer.drop.p == 0.1
    assert model.config.block_size == 16 and model.transformer.wpe.weight.shape == (16, 32)
    idx = torch.randint(0, 100, (2, 16))
    with torch.no_grad():  # the first 16 positions compute exactly what the uncropped model does
        torch.testing.assert_close(model.eval()(idx, idx)[0], full(idx, idx)[0])
    with pytest.raises(PretrainedError, match="block_size 65"):
        load_pretrained(str(hf_dir), block_size=65)
    # as a checkpoint stores it: GPT(GPTConfig(**model_config)) takes the cropped weights
    copy = GPT(GPTConfig(**dataclasses.asdict(model.config)))
    copy.load_state_dict(model.state_dict())
    torch.testing.assert_close(copy.eval()(idx, idx)[0], full(idx, idx)[0])


def test_fine_tuning_step(hf_dir):
    model = load_pretrained(str(hf_dir), dropout=0.1)
    optimizer = optim.build(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
    idx = torch.randint(0, 100, (4, 33), generator=torch.Generator().manual_seed(3))
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    losses = []
    for _ in range(5):  # one batch, over and over: the loss must fall
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    "override, key",
    [
        ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon"),
        ({"activation_function": "relu"}, "activation_function"),
        ({"n_inner": 64}, "n_inner"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ],
)
def test_refuses_checkpoints_we_cannot_compute(tmp_path, override, key):
    save_hf(tmp_path, **override)
    with pytest.raises(PretrainedError, match=key) as info:
        load_pretrained(str(tmp_path))
    assert "\n" not in str(info.value)


def test_refuses_other_architectures(tmp_path):
    bert = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64)
    bert.save_pretrained(tmp_path)
    with pytest.raises(PretrainedError, match="model_type 'bert'"):
        load_pretrained(str(tmp_path))


def test_folder_errors(tmp_path, hf_dir):
    with pytest.raises(PretrainedError, match="no config.json"):
        load_pretrained(str(tmp_path))
    with pytest.raises(PretrainedError, match="not a folder"):
        load_pretrained(str(tmp_path / "missing" / "model"))
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())  # config but no weights
    with pytest.raises(PretrainedError, match="could not load .*model.safetensors"):
        load_pretrained(str(tmp_path))


def test_missing_transformers_is_one_line(monkeypatch, hf_dir):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(PretrainedError, match=r"pip install transformers \(or pip install -e \.\[hf\]\)"):
        load_pretrained(str(hf_dir))


def test_check_compatible():
    check_compatible(GPTConfig())  # GPT-2's own architecture
    for bad, key in [
        (dict(norm="rmsnorm"), "norm='rmsnorm'"),
        (dict(norm_position="post"), "norm_position='post'"),
        (dict(norm_position="peri"), "norm_position='peri'"),
        (dict(norm_position="post", deepnorm=True), "deepnorm=True"),
        (dict(residual=False), "residual=False"),
    ]:
        with pytest.raises(PretrainedError, match=key):
            check_compatible(GPTConfig(**bad))
    check_compatible(GPTConfig(bias=False, n_layer=2))  # the shape, biases included, comes from the checkpoint


def cli(arg: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # a Hub name fails at once instead of retrying the network
    cmd = [sys.executable, "-m", "gpt_residual.pretrained", arg]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


def test_cli_unknown_hub_name_is_one_line_offline():
    result = cli("no-such-org/no-such-model")
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not load 'no-such-org/no-such-model'"), lines
    assert "network" in lines[0]


def test_train_and_sample_from_a_local_folder(tmp_path, tiny_cfg, gpt2_bpe):
    """train.py init_from=<folder>: fine-tunes the pretrained weights on BPE data; resume and sample.py follow."""
    src = tmp_path / "hf"
    save_hf(src, vocab_size=50257)  # GPT-2's vocabulary, so the BPE dataset fits
    data = tmp_path / "bpe"
    tok = dataset.Tokenizer(token_files.gpt2_meta())
    text = tiny_text()
    token_files.write_dataset(data, tok.encode(text[:4000]), tok.encode(text[4000:]), token_files.gpt2_meta())
    cfg = tiny_cfg(init_from=str(src), data_dir=str(data), max_iters=4, eval_interval=2, block_size=16)
    result = train.train(cfg)
    saved = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert saved["model_config"]["vocab_size"] == 50257 and saved["model_config"]["bias"] is True
    assert saved["model"]["transformer.wpe.weight"].shape == (16, 32)  # cropped to block_size
    resumed = train.train(tiny_cfg(init_from="resume", data_dir=str(data), max_iters=6, eval_interval=2, block_size=16))
    assert resumed["step"] == 6 and result["step"] == 4
    model, _ = sample.load_model(str(tmp_path / "out"), "cpu")
    assert model.config.n_embd == 32
    with pytest.raises(PretrainedError, match="norm='rmsnorm'"):
        train.train(tiny_cfg(init_from=str(src), data_dir=str(data), norm="rmsnorm", out_dir=str(tmp_path / "o2")))


HUB_OFFLINE_ADVICE = (
    "no network to the Hugging Face Hub",
    "not in the local cache",
    "pass a local Hugging Face folder",
)


def bpe_dataset(folder):
    """A GPT-2-vocabulary dataset written without the BPE (random ids), for runs that must not need tiktoken."""
    ids = torch.randint(0, 50257, (3000,), generator=torch.Generator().manual_seed(0)).tolist()
    token_files.write_dataset(folder, ids[:2700], ids[2700:], token_files.gpt2_meta())
    return folder


@pytest.mark.parametrize(
    "args",
    [
        ["-m", "gpt_residual.pretrained", "gpt2"],
        ["sample.py", "--init_from=gpt2", "--device=cpu"],
        ["train.py", "--init_from=gpt2", "--device=cpu", "--block_size=16", "--max_iters=1"],
    ],
    ids=["pretrained", "sample", "train"],
)
def test_hub_name_offline_is_one_line(tmp_path, offline_env, args, request):
    """No network and an empty Hugging Face cache: one line that says to pass a local folder, at once, not after
    the Hub client's ~25 s of logged retries (which would also break the one line)."""
    env = offline_env
    if args[0] == "train.py":
        args = [*args, f"--data_dir={bpe_dataset(tmp_path / 'bpe')}", f"--out_dir={tmp_path / 'out'}"]
    if args[0] == "sample.py":  # sample.py loads the BPE before the weights: give it the BPE, so the Hub is what fails
        request.getfixturevalue("gpt2_bpe")
        env = {k: v for k, v in offline_env.items() if k != "TIKTOKEN_CACHE_DIR"}
        if os.environ.get("TIKTOKEN_CACHE_DIR"):
            env["TIKTOKEN_CACHE_DIR"] = os.environ["TIKTOKEN_CACHE_DIR"]
    proc = run(args, env=env, timeout=120)
    assert_one_line_error(proc, "could not load 'gpt2'", *HUB_OFFLINE_ADVICE)


def test_sample_from_a_local_folder_without_the_bpe_is_one_line(tmp_path, offline_env, hf_dir):
    """The weights load from the folder; the GPT-2 BPE that sample.py then needs is neither cached nor downloadable."""
    env = {**offline_env, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # transformers' "Loading weights" bar, on stderr
    proc = run(["sample.py", f"--init_from={hf_dir}", "--device=cpu", "--max_new_tokens=2"], env=env)
    assert_one_line_error(proc, "cannot load the GPT-2 BPE", "set TIKTOKEN_CACHE_DIR")


def test_fine_tuned_run_resumes_again_and_again(tmp_path, tiny_cfg):
    """Fine-tune a 3-layer, 48-wide model (a shape unlike the config's), then resume twice: every checkpoint
    says where the weights came from, so the second resume still takes the checkpoint's shape."""
    src = tmp_path / "hf"
    save_hf(src, n_layer=3, n_embd=48, n_head=2, vocab_size=50257)
    data = str(bpe_dataset(tmp_path / "bpe"))
    common = dict(data_dir=data, eval_interval=2, block_size=16)
    train.train(tiny_cfg(init_from=str(src), max_iters=2, **common))
    steps = [train.train(tiny_cfg(init_from="resume", max_iters=n, **common))["step"] for n in (4, 6)]
    assert steps == [4, 6]
    saved = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert saved["weights_from"] == str(src) and saved["config"]["init_from"] == "resume"
    assert (saved["model_config"]["n_layer"], saved["model_config"]["n_embd"]) == (3, 48)
