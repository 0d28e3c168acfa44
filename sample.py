"""Sample text from a trained model. Only the samples go to stdout (timings go to stderr), so
`python sample.py > story.txt` keeps clean text; one sample streams as it is generated.

python sample.py                                   # from out/ckpt.pt (configs/small.py's run)
python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=2
python sample.py --start=FILE:prompt.txt --temperature=0  # greedy, prompt read from a file
python sample.py --init_from=gpt2 --start="Hello"              # OpenAI's GPT-2 (needs transformers)
python sample.py --num_samples=64 --engine=graph                # one batch of 64, one CUDA graph per token
"""

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt_residual import config, console, runtime
from gpt_residual.engine import ENGINES, draw
from gpt_residual.pretrained import load_model

GRAPH_MIN_TOKENS = 32  # engine=auto: CUDA graphs from this many new tokens on (see choose_engine)


@dataclass
class SampleConfig:
    out_dir: str = "out"  # the training run whose ckpt.pt to load
    init_from: str = "resume"  # "resume": out_dir/ckpt.pt | "gpt2" | "gpt2-medium" | ... | a Hugging Face folder
    start: str = "\n"  # prompt text (\n types a newline), or FILE:path to read it from a file
    num_samples: int = 3  # how many samples to draw, as one batch (see max_batch)
    max_batch: int = 64  # at most this many samples per batch: bounds the KV cache's memory
    max_new_tokens: int = 500  # tokens generated per sample
    temperature: float = 0.8  # < 1 sharper, > 1 more random, 0 greedy (always the most likely token)
    top_k: int | None = None  # sample only among the k most likely tokens (None: all)
    top_p: float | None = None  # sample only from the smallest set of tokens whose probability reaches p
    seed: int = 1337  # random seed for sampling
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1" | "mps"
    dtype: str = "auto"  # "auto" | "float32" | "bfloat16" | "float16"
    use_cache: bool = True  # KV cache: each new token costs one position, not the whole context
    engine: str = "auto"  # cached decode step: "eager" | "compile" (torch.compile) | "graph" (CUDA graph) | "auto"

    def __post_init__(self):
        for key in ("num_samples", "max_batch"):
            if getattr(self, key) <= 0:
                raise config.ConfigError(f"{key} must be positive, got {getattr(self, key)}")
        config.check_choice("engine", self.engine, ("auto", *ENGINES))
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


def prompt_text(start: str) -> str:
    if start.startswith("FILE:"):
        path = Path(start[5:])
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise config.ConfigError(f"cannot read prompt file '{path}' ({e}); check --start=FILE:path") from None
    return start.replace("\\n", "\n").replace("\\t", "\t")  # a typed \n is a newline


def choose_engine(engine: str, device_type: str, max_new_tokens: int) -> str:
    """engine=auto: a CUDA graph on CUDA for GRAPH_MIN_TOKENS new tokens or more, else eager.

    Capturing the graph costs about three eager steps (two warm-up steps and the recording) and then
    saves most of every step's launch time, so it pays back within a few dozen tokens; the saving is
    per step whatever the batch, so the rule counts steps, not rows. torch.compile costs tens of
    seconds of compilation, more than any usual sample takes, so it runs only when asked for
    (engine=compile). On a CPU there are no launches to save: eager."""
    if engine != "auto":
        if engine == "graph" and device_type != "cuda":
            raise config.ConfigError(f"engine=graph needs a CUDA GPU (device is {device_type}); use eager or compile")
        return engine
    return "graph" if device_type == "cuda" and max_new_tokens >= GRAPH_MIN_TOKENS else "eager"


def sample(cfg: SampleConfig, out=sys.stdout, log=sys.stderr) -> list[str]:
    """Write the cfg.num_samples samples to out, each followed by a newline; timings go to log.
    Returns the samples."""
    rt = runtime.init_runtime(cfg.device, cfg.dtype)
    model, tok = load_model(cfg.out_dir, rt.device, cfg.init_from)
    if cfg.top_k is not None and cfg.top_k > tok.vocab_size:
        raise config.ConfigError(f"top_k={cfg.top_k} is larger than the vocabulary ({tok.vocab_size} tokens)")
    engine = choose_engine(cfg.engine, rt.device_type, cfg.max_new_tokens) if cfg.use_cache else "eager"
    text = prompt_text(cfg.start)
    ids = tok.encode(text)
    if not ids:
        if tok.kind != "gpt2":
            raise config.ConfigError("the prompt is empty; give --start some text (e.g. --start='\\n')")
        ids = [tok.enc.eot_token]  # GPT-2 starts documents after <|endoftext|>
    torch.manual_seed(cfg.seed)
    sampling = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, use_cache=cfg.use_cache)
    samples = []
    for first in range(0, cfg.num_samples, cfg.max_batch):
        batch = min(cfg.max_batch, cfg.num_samples - first)
        idx = torch.tensor([ids] * batch, dtype=torch.long, device=rt.device)
        streaming = cfg.num_samples == 1
        if streaming:
            out.write(text)
        t0 = time.perf_counter()
        with rt.autocast():
            rows, steps = draw(model, tok, idx, cfg.max_new_tokens, engine, out if streaming else None, **sampling)
        dt = time.perf_counter() - t0
        for new in rows:
            samples.append(text + tok.decode(new))
            out.write("\n" if streaming else samples[-1] + "\n")
        out.flush()
        log.write(
            f"---------------  {batch} sample(s) x {steps} tokens in {dt:.2f}s "
            f"({batch * steps / max(dt, 1e-9):.0f} tok/s, engine={engine})\n"
        )
    if engine != "eager":
        setup = sum(d.setup_seconds for d in model.decoders.values())
        log.write(f"engine={engine}: one-time setup (compilation / graph capture) {setup:.2f}s\n")
    return samples


def main(argv: list[str] | None = None) -> int:
    return console.command(SampleConfig, __doc__, sample, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
