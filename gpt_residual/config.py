"""One typed config for training, and the parser every entry point shares.

`python train.py configs/small.py --n_layer=6 --learning_rate=1e-3`: a config file is plain Python of
`key = value` lines (your own file, so it is run as Python); flags on the command line are parsed as
literals and never evaluated. Every key is a field below; the comment on each field is its --help
line. An unknown key, a value of the wrong type or an impossible value fails at once with one line
that names the key.
"""

import ast
import dataclasses
import difflib
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt_residual import schedule
from model import GPTConfig

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
INIT_SOURCES = ("scratch", "resume", "auto", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


class ConfigError(ValueError):
    """A problem with the user's configuration; entry points print it as one line and exit 2."""


@dataclass
class TrainConfig(GPTConfig):
    """Every key of a training run. The defaults are configs/small.py: `python train.py` trains a small
    char-level Shakespeare model in about two minutes on a laptop CPU."""

    # -- model (GPTConfig's keys; its defaults are GPT-2's shape, these are small.py's)
    block_size: int = 64  # context length: the longest sequence the model sees
    n_layer: int = 2  # number of transformer blocks
    n_head: int = 4  # attention heads per block (n_embd must divide by it)
    n_embd: int = 128  # width of the residual stream
    bias: bool = False  # bias in Linear and LayerNorm layers (GPT-2: True)
    vocab_size: int = 50304  # ignored in training: the dataset's vocabulary replaces it; used by bench's synthetic data
    # -- run
    out_dir: str = "out"  # where checkpoints, config.json and metrics.jsonl go
    init_from: str = "scratch"  # scratch | resume (out_dir/ckpt.pt) | auto: resume, else scratch | gpt2... | HF folder
    overwrite: bool = False  # let a scratch run delete the checkpoints of the run already in out_dir
    dataset: str = "shakespeare_char"  # a folder of data/ with a prepare.py; prepared on first use
    data_dir: str = ""  # folder holding train.bin, val.bin, meta.json (default: data/<dataset>)
    seed: int = 1337  # seeds weights, data order and dropout
    # -- batch and schedule
    batch_size: int = 24  # sequences per micro-batch (per process)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step (per process)
    batch_tokens: int = 0  # tokens per optimizer step over all processes: sets gradient_accumulation_steps (0: off)
    max_iters: int = 2000  # optimizer steps in the whole run
    learning_rate: float = 5e-3  # peak learning rate, reached after warmup
    min_lr: float = 1e-3  # learning rate at the end of the decay
    warmup_iters: int = 30  # steps of linear warmup from 0 to learning_rate
    lr_schedule: str = "cosine"  # after warmup: "cosine" to min_lr | "wsd" constant, then linear to min_lr | "constant"
    warmdown_frac: float = 0.2  # wsd: the last fraction of the decay (of lr_decay_iters, else max_iters) spent in it
    lr_decay_iters: int = 0  # step at which the decay reaches min_lr (0: max_iters, so it follows a longer run)
    decay_lr: bool = True  # the old spelling of a flat rate: False keeps learning_rate from step 0 (no warmup)
    weight_decay: float = 0.1  # AdamW weight decay on 2-D weights
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.99  # AdamW beta2
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: no clipping)
    optimizer: str = "adamw"  # "adamw" | "muon": torch.optim.Muon for the blocks' matrices, AdamW for the rest
    muon_lr: float = 0.02  # Muon's peak learning rate (same schedule shape as learning_rate; nanochat: 0.02)
    scalar_lr: float = 0.5  # peak learning rate of residual_scalars' b_i (a_i: 1/100 of it, l_i: 1/10), no decay
    # -- evaluation, logging, checkpoints
    eval_interval: int = 250  # steps between estimates of train and val loss (and at the end)
    eval_iters: int = 20  # batches per loss estimate
    log_interval: int = 100  # steps between log lines
    checkpoint_interval: int = 500  # steps between checkpoints (and one at the end; 0: only at the end)
    keep_checkpoints: int = 2  # newest ckpt-<step>.pt files to keep; ckpt.pt and ckpt-best.pt link to them
    telemetry_interval: int = 0  # steps between per-layer grad norms, update ratios, stream RMS (0: off)
    sample_interval: int = 0  # steps between samples printed at eval steps (a multiple of eval_interval; 0: off)
    sample_prompt: str = "\n"  # the prompt of those samples (a typed \n is a newline)
    sample_tokens: int = 48  # tokens per sample (seeded by seed, so the same draw every time)
    hellaswag_interval: int = 0  # steps between HellaSwag scores on a fixed subset (multiple of eval_interval, 0: off)
    hellaswag_examples: int = 500  # examples in that subset (a fixed sample of the validation split)
    hellaswag_data: str = ""  # a .jsonl in HellaSwag's format to score instead (default: data/hellaswag/, downloaded)
    probe_init: bool = False  # measure that telemetry at initialisation over eval_iters batches, then exit
    wandb_log: bool = False  # also send metrics to Weights & Biases (rank 0)
    wandb_project: str = "gpt"  # wandb project name
    wandb_run_name: str = ""  # wandb run name (default: out_dir's name)
    # -- system
    device: str = "auto"  # "auto" (cuda, else mps, else cpu) | "cpu" | "cuda" | "cuda:1" | "mps"
    dtype: str = "auto"  # "auto" (CUDA: bf16 if supported, else fp16; else float32) | float32 | bfloat16 | float16
    parallel: str = "ddp"  # under torchrun: "ddp" (replicate the model) | "fsdp" (FSDP2: shard it per block)
    compile: bool | str = "auto"  # torch.compile the model: True | False | "auto" (on for CUDA)
    compile_scope: str = "blocks"  # "blocks": each block and the head apart (one compile serves every block) | "model"
    peak_flops: float = 0.0  # peak FLOP/s of one device for MFU (0: looked up from the GPU's name)
    max_skipped_steps: int = 20  # float16: stop when the GradScaler has skipped this many steps in a row (0: never)

    def __post_init__(self):
        super().__post_init__()
        check_ranges(self)
        if self.hellaswag_interval % self.eval_interval:
            raise ConfigError(
                f"hellaswag_interval ({self.hellaswag_interval}) must be a multiple of eval_interval "
                f"({self.eval_interval}): HellaSwag is scored at eval steps"
            )
        if self.min_lr > self.learning_rate:
            raise ConfigError(
                f"min_lr ({self.min_lr:g}) must not exceed learning_rate ({self.learning_rate:g}); "
                f"set --min_lr too (e.g. --min_lr={self.learning_rate / 10:g})"
            )
        check_choice("lr_schedule", self.lr_schedule, schedule.SCHEDULES)
        if not 0.0 <= self.warmdown_frac <= 1.0:
            raise ConfigError(f"warmdown_frac must be in [0, 1] (a fraction of the run), got {self.warmdown_frac:g}")
        if self.decay_lr and self.lr_schedule != "constant" and 0 < self.lr_decay_iters <= self.warmup_iters:
            raise ConfigError(
                f"lr_decay_iters ({self.lr_decay_iters}) is where the decay reaches min_lr, but the warmup lasts until "
                f"step {self.warmup_iters}: raise --lr_decay_iters or lower --warmup_iters"
            )
        if not self.decay_lr and self.lr_schedule != "cosine":
            raise ConfigError("decay_lr=False is the old spelling of a flat learning rate; with lr_schedule, drop it "
                              "(lr_schedule='constant' --warmup_iters=0 is the same)")
        if self.init_from not in INIT_SOURCES and not Path(self.init_from).expanduser().is_dir():
            raise ConfigError(
                f"init_from must be one of {', '.join(INIT_SOURCES)} or a folder in Hugging Face "
                f"format; got {self.init_from!r}"
            )
        check_choice("device", self.device.split(":")[0], DEVICES)
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("parallel", self.parallel, ("ddp", "fsdp"))
        if self.parallel == "fsdp" and self.dtype == "float16":
            raise ConfigError("parallel=fsdp trains in bfloat16 or float32 (float16 would need a sharded GradScaler)")
        if self.max_skipped_steps < 0:
            raise ConfigError(f"max_skipped_steps must be >= 0 (0: never stop), got {self.max_skipped_steps}")
        check_choice("optimizer", self.optimizer, ("adamw", "muon"))
        if self.optimizer == "muon" and not hasattr(torch.optim, "Muon"):
            raise ConfigError(f"optimizer='muon' needs torch.optim.Muon (torch >= 2.9), not torch {torch.__version__}")
        if self.optimizer == "muon" and self.parallel == "fsdp":
            raise ConfigError("optimizer='muon' orthogonalizes whole matrices; FSDP shards them: use parallel='ddp'")
        if isinstance(self.compile, str):
            check_choice("compile", self.compile, ("auto",))
        check_choice("compile_scope", self.compile_scope, ("blocks", "model"))
        if self.sample_interval % self.eval_interval:
            raise ConfigError(
                f"sample_interval ({self.sample_interval}) samples at eval steps: make it a multiple of "
                f"eval_interval ({self.eval_interval}), e.g. --sample_interval={self.eval_interval}"
            )
        if self.sample_interval and not self.sample_prompt:
            raise ConfigError("sample_prompt is empty; give it some text (e.g. --sample_prompt='\\n')")
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", self.dataset):
            raise ConfigError(f"dataset must be a folder name under data/, got {self.dataset!r}")

    def for_world(self, world_size: int) -> "TrainConfig":
        """This config for world_size processes: with batch_tokens, the gradient_accumulation_steps that
        keep that many tokens per optimizer step (nanochat's total_batch_size)."""
        if world_size > 1 and self.parallel == "fsdp" and self.sample_interval:
            raise ConfigError(
                "sample_interval generates on rank 0 alone, but parallel=fsdp shards the model over the ranks: "
                "set --sample_interval=0 (sample.py samples the checkpoint) or use --parallel=ddp"
            )
        if not self.batch_tokens:
            return self
        micro = self.batch_size * self.block_size * world_size  # tokens of one micro-step over all processes
        if self.batch_tokens % micro:
            raise ConfigError(
                f"batch_tokens ({self.batch_tokens:,}) must be a multiple of batch_size x block_size x processes "
                f"({self.batch_size} x {self.block_size} x {world_size} = {micro:,}); change one of them"
            )
        accum = self.batch_tokens // micro
        explicit = "gradient_accumulation_steps" in getattr(self, "explicit_keys", ())  # see parse_args
        if explicit and accum != self.gradient_accumulation_steps:
            raise ConfigError(
                f"batch_tokens ({self.batch_tokens:,}) makes gradient_accumulation_steps {accum} on {world_size} "
                f"process(es), but it is set to {self.gradient_accumulation_steps}: drop one of the two "
                "(--batch_tokens=0 sets the steps yourself)"
            )
        return dataclasses.replace(self, gradient_accumulation_steps=accum)

    def model_config(self) -> GPTConfig:
        return GPTConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(GPTConfig)})


# every numeric key's range (GPTConfig checks the model's shape, dropout and logit_softcap)
POSITIVE = ("batch_size", "gradient_accumulation_steps", "eval_iters", "log_interval", "eval_interval",
            "keep_checkpoints", "learning_rate", "muon_lr", "scalar_lr", "sample_tokens",
            "hellaswag_examples")  # fmt: skip
AT_LEAST_0 = {"max_iters": "", "warmup_iters": "", "lr_decay_iters": " (0: max_iters)", "seed": "",
              "min_lr": "", "weight_decay": " (0: no decay)", "grad_clip": " (0: no clipping)",
              "checkpoint_interval": " (0: only at the end)", "telemetry_interval": " (0: off)",
              "batch_tokens": " (0: off)", "sample_interval": " (0: off)", "hellaswag_interval": " (0: off)",
              "peak_flops": " (0: looked up from the GPU's name)"}  # fmt: skip


def check_ranges(cfg):
    """One line naming the key when a number is out of its range; NaN and infinity (--logit_softcap=1e999) never
    are in range, whatever the key."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name} must be a finite number, got {value}")
    for key in POSITIVE:
        if not getattr(cfg, key) > 0:
            raise ConfigError(f"{key} must be positive, got {getattr(cfg, key)}")
    for key, note in AT_LEAST_0.items():
        if not getattr(cfg, key) >= 0:
            raise ConfigError(f"{key} must be >= 0{note}, got {getattr(cfg, key)}")
    for key in ("beta1", "beta2"):  # AdamW's moving averages: 1 would never forget, above it diverges
        if not 0 <= getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {getattr(cfg, key)} (AdamW's default: 0.9 and 0.999)")


def check_choice(key: str, value, choices):
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")


# ----------------------------------------------------------------------------- parsing


def field_help(cls) -> dict[str, str]:
    """The trailing comment of each field's line in the class source: its one-line description."""
    helps = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            for line in inspect.getsource(klass).splitlines():
                m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
                if m:
                    helps[m.group(1)] = m.group(2)
    return helps


def _allowed_types(annotation) -> tuple:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return typing.get_args(annotation)
    return (annotation,)


def coerce(key: str, value, annotation, from_cli: bool):
    """Check value against the field's type; on the command line, parse the text as a literal."""
    allowed = _allowed_types(annotation)
    if from_cli:
        if allowed == (str,):
            return value  # text as typed: --out_dir=123 is the folder "123"
        if bool in allowed and value.lower() in ("true", "false"):
            return value.lower() == "true"
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass  # a bare word stays a string
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
        if t is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if t is bool and isinstance(value, bool):
            return value
        if t is not bool and t is not type(None) and isinstance(value, t) and not isinstance(value, bool):
            return value
    want = " or ".join(t.__name__ for t in allowed)
    raise ConfigError(f"config key '{key}' expects {want}, got {value!r} ({type(value).__name__})")


def unknown_key(key: str, valid) -> ConfigError:
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}; --help lists every key")


def read_config_file(path: str) -> dict:
    """Run a config file of `key = value` lines and return its keys (names that are not private,
    modules, functions or classes)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' not found; pass a path like configs/small.py")
    try:
        source = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file '{path}': {e}") from None
    namespace: dict = {"__file__": str(p)}  # lets a config build on another: exec(open(...).read())
    try:
        exec(compile(source, str(p), "exec"), namespace)
    except Exception as e:
        line = getattr(e, "lineno", None) or _error_line(e, str(p))
        raise ConfigError(f"config file '{path}' line {line}: {type(e).__name__}: {e}") from None
    return {
        k: v
        for k, v in namespace.items()
        if not k.startswith("_") and not isinstance(v, (types.ModuleType, types.FunctionType, type))
    }


def _error_line(e: Exception, filename: str):
    tb = e.__traceback__
    line = "?"
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def parse_args(cls, argv: list[str], allow_file: bool = True, overrides: dict | None = None):
    """Build cls from optional config files (positional *.py) then --key=value flags, in order."""
    hints = typing.get_type_hints(cls)
    valid = {f.name for f in dataclasses.fields(cls)}
    values: dict = {}

    def put(key, value, from_cli):
        if key not in valid:
            raise unknown_key(key, valid)
        values[key] = coerce(key, value, hints[key], from_cli)

    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise ConfigError(f"flag '{arg}' needs a value: write --{key}=VALUE")
            put(key.replace("-", "_"), text, from_cli=True)
        elif allow_file:
            for key, value in read_config_file(arg).items():
                put(key, value, from_cli=False)
        else:
            raise ConfigError(f"unexpected argument '{arg}'; flags look like --key=value")
    for key, value in (overrides or {}).items():
        put(key, value, from_cli=False)
    try:
        cfg = cls(**values)
    except ConfigError:
        raise
    except ValueError as e:  # GPTConfig's checks
        raise ConfigError(str(e)) from None
    cfg.explicit_keys = frozenset(values)  # set in a file or a flag, not left at the default (see for_world)
    return cfg


def help_text(cls, usage: str) -> str:
    helps = field_help(cls)
    lines = [usage, "", "keys (--key=value; a config file sets them as key = value):"]
    for f in dataclasses.fields(cls):
        lines.append(f"  --{f.name:<28} {f.default!r:<14} {helps.get(f.name, '')}")
    return "\n".join(lines)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def changed_from_defaults(cfg) -> dict:
    """The keys whose values differ from the dataclass defaults, in field order."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != f.default}


def split_flags(cls, argv: list[str]) -> tuple[typing.Any, list[str]]:
    """Split a tool's own flags (the fields of the dataclass cls) from the rest of argv, which is returned
    as it is, in order (config files and train.py's flags). A bool flag may be bare (--synthetic)."""
    hints, own, rest = typing.get_type_hints(cls), {}, []
    for arg in argv:
        key, eq, text = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        key = key.replace("-", "_")
        if key not in hints:
            rest.append(arg)
        elif eq or hints[key] is bool:
            own[key] = coerce(key, text if eq else "true", hints[key], from_cli=True)
        else:
            raise ConfigError(f"flag '{arg}' needs a value: write --{key}=VALUE")
    try:
        return cls(**own), rest
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None
