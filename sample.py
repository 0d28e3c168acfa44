"""Sample text from a trained model; tokens stream to stdout as they are generated.

python sample.py                                   # from out/ckpt.pt (configs/small.py's run)
python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=2
python sample.py --start=FILE:prompt.txt --temperature=0  # greedy, prompt read from a file
python sample.py --init_from=gpt2 --start="Hello"              # OpenAI's GPT-2 (needs transformers)
"""

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import checkpoint
import config
import dataset
import pretrained
import runtime
from model import GPT, GPTConfig


@dataclass
class SampleConfig:
    out_dir: str = "out"  # the training run whose ckpt.pt to load
    init_from: str = "resume"  # "resume": out_dir/ckpt.pt | "gpt2" | "gpt2-medium" | ... | a Hugging Face folder
    start: str = "\n"  # prompt text (\n types a newline), or FILE:path to read it from a file
    num_samples: int = 3  # how many samples to draw
    max_new_tokens: int = 500  # tokens generated per sample
    temperature: float = 0.8  # < 1 sharper, > 1 more random, 0 greedy (always the most likely token)
    top_k: int | None = None  # sample only among the k most likely tokens (None: all)
    top_p: float | None = None  # sample only from the smallest set of tokens whose probability reaches p
    seed: int = 1337  # random seed for sampling
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1" | "mps"
    dtype: str = "auto"  # "auto" | "float32" | "bfloat16" | "float16"
    use_cache: bool = True  # KV cache: each new token costs one position, not the whole context

    def __post_init__(self):
        if self.num_samples <= 0:
            raise config.ConfigError(f"num_samples must be positive, got {self.num_samples}")
        if self.max_new_tokens < 0:
            raise config.ConfigError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise config.ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k <= 0:
            raise config.ConfigError(f"top_k must be positive, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise config.ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        config.check_choice("dtype", self.dtype, config.DTYPES)
        config.check_choice("device", self.device.split(":")[0], config.DEVICES)


def load_model(out_dir: str, device: str, init_from: str = "resume") -> tuple[GPT, dataset.Tokenizer]:
    """The model and tokenizer recorded in out_dir/ckpt.pt, or a pretrained GPT-2 and its BPE."""
    if init_from != "resume":
        model = pretrained.load_pretrained(init_from)
        return model.eval().to(device), dataset.Tokenizer(dataset.gpt2_meta())
    state = checkpoint.load(Path(out_dir) / "ckpt.pt")
    model = GPT(GPTConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    model.eval().to(device)
    return model, dataset.Tokenizer(json.loads(state["tokenizer"]))


def prompt_text(start: str) -> str:
    if start.startswith("FILE:"):
        path = Path(start[5:])
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise config.ConfigError(f"cannot read prompt file '{path}' ({e}); check --start=FILE:path") from None
    return start.replace("\\n", "\n").replace("\\t", "\t")  # a typed \n is a newline


def sample(cfg: SampleConfig, out=sys.stdout) -> list[str]:
    """Write cfg.num_samples samples to out as they are generated; returns them."""
    rt = runtime.init_runtime(cfg.device, cfg.dtype)
    model, tok = load_model(cfg.out_dir, rt.device, cfg.init_from)
    if cfg.top_k is not None and cfg.top_k > tok.vocab_size:
        raise config.ConfigError(f"top_k={cfg.top_k} is larger than the vocabulary ({tok.vocab_size} tokens)")
    text = prompt_text(cfg.start)
    ids = tok.encode(text)
    if not ids:
        if tok.kind != "gpt2":
            raise config.ConfigError("the prompt is empty; give --start some text (e.g. --start='\\n')")
        ids = [tok.enc.eot_token]  # GPT-2 starts documents after <|endoftext|>
    idx = torch.tensor([ids], dtype=torch.long, device=rt.device)
    torch.manual_seed(cfg.seed)
    samples = []
    for _ in range(cfg.num_samples):
        out.write(text)
        decode, pieces = tok.stream_decoder(), []
        t0 = time.perf_counter()
        with rt.autocast():
            stream = model.generate_stream(
                idx,
                cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_k=cfg.top_k,
                top_p=cfg.top_p,
                use_cache=cfg.use_cache,
            )
            for nxt in stream:
                token = int(nxt[0, 0])
                if token >= tok.vocab_size:  # a padded vocabulary slot; never a real token
                    continue
                pieces.append(decode(token))
                out.write(pieces[-1])
                out.flush()
        dt = time.perf_counter() - t0
        samples.append(text + "".join(pieces))
        out.write(
            f"\n---------------  {cfg.max_new_tokens} tokens in {dt:.2f}s "
            f"({cfg.max_new_tokens / max(dt, 1e-9):.0f} tok/s)\n"
        )
    return samples


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(config.help_text(SampleConfig, __doc__.strip()))
        return 0
    try:
        sample(config.parse_args(SampleConfig, argv, allow_file=False))
    except (
        config.ConfigError,
        dataset.DataError,
        runtime.DeviceError,
        checkpoint.CheckpointError,
        pretrained.PretrainedError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
