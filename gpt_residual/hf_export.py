"""A trained run as a Hugging Face GPT-2 folder: transformers, lm-eval-harness and serving stacks load it as is.

    python -m scripts.export --out_dir=out --to=out-hf
    transformers.AutoModelForCausalLM.from_pretrained("out-hf"); transformers.AutoTokenizer.from_pretrained("out-hf")

The folder holds GPT2LMHeadModel's weights (model.safetensors, written by transformers' save_pretrained: GPT-2's
Conv1D layout, the head tied to the token embedding, the vocabulary cut back from the padded size to the
tokenizer's), config.json, generation_config.json, the tokenizer and a model card (README.md). GPT-2's BPE is
written as GPT-2's own files (vocab.json, merges.txt, tokenizer.json: tiktoken's cached encoder.json and vocab.bpe
are those files); a char vocabulary as a tokenizer.json of one token per character (tokenizers' WordLevel over a
pre-tokenizer that splits every character, decoded by joining them). A bias=False model is written with zero
biases, which computes the same. A model whose architecture GPT-2 cannot express is refused before anything is
written; after writing, the folder is loaded back and its logits compared with ours at every position of the
context (the export is removed when they differ by more than TOLERANCE).
"""

import json
import shlex
import shutil
import tempfile
from pathlib import Path

import torch

from gpt_residual import checkpoint, config, dataset, files, pretrained
from model import GPT, GPTConfig

TOLERANCE = 1e-4  # largest float32 logit difference between our model and the export
# tiktoken's GPT-2 BPE files (tiktoken_ext.openai_public.gpt2): GPT-2's vocab.json and merges.txt, byte for byte
BPE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
BPE_FILES = {"vocab.json": "encoder.json", "merges.txt": "vocab.bpe"}
END_OF_TEXT = "<|endoftext|>"
# the GPTConfig switches GPT2LMHeadModel has no weights or code for; bias=False is expressible (zero biases)
EXPORT_ARCH = {k: v for k, v in pretrained.GPT2_ARCH.items() if k != "bias"}


class ExportError(ValueError):
    """A run cannot be exported; the message says what to do, in one line."""


def check_exportable(cfg: GPTConfig) -> None:
    """Refuse, in one line naming the switches, a model GPT-2's architecture cannot express."""
    wrong = {k: getattr(cfg, k) for k, v in EXPORT_ARCH.items() if getattr(cfg, k) != v}
    if wrong:
        have = ", ".join(f"{k}={v!r}" for k, v in wrong.items())
        need = ", ".join(f"{k}={EXPORT_ARCH[k]!r}" for k in wrong)
        raise ExportError(
            f"cannot export to GPT-2's format: this model has {have}, which GPT-2's architecture cannot express "
            f"(it needs {need}); only GPT-2-shaped models export"
        )


def load_run(out_dir: str) -> tuple[GPT, dict, dict]:
    """(our model in eval mode, the dataset's meta.json, the checkpoint) of out_dir/ckpt.pt."""
    state = checkpoint.load(Path(out_dir) / "ckpt.pt", mmap=True)
    check_exportable(GPTConfig(**state["model_config"]))
    return pretrained.from_checkpoint(state).eval(), json.loads(state["tokenizer"]), state


def hf_config(model_cfg: GPTConfig, meta: dict):
    """transformers' GPT2Config for our model with the tokenizer's (unpadded) vocabulary."""
    import transformers

    eos = meta["vocab_size"] - 1 if meta["tokenizer"] == "gpt2" else None  # GPT-2's <|endoftext|> is its last id
    return transformers.GPT2Config(
        vocab_size=meta["vocab_size"],
        n_positions=model_cfg.block_size,
        n_embd=model_cfg.n_embd,
        n_layer=model_cfg.n_layer,
        n_head=model_cfg.n_head,
        n_inner=None,  # 4 * n_embd, as our MLP
        activation_function="gelu_new",  # the tanh GELU, as our MLP
        layer_norm_epsilon=1e-5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eos,
        eos_token_id=eos,
        tie_word_embeddings=True,
    )


def to_hf(model: GPT, meta: dict):
    """A transformers GPT2LMHeadModel (eval mode) computing what model computes on the tokenizer's vocabulary."""
    import transformers

    hf = transformers.GPT2LMHeadModel(hf_config(model.config, meta)).eval()
    ours, vocab = model.state_dict(), meta["vocab_size"]
    with torch.no_grad():
        for key, target in hf.state_dict().items():
            if key.endswith(pretrained.SKIPPED) or key == "lm_head.weight":
                continue  # causal-mask buffers; the head is tied to wte
            if key not in ours:
                if model.config.bias or not key.endswith(".bias"):
                    raise ExportError(f"our model has no weight for GPT-2's {key}; the checkpoint is not GPT-2-shaped")
                target.zero_()  # a bias=False model: GPT-2's biases, all zero
                continue
            value = ours[key][:vocab] if key == "transformer.wte.weight" else ours[key]
            target.copy_(value.t() if key.endswith(pretrained.TRANSPOSED) else value)
    if hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr():
        raise ExportError("transformers did not tie GPT-2's lm_head to its embeddings; upgrade transformers")
    return hf


def char_tokenizer(itos: list[str], max_length: int):
    """Our char vocabulary as a transformers fast tokenizer: one token per character, decoded by joining."""
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={ch: i for i, ch in enumerate(itos)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pretrained.CHAR_SPLIT), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, clean_up_tokenization_spaces=False, model_max_length=max_length
    )


def write_gpt2_tokenizer(folder: Path, max_length: int):
    """GPT-2's tokenizer files in folder, from tiktoken's cache (a one-line DataError offline without it)."""
    import transformers
    from tiktoken.load import read_file_cached

    dataset.gpt2_encoding()  # fills or checks the cache; offline without it, the one-line error
    for name, source in BPE_FILES.items():
        (folder / name).write_bytes(read_file_cached(BPE_URL + source))
    tok = transformers.GPT2TokenizerFast.from_pretrained(str(folder), model_max_length=max_length)
    tok.save_pretrained(str(folder))


def write_tokenizer(folder: Path, meta: dict, max_length: int):
    """The tokenizer's files; max_length (the context) is what lm-eval-harness and pipelines truncate to."""
    if meta["tokenizer"] == "gpt2":
        write_gpt2_tokenizer(folder, max_length)
        return
    char_tokenizer(meta["itos"], max_length).save_pretrained(str(folder))
    path = folder / "tokenizer_config.json"  # transformers 5 names its class TokenizersBackend, 4.x cannot load it
    path.write_text(json.dumps({**json.loads(path.read_text()), "tokenizer_class": "PreTrainedTokenizerFast"}))


def train_command(state: dict) -> tuple[str, bool]:
    """(the command that started the run, whether it was recorded). A checkpoint carries its run's first command
    (train.py records it; a resume keeps it); one without (train.train called from Python, or an older checkpoint)
    gets `python train.py --k=v ...` of its keys that differ from the defaults, with the run's own init_from."""
    if state.get("command"):
        return state["command"], True
    saved = {**state["config"], "init_from": state.get("weights_from", state["config"].get("init_from"))}
    defaults = config.to_dict(config.TrainConfig())
    keys = [f"--{k}={v}" for k, v in saved.items() if k in defaults and defaults[k] != v]
    return shlex.join(["python", "train.py", *keys]), False


def model_card(model: GPT, meta: dict, state: dict, command: str) -> str:
    c, last = model.config, state.get("last_eval") or {}
    trained, recorded = train_command(state)
    val = f"{last['val']:.4f}" if isinstance(last.get("val"), float) else "not estimated"
    bpb = last.get("val_bpb")
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "---",
        f"# {Path(state['config'].get('out_dir', 'model')).name}",
        "",
        f"A GPT-2-architecture language model (GPT2LMHeadModel) trained with gpt-residual: {c.n_layer} layers, "
        f"{c.n_head} heads, {c.n_embd} wide, context {c.block_size}, {model.num_params() / 1e6:.2f}M parameters "
        f"(without the position embeddings), biases {'learned' if c.bias else 'zero (trained without)'}.",
        "",
        f"- dataset: {state.get('data', {}).get('dataset', '?')}, tokenizer: {meta['tokenizer']} "
        f"(vocabulary {meta['vocab_size']})",
        f"- steps: {state['step']}",
        f"- val loss: {val} (nats per token)" + (f", val bits per byte: {bpb:.4f}" if bpb is not None else ""),
        "",
        "Trained with" + ("" if recorded else " (the command line was not recorded; these are its keys)") + ":",
        "",
        "```bash",
        trained,
        "```",
        "",
        "Exported with:",
        "",
        "```bash",
        command,
        "```",
        "",
    ]
    return "\n".join(lines)


def max_logit_diff(model: GPT, folder: Path, vocab: int, seed: int = 0) -> float:
    """Load folder with transformers' Auto class and compare its logits with ours at every position of the context
    (block_size), on two random sequences, one at a time (GPT-2's 1024 x 50257 logits are 200 MB each)."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    diffs = []
    for _ in range(2):
        idx = torch.randint(0, vocab, (1, model.config.block_size), generator=g)
        with torch.no_grad():
            ours, _ = model(idx, targets=idx)  # with targets: the logits of every position
            theirs = hf(idx).logits
        diffs.append((ours[..., :vocab].float() - theirs.float()).abs().max())
    return torch.stack(diffs).max().item()  # a NaN anywhere is the result (torch's max propagates it)


def export(out_dir: str, to: str, command: str = "") -> float:
    """Write out_dir's checkpoint to the folder `to` in Hugging Face format; returns the largest logit difference
    of the folder loaded back against our model. Nothing is left at `to` when any step fails. command: the
    export's command line for the model card (default: the scripts.export line that does the same)."""
    transformers = pretrained._transformers()  # the one-line error when transformers is missing
    transformers.utils.logging.disable_progress_bar()  # save_pretrained's shard bar: the export prints its own lines
    target = Path(to).expanduser()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ExportError(f"'{target}' exists and is not empty; choose another --to (or remove it first)")
    model, meta, state = load_run(out_dir)
    with files.writing(target, "the export", after="nothing was written"):  # a full disk, a folder not yours
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        need = sum(p.numel() * p.element_size() for p in model.state_dict().values())
        with files.writing(target, "the export", need, after="nothing was written"):
            to_hf(model, meta).save_pretrained(str(tmp), safe_serialization=True)
            write_tokenizer(tmp, meta, model.config.block_size)
            command = command or shlex.join(["python", "-m", "scripts.export", f"--out_dir={out_dir}", f"--to={to}"])
            (tmp / "README.md").write_text(model_card(model, meta, state, command))
        diff = max_logit_diff(model, tmp, meta["vocab_size"])
        if not diff <= TOLERANCE:  # NaN fails too
            raise ExportError(
                f"the exported model's logits differ from ours by {diff:.3g} (> {TOLERANCE:g}); nothing was "
                "written; report this with the transformers version"
            )
        if target.exists():
            target.rmdir()  # empty, checked above
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return diff
