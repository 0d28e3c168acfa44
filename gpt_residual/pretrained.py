"""A model to run: a train.py checkpoint's (load_model, from_checkpoint: the one way every command builds a
model from a checkpoint), or GPT-2 weights from Hugging Face in our GPT (model.py), for fine-tuning and sampling.

    model, tok = load_model("out", "cpu")          # out/ckpt.pt's model and tokenizer (sample.py, scripts.eval)
    model = load_pretrained("gpt2")               # or gpt2-medium, gpt2-large, gpt2-xl (from the Hub)
    model = load_pretrained("path/to/folder")     # Hugging Face format: config.json + model.safetensors
    python -m gpt_residual.pretrained gpt2-xl                  # download (or check) one now; prints its shape

A model is built on the meta device and then given the loaded tensors as they are: no random initialisation
to throw away, no second copy of the weights. Loading GPT-2 needs the optional transformers package: pip
install transformers (or pip install -e .[hf]).
With no network (or HF_HUB_OFFLINE=1) a Hub name is read from the local Hugging Face cache only, and a
model missing there is a one-line error at once, not after the Hub client's retries.
Our layer names mirror GPT-2's, so the weights map one to one; GPT-2's Conv1D layers store their
weights as (in, out) where nn.Linear stores (out, in), so c_attn, c_proj and c_fc are transposed.
GPT-2 is a pre-LN LayerNorm model with biases and residuals, eps 1e-5, the tanh GELU and a head
tied to the token embedding: a checkpoint or a config that differs from this is refused, not guessed.
"""

import contextlib
import json
import math
import re
import sys
from pathlib import Path

import torch

from data import token_files
from gpt_residual import checkpoint, dataset
from gpt_residual.dataset import hub_reachable
from model import GPT, GPTConfig

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
INSTALL = "pip install transformers (or pip install -e .[hf])"
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # GPT-2's GELU: the tanh approximation, as in our MLP
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
SKIPPED = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older transformers releases
# the GPTConfig keys a pretrained model fixes; a trainer copies them from model.config
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")
# what GPT-2 is, in our GPTConfig's terms
GPT2_ARCH = {"norm": "layernorm", "norm_position": "pre", "deepnorm": False, "residual": True, "bias": True}
# ... and none of the switches its weights have nothing for (no norm on q, k or the embeddings, learned
# positions, norms with weights, no residual or value scalars, plain logits)
GPT2_ARCH |= {"qk_norm": False, "norm_affine": True, "embed_norm": False, "residual_scalars": False}
GPT2_ARCH |= {"value_residual": False, "positions": "learned", "logit_softcap": 0.0}
GPT2_ARCH |= {"attn_gate": "none"}  # GPT-2 has no gate weights on its attention
GPT2_ARCH |= {"norm_scaling": False}  # GPT-2's norms feed its sub-layers unscaled
GPT2_ARCH |= {"depth_scaling": 0.0}  # GPT-2's branches add unscaled to the stream
GPT2_ARCH |= {"hyper_connections": "none", "attn_residuals": "none"}  # streams.py's learned connections
GPT2_VOCAB = 50257  # GPT-2's BPE: 50256 merges' tokens and <|endoftext|>
# a char vocabulary in tokenizer.json (scripts.export): tokenizers' WordLevel over every single character
CHAR_SPLIT = r"[\s\S]"
CHAR_PRE_TOKENIZER = {"type": "Split", "pattern": {"Regex": CHAR_SPLIT}, "behavior": "Isolated", "invert": False}


class PretrainedError(ValueError):
    """A pretrained model cannot be loaded; the message says what to do, in one line."""


def check_compatible(cfg) -> None:
    """Refuse a config (GPTConfig, TrainConfig, ...) whose architecture GPT-2's weights do not fit."""
    arch = {k: v for k, v in GPT2_ARCH.items() if k not in SHAPE_KEYS}  # the shape (bias too) is the checkpoint's
    wrong = {k: getattr(cfg, k) for k, v in arch.items() if hasattr(cfg, k) and getattr(cfg, k) != v}
    if wrong:
        have = ", ".join(f"{k}={v!r}" for k, v in wrong.items())
        need = ", ".join(f"{k}={GPT2_ARCH[k]!r}" for k in wrong)
        raise PretrainedError(
            f"pretrained GPT-2 weights need GPT-2's architecture, but this config has {have}; "
            f"set {need} (or train from scratch)"
        )


def gpt_config(hf_config, dropout: float = 0.0) -> GPTConfig:
    """Our GPTConfig for a transformers GPT2Config, or PretrainedError if our model cannot compute the same thing."""
    c = hf_config
    model_type = getattr(c, "model_type", None)
    if model_type != "gpt2":
        raise PretrainedError(f"only GPT-2 checkpoints can be loaded; this one is model_type {model_type!r}")
    checks = [
        ("activation_function", c.activation_function in TANH_GELUS, "the tanh GELU (gelu_new)"),
        ("layer_norm_epsilon", math.isclose(c.layer_norm_epsilon, 1e-5, rel_tol=1e-6), "1e-05"),
        ("n_inner", c.n_inner in (None, 4 * c.n_embd), f"None or 4 * n_embd = {4 * c.n_embd}"),
        ("scale_attn_weights", c.scale_attn_weights is True, "True"),
        ("scale_attn_by_inverse_layer_idx", not c.scale_attn_by_inverse_layer_idx, "False"),
        ("add_cross_attention", not getattr(c, "add_cross_attention", False), "False"),
        ("tie_word_embeddings", getattr(c, "tie_word_embeddings", True) is not False, "True"),
    ]
    for key, ok, want in checks:
        if not ok:
            raise PretrainedError(
                f"the checkpoint's config has {key}={getattr(c, key, None)!r}, but our model implements GPT-2's "
                f"{want}; only standard GPT-2 checkpoints can be loaded"
            )
    try:
        return GPTConfig(
            block_size=c.n_positions,
            vocab_size=c.vocab_size,
            n_layer=c.n_layer,
            n_head=c.n_head,
            n_embd=c.n_embd,
            dropout=dropout,
            **GPT2_ARCH,
        )
    except ValueError as e:
        raise PretrainedError(f"the checkpoint's config is not usable: {e}") from None


def gpt_state(hf_state: dict, model_cfg: GPTConfig) -> dict:
    """Our state dict from a GPT2LMHeadModel's: the Conv1D weights transposed (contiguous, as nn.Linear's),
    the head tied to the embedding; PretrainedError for another layout or a shape that differs from
    model_cfg's."""
    with uninitialised():
        ours = GPT(model_cfg).state_dict()  # the names and shapes only
    theirs = {k: v for k, v in hf_state.items() if not k.endswith(SKIPPED)}
    if "transformer.wte.weight" in theirs:
        theirs.setdefault("lm_head.weight", theirs["transformer.wte.weight"])  # tied: saved once
    missing, extra = sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys())
    if missing or extra:
        raise PretrainedError(
            f"the checkpoint's weights do not match GPT-2's layout (missing {missing[:3]}, unexpected {extra[:3]}); "
            "give a GPT-2 checkpoint saved with save_pretrained"
        )
    state = {}
    for key, value in theirs.items():
        value = value.detach()
        if key.endswith(TRANSPOSED):
            value = value.t().contiguous()
        if value.shape != ours[key].shape:
            raise PretrainedError(
                f"weight {key} has shape {tuple(value.shape)}, expected {tuple(ours[key].shape)}; "
                "the checkpoint does not match its config.json"
            )
        state[key] = value
    return state


INIT_FILLS = ("normal_", "uniform_", "kaiming_uniform_", "xavier_normal_", "zeros_", "ones_")  # what modules call


@contextlib.contextmanager
def uninitialised():
    """Modules made inside are on the meta device, their initialisation skipped: torch.nn.init's fills do
    nothing (there is nothing to fill, and torch's meta normal_ would import torch._dynamo: seconds of
    start-up and ~70 MB, for nothing). transformers' from_pretrained does the same (no_init_weights)."""
    saved = {name: getattr(torch.nn.init, name) for name in INIT_FILLS}
    try:
        for name in INIT_FILLS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            yield
    finally:
        for name, fill in saved.items():
            setattr(torch.nn.init, name, fill)


def assemble(model_cfg: GPTConfig, state: dict, tie: bool = True) -> GPT:
    """A GPT of model_cfg holding state's tensors as they are (no random init, no copy); tie: the head and the
    token embedding one Parameter again (assign makes one of each, sharing a storage)."""
    with uninitialised():
        model = GPT(model_cfg)
    model.load_state_dict(state, assign=True)
    if tie:
        model.transformer.wte.weight = model.lm_head.weight
    return model


def from_checkpoint(state: dict, dropout: float = 0.0) -> GPT:
    """The model of a train.py checkpoint (checkpoint.load's dict), with dropout; memory-mapped tensors
    (checkpoint.load(mmap=True)) stay so until read."""
    return assemble(GPTConfig(**{**state["model_config"], "dropout": dropout}), state["model"])


def load_model(out_dir: str, device, init_from: str = "resume") -> tuple[GPT, dataset.Tokenizer]:
    """The model (eval mode, on device) and tokenizer recorded in out_dir/ckpt.pt, reading only the weights (the
    file is memory-mapped: the optimizer's state is never read); or a pretrained GPT-2 and its BPE (or the
    char vocabulary of a folder written by scripts.export)."""
    if init_from != "resume":  # the tokenizer first: offline without the BPE, fail before loading GBs of weights
        tok = dataset.Tokenizer(char_meta(init_from) or token_files.gpt2_meta())  # an export's chars
        return load_pretrained(init_from).eval().to(device), tok
    state = checkpoint.load(Path(out_dir) / "ckpt.pt", mmap=True)
    tok = dataset.Tokenizer(json.loads(state["tokenizer"]))
    return from_checkpoint(state).eval().to(device), tok


def crop_block_size(model: GPT, block_size: int) -> None:
    """Keep the first block_size position embeddings: a shorter context for cheaper fine-tuning."""
    if not 0 < block_size <= model.config.block_size:
        raise PretrainedError(
            f"block_size {block_size} is outside 1..{model.config.block_size}, the positions the pretrained "
            "model has; choose a block_size in that range"
        )
    wpe = model.transformer.wpe
    wpe.weight = torch.nn.Parameter(wpe.weight.detach()[:block_size].clone())
    wpe.num_embeddings = block_size
    model.config.block_size = block_size


def _transformers():
    try:
        import transformers
    except ImportError:
        raise PretrainedError(f"loading pretrained weights needs the transformers package: {INSTALL}") from None
    return transformers


def _source(name_or_dir: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it is a local folder); PretrainedError if it is neither."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PretrainedError(
                f"folder '{path}' has no config.json; give a folder saved with save_pretrained (config.json + weights)"
            )
        return str(path), True
    looks_like_path = name_or_dir.startswith((".", "/", "~")) or name_or_dir.count("/") > 1 or path.exists()
    if looks_like_path or not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", name_or_dir):
        raise PretrainedError(
            f"'{name_or_dir}' is not a folder; give one of {', '.join(GPT2_NAMES)} or a folder with config.json"
        )
    return name_or_dir, False


def _hub_offline_mode() -> bool:
    from huggingface_hub import constants  # installed with transformers

    return constants.HF_HUB_OFFLINE


def _from_hf(fn, source: str, local: bool, offline: bool = False, **kwargs):
    """Call a transformers from_pretrained (only from the cache when offline); its many failures (network,
    name, files) become one line."""
    try:
        return fn(source, local_files_only=offline, **kwargs)
    except PretrainedError:
        raise
    except Exception as e:  # OSError, ValueError, HTTP errors, safetensors errors, ...
        first = (str(e).strip().splitlines() or [""])[0][:200]
        if local:
            advice = "check the folder holds config.json and model.safetensors (or pytorch_model.bin)"
        elif offline:
            raise PretrainedError(
                f"could not load '{source}': no network to the Hugging Face Hub (or HF_HUB_OFFLINE=1) and it is not "
                "in the local cache; pass a local Hugging Face folder (saved with save_pretrained) as init_from, "
                "or connect"
            ) from None
        else:
            advice = (
                f"check the name ({', '.join(GPT2_NAMES)}) and your network; offline, use a folder saved with "
                "save_pretrained or a model already in the Hugging Face cache"
            )
        raise PretrainedError(f"could not load '{source}' ({type(e).__name__}: {first}); {advice}") from None


def char_meta(name_or_dir: str) -> dict | None:
    """The char tokenizer (as meta.json describes it) of a folder written by scripts.export, or None where the
    tokenizer is GPT-2's BPE: a Hub name, GPT-2's tokenizer files, or a folder without a tokenizer (as today's
    save_pretrained of a model alone). PretrainedError for a tokenizer that is neither."""
    path = Path(name_or_dir).expanduser() / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
        kind, vocab = tok["model"]["type"], tok["model"]["vocab"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PretrainedError(f"cannot read '{path}' ({type(e).__name__}: {e}); re-export the model") from None
    if kind == "BPE" and len(vocab) == GPT2_VOCAB:
        return None
    itos = sorted(vocab, key=vocab.get) if kind == "WordLevel" else []
    is_char = itos and all(len(ch) == 1 for ch in itos) and [vocab[ch] for ch in itos] == list(range(len(itos)))
    if not is_char or tok.get("pre_tokenizer") != CHAR_PRE_TOKENIZER or tok.get("normalizer"):
        raise PretrainedError(
            f"'{path}' is neither GPT-2's BPE nor a char vocabulary written by python -m scripts.export; "
            "only those tokenizers can be read"
        )
    return {"tokenizer": "char", "vocab_size": len(itos), "itos": itos}


def check_tokenizer(name_or_dir: str, meta: dict, dataset_name: str) -> None:
    """Refuse fine-tuning a pretrained model on a dataset of other tokens than its tokenizer's."""
    theirs = char_meta(name_or_dir)
    if theirs is None and meta["tokenizer"] != "gpt2":
        raise PretrainedError(
            f"'{name_or_dir}' reads GPT-2 BPE tokens, but dataset '{dataset_name}' is {meta['tokenizer']}-level; "
            "use a BPE dataset such as shakespeare"
        )
    if theirs is not None and (meta["tokenizer"] != "char" or list(meta["itos"]) != theirs["itos"]):
        raise PretrainedError(
            f"'{name_or_dir}' has a char vocabulary of {theirs['vocab_size']} characters that is not dataset "
            f"'{dataset_name}'s; fine-tune it on the dataset it was trained on (same characters, same order)"
        )


def load_pretrained(name_or_dir: str, dropout: float = 0.0, block_size: int | None = None) -> GPT:
    """A GPT with the weights of a GPT-2 from the Hub (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a local
    folder in Hugging Face format; dropout for fine-tuning, block_size to crop the context (None: all)."""
    transformers = _transformers()
    source, local = _source(name_or_dir)
    offline = not local and (_hub_offline_mode() or not hub_reachable())
    hf_config = _from_hf(transformers.AutoConfig.from_pretrained, source, local, offline)
    config = gpt_config(hf_config, dropout)
    hf = _from_hf(transformers.GPT2LMHeadModel.from_pretrained, source, local, offline, config=hf_config)
    model = assemble(config, gpt_state(hf.state_dict(), config))
    del hf
    if block_size is not None and block_size != config.block_size:
        crop_block_size(model, block_size)
    return model


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        sys.exit(f"usage: python -m gpt_residual.pretrained NAME_OR_DIR   (NAME: {', '.join(GPT2_NAMES)})")
    try:
        gpt = load_pretrained(sys.argv[1])
    except PretrainedError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    shape = ", ".join(f"{k}={getattr(gpt.config, k)}" for k in SHAPE_KEYS)
    print(f"{sys.argv[1]}: {gpt.num_params() / 1e6:.2f}M parameters; {shape}")
