"""Score a model on HellaSwag, or on any multiple-choice file in its format (gpt_residual/multiple_choice.py).

python -m scripts.eval --task=hellaswag --out_dir=out-shakespeare     # a training run's ckpt.pt and tokenizer
python -m scripts.eval --task=hellaswag --init_from=gpt2              # OpenAI's GPT-2 124M (needs transformers)
python -m scripts.eval --data=my_choices.jsonl --out=scores.json      # a local file; per-example results as JSON
torchrun --standalone --nproc_per_node=8 -m scripts.eval --init_from=gpt2-xl   # examples strided over 8 GPUs

Protocol ("completion style", as llm.c and build-nanogpt): the tokens of ctx, then those of " " + ending;
only the ending's tokens are scored. acc: the ending with the largest summed log-likelihood; acc_norm: the
largest mean per token. 95% intervals are Wilson score intervals. A context that does not fit in
block_size keeps its last tokens. The validation split (10,042 examples) is downloaded on first use to
data/hellaswag/.
"""

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from gpt_residual import config, console, multiple_choice, runtime
from gpt_residual.pretrained import load_model

TASKS = ("hellaswag",)


@dataclass
class EvalConfig:
    task: str = "hellaswag"  # the benchmark: "hellaswag" (the format of every --data file too)
    out_dir: str = "out"  # the training run whose ckpt.pt (and tokenizer) to score
    init_from: str = "resume"  # "resume": out_dir/ckpt.pt | "gpt2" | "gpt2-medium" | ... | a Hugging Face folder
    data: str = ""  # a local .jsonl of ctx, endings, label (default: the validation split, in data/hellaswag/)
    out: str = ""  # write {task, n, acc, acc_norm, examples: [{index, label, loglik, tokens}]} to this JSON file
    limit: int = 0  # score only the first N examples (0: all)
    batch_size: int = 8  # examples per forward (4 rows each)
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1" | "mps"
    dtype: str = "auto"  # "auto" (CUDA: bf16 autocast, fp16 where no bf16; else float32) | "float32" | "bfloat16"

    def __post_init__(self):
        config.check_choice("task", self.task, TASKS)
        if self.limit < 0:
            raise config.ConfigError(f"limit must be >= 0, got {self.limit}")
        if self.batch_size <= 0:
            raise config.ConfigError(f"batch_size must be positive, got {self.batch_size}")
        config.check_choice("dtype", self.dtype, ("auto", "float32", "bfloat16"))
        config.check_choice("device", self.device.split(":")[0], config.DEVICES)
        if self.out and Path(self.out).is_dir():
            raise config.ConfigError(f"out '{self.out}' is a folder; give a file name such as scores.json")


def run_eval(cfg: EvalConfig, out=sys.stdout) -> dict:
    """Score the model; print one line (rank 0), write cfg.out (rank 0); return the results."""
    rt, ended_well = runtime.init_runtime(cfg.device, cfg.dtype), False
    try:
        examples = multiple_choice.load(cfg.data, rt)  # the data first: a bad file fails before the weights load
        examples = examples[: cfg.limit] if cfg.limit else examples
        model, tok = load_model(cfg.out_dir, rt.device, cfg.init_from)
        t0 = time.perf_counter()
        result = multiple_choice.evaluate(model, examples, tok, rt, cfg.batch_size, cfg.task)
        runtime.synchronize(rt)
        seconds = time.perf_counter() - t0
        if rt.master:
            speed = f"{len(examples)} examples in {seconds:.1f}s ({len(examples) / max(seconds, 1e-9):.1f}/s)"
            print(f"{multiple_choice.describe(result, model.config.block_size)}; {speed}", file=out, flush=True)
            if cfg.out:
                write_json(Path(cfg.out), result)
        ended_well = True
        return result
    finally:
        runtime.shutdown(rt, ended_well)  # after a failure no barrier: a rank that failed never comes


def write_json(path: Path, result: dict):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(result) + "\n")
        tmp.replace(path)
    except OSError as e:
        raise config.ConfigError(f"cannot write '{path}' ({e}); choose another --out") from None


def main(argv: list[str] | None = None) -> int:
    return console.command(EvalConfig, __doc__, run_eval, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
