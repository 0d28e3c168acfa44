"""config.py: config files, --key=value flags, types, validation, and the one-line errors of the CLIs."""

import dataclasses

import pytest
from conftest import ROOT, assert_one_line_error, run

import sample
from gpt_residual import config
from gpt_residual.config import ConfigError, TrainConfig, parse_args

CONFIGS = sorted((ROOT / "configs").glob("*.py"))


def parse(*argv):
    return parse_args(TrainConfig, list(argv))


def write(tmp_path, text, name="cfg.py"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ----------------------------------------------------------------------------- config files


def test_configs_present():
    names = {p.name for p in CONFIGS}
    assert {"small.py", "post_ln.py", "rmsnorm.py", "gpt2.py", "shakespeare_char.py"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_file_loads(path):
    cfg = parse(str(path))
    assert isinstance(cfg, TrainConfig)
    assert cfg.model_config().n_embd % cfg.n_head == 0


def test_config_file_values_are_applied():
    cfg = parse(str(ROOT / "configs/small.py"))
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (2, 4, 128, 64)
    assert cfg.bias is False and cfg.learning_rate == 5e-3 and cfg.out_dir == "out"
    gpt2 = parse(str(ROOT / "configs/gpt2.py"))
    assert (gpt2.n_layer, gpt2.n_embd, gpt2.dataset, gpt2.bias) == (12, 768, "openwebtext", False)
    # ~0.5M tokens per step on any number of GPUs: the accumulation is derived from batch_tokens
    for world, accum in ((1, 16), (2, 8), (8, 2)):
        assert gpt2.for_world(world).gradient_accumulation_steps == accum
        assert gpt2.for_world(world).batch_size * 1024 * accum * world == 524_288
    assert cfg.for_world(4) is cfg  # without batch_tokens, gradient_accumulation_steps is per process, as set
    with pytest.raises(config.ConfigError, match="batch_tokens .* must be a multiple of batch_size x block_size"):
        gpt2.for_world(3)


def differing_keys(a, b) -> set:
    da, db = config.to_dict(a), config.to_dict(b)
    return {k for k in da if da[k] != db[k]}


@pytest.mark.parametrize(
    "name,switch,value", [("post_ln.py", "norm_position", "post"), ("rmsnorm.py", "norm", "rmsnorm")]
)
def test_ablation_configs_differ_only_in_the_norm(name, switch, value):
    small = parse(str(ROOT / "configs/small.py"))
    other = parse(str(ROOT / "configs" / name))
    assert differing_keys(small, other) == {switch, "out_dir"}
    assert getattr(other, switch) == value
    assert other.out_dir != small.out_dir


def test_flags_override_file_in_order(tmp_path):
    path = write(tmp_path, "n_layer = 5\nlearning_rate = 1e-3\n")
    cfg = parse(path, "--n_layer=7")
    assert cfg.n_layer == 7 and cfg.learning_rate == 1e-3
    cfg = parse("--n_layer=7", path)  # a later file wins over an earlier flag
    assert cfg.n_layer == 5


def test_config_file_helpers_are_not_keys(tmp_path):
    path = write(
        tmp_path, "import math\nfrom pathlib import Path\n_private = 3\ndef f():\n    return 1\nn_layer = 2 + 1\n"
    )
    assert parse(path).n_layer == 3


def test_unknown_key_in_file(tmp_path):
    path = write(tmp_path, "n_layers = 3\n")
    with pytest.raises(ConfigError) as e:
        parse(path)
    assert "n_layers" in str(e.value) and "did you mean 'n_layer'" in str(e.value)


def test_unknown_key_from_flag():
    with pytest.raises(ConfigError) as e:
        parse("--n_layers=3")
    assert "n_layers" in str(e.value) and "did you mean 'n_layer'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse("--learnin_rate=1e-3")
    assert "learnin_rate" in str(e.value) and "'learning_rate'" in str(e.value)


def test_dashes_in_flag_names():
    assert parse("--n-layer=3").n_layer == 3


def test_wrong_type_in_file(tmp_path):
    with pytest.raises(ConfigError, match="n_layer"):
        parse(write(tmp_path, "n_layer = '3'\n"))
    with pytest.raises(ConfigError, match="out_dir"):
        parse(write(tmp_path, "out_dir = 123\n"))
    with pytest.raises(ConfigError, match="bias"):
        parse(write(tmp_path, "bias = 1\n"))


# ----------------------------------------------------------------------------- flag types


@pytest.mark.parametrize(
    "flag,key",
    [
        ("--n_layer=abc", "n_layer"),
        ("--n_layer=3.5", "n_layer"),
        ("--n_layer=True", "n_layer"),
        ("--n_layer=", "n_layer"),
        ("--learning_rate=fast", "learning_rate"),
        ("--learning_rate=True", "learning_rate"),
        ("--bias=maybe", "bias"),
        ("--bias=1", "bias"),
        ("--dropout=[0.1]", "dropout"),
    ],
)
def test_wrong_type_flag(flag, key):
    with pytest.raises(ConfigError) as e:
        parse(flag)
    assert f"'{key}'" in str(e.value)


def test_float_flag_accepts_int():
    cfg = parse("--learning_rate=1", "--min_lr=0", "--dropout=0")
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert isinstance(cfg.min_lr, float) and isinstance(cfg.dropout, float)
    assert parse("--learning_rate=3e-4", "--min_lr=0").learning_rate == 3e-4


def test_string_flags_stay_strings():
    assert parse("--out_dir=123").out_dir == "123"
    assert parse("--out_dir=True").out_dir == "True"
    assert parse("--out_dir=[1, 2]").out_dir == "[1, 2]"
    assert parse("--wandb_run_name='quoted'").wandb_run_name == "'quoted'"
    assert parse("--out_dir=a=b").out_dir == "a=b"


@pytest.mark.parametrize("text,value", [("True", True), ("true", True), ("False", False), ("false", False)])
def test_bool_flags(text, value):
    assert parse(f"--bias={text}").bias is value
    assert parse(f"--decay_lr={text}").decay_lr is value


@pytest.mark.parametrize("text,value", [("auto", "auto"), ("True", True), ("False", False), ("true", True)])
def test_compile_flag(text, value):
    assert parse(f"--compile={text}").compile == value
    assert type(parse(f"--compile={text}").compile) is type(value)


def test_int_flag():
    cfg = parse("--n_layer=3", "--max_iters=1_000")
    assert cfg.n_layer == 3 and cfg.max_iters == 1000 and isinstance(cfg.n_layer, int)


@pytest.mark.parametrize(
    "flags,key",
    [
        (["--n_embd=30", "--n_head=4"], "n_embd"),
        (["--batch_size=0"], "batch_size"),
        (["--gradient_accumulation_steps=0"], "gradient_accumulation_steps"),
        (["--norm=foo"], "norm"),
        (["--norm_position=middle"], "norm_position"),
        (["--dtype=float8"], "dtype"),
        (["--init_from=banana"], "init_from"),
        (["--compile=sometimes"], "compile"),
        (["--device=tpu"], "device"),
        (["--dropout=1.0"], "dropout"),
        (["--n_layer=0"], "n_layer"),
        (["--max_iters=-1"], "max_iters"),
        (["--min_lr=1.0", "--learning_rate=0.1"], "min_lr"),
        (["--dataset=../etc"], "dataset"),
    ],
)
def test_invalid_values(flags, key):
    with pytest.raises(ConfigError) as e:
        parse(*flags)
    assert key in str(e.value)


def test_valid_device_choices():
    assert parse("--device=cuda:1").device == "cuda:1"
    assert parse("--device=cpu").device == "cpu"


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        parse(str(tmp_path / "nope.py"))


def test_config_file_syntax_error_names_line(tmp_path):
    path = write(tmp_path, "n_layer = 2\nn_head = 2\nn_embd = = 3\n")
    with pytest.raises(ConfigError) as e:
        parse(path)
    assert "line 3" in str(e.value) and path in str(e.value)


def test_config_file_runtime_error_names_line(tmp_path):
    path = write(tmp_path, "n_layer = 2\n\nn_head = undefined_name\n")
    with pytest.raises(ConfigError) as e:
        parse(path)
    assert "line 3" in str(e.value) and "NameError" in str(e.value)


def test_flag_without_value():
    with pytest.raises(ConfigError, match="n_layer"):
        parse("--n_layer")


def test_sample_config_rejects_positional_args():
    with pytest.raises(ConfigError):
        parse_args(sample.SampleConfig, [str(ROOT / "configs/small.py")], allow_file=False)


def test_sample_config_types():
    cfg = parse_args(sample.SampleConfig, ["--top_k=5", "--top_p=0.9", "--start=123", "--use_cache=false"], False)
    assert cfg.top_k == 5 and cfg.top_p == 0.9 and cfg.start == "123" and cfg.use_cache is False
    cfg = parse_args(sample.SampleConfig, ["--top_k=None"], allow_file=False)
    assert cfg.top_k is None
    for bad in ("--top_k=0", "--top_k=2.5", "--top_p=0", "--top_p=1.5", "--temperature=-1", "--num_samples=0"):
        with pytest.raises(ConfigError):
            parse_args(sample.SampleConfig, [bad], allow_file=False)


def test_model_config_round_trip():
    cfg = parse("--n_layer=3", "--norm=rmsnorm", "--norm_position=post", "--bias=False")
    mc = cfg.model_config()
    assert (mc.n_layer, mc.norm, mc.norm_position, mc.bias) == (3, "rmsnorm", "post", False)
    assert type(mc).__name__ == "GPTConfig"


# ----------------------------------------------------------------------------- command-line values are never run


def test_flag_values_are_not_evaluated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    payload = "__import__('os').system('touch X')"
    cfg = parse(f"--out_dir={payload}")
    assert cfg.out_dir == payload
    for key in ("n_layer", "learning_rate", "bias", "compile"):
        with pytest.raises(ConfigError, match=key):
            parse(f"--{key}={payload}")
    with pytest.raises(ConfigError):
        parse_args(sample.SampleConfig, [f"--top_k={payload}"], allow_file=False)
    assert not (tmp_path / "X").exists()
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the command line


def test_cli_unknown_key():
    proc = run(["train.py", "configs/small.py", "--n_layers=3"])
    assert_one_line_error(proc, "n_layers", "'n_layer'")


def test_cli_wrong_type():
    assert_one_line_error(run(["train.py", "configs/small.py", "--n_layer=abc"]), "n_layer")


def test_cli_missing_config_file():
    assert_one_line_error(run(["train.py", "configs/nope.py"]), "configs/nope.py")


def test_cli_invalid_value(tmp_path):
    assert_one_line_error(run(["train.py", "--n_embd=30", "--n_head=4", f"--out_dir={tmp_path}"]), "n_embd")


def test_sample_cli_unknown_key():
    assert_one_line_error(run(["sample.py", "--temprature=0.5"]), "temprature", "'temperature'")


def test_train_help_lists_every_key():
    proc = run(["train.py", "--help"])
    assert proc.returncode == 0, proc.stderr
    helps = config.field_help(TrainConfig)
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    assert set(fields) <= set(helps), set(fields) - set(helps)  # every field has a description
    for name in fields:
        line = next((ln for ln in proc.stdout.splitlines() if ln.strip().startswith(f"--{name} ")), None)
        assert line is not None, f"--help does not list {name}"
        assert helps[name] and helps[name] in line, (name, line)
    for text in ("context length", "normalization type", "peak learning rate", "micro-batches per optimizer step"):
        assert text in proc.stdout
    assert "train.py" in proc.stdout


def test_sample_help_lists_every_key():
    proc = run(["sample.py", "--help"])
    assert proc.returncode == 0, proc.stderr
    helps = config.field_help(sample.SampleConfig)
    for f in dataclasses.fields(sample.SampleConfig):
        line = next((ln for ln in proc.stdout.splitlines() if ln.strip().startswith(f"--{f.name} ")), None)
        assert line is not None, f"--help does not list {f.name}"
        assert helps[f.name] and helps[f.name] in line
    assert "KV cache" in proc.stdout and "sample.py" in proc.stdout


# ----------------------------------------------------------------------------- ranges


NUMERIC = [f.name for f in dataclasses.fields(TrainConfig) if f.type in (int, float, "int", "float")]


@pytest.mark.parametrize("key", NUMERIC)
def test_every_numeric_key_refuses_a_negative_value(key):
    """No numeric key means anything below 0 (and none is left unchecked): -1 is one ConfigError naming it."""
    with pytest.raises(ConfigError, match=rf"^{key} must"):
        parse_args(TrainConfig, [], overrides={key: -1})


@pytest.mark.parametrize(
    "key,value",
    [("grad_clip", -1.0), ("weight_decay", -1.0), ("beta1", 1.5), ("beta1", 1.0), ("beta2", -0.1), ("beta2", 1.0),
     ("learning_rate", 0.0), ("learning_rate", float("inf")), ("min_lr", float("nan")), ("muon_lr", 0.0),
     ("scalar_lr", 0.0), ("dropout", 1.0), ("logit_softcap", -0.5), ("peak_flops", float("nan"))],
)  # fmt: skip
def test_values_that_break_the_math_are_refused(key, value):
    with pytest.raises(ConfigError, match=rf"^{key} must"):
        parse_args(TrainConfig, [], overrides={key: value})


FLOATS = [f.name for f in dataclasses.fields(TrainConfig) if f.type in (float, "float")]


@pytest.mark.parametrize("key", FLOATS)
def test_every_float_key_refuses_infinity_and_nan(key):
    """1e999 parses as infinity: no float key means it (nor NaN), so each is one ConfigError naming the key."""
    for value in ("1e999", "-1e999"):
        with pytest.raises(ConfigError, match=rf"^{key} must"):
            parse(f"--{key}={value}")
    with pytest.raises(ConfigError, match=rf"^{key} must"):
        parse_args(TrainConfig, [], overrides={key: float("nan")})


def test_cli_infinite_logit_softcap_is_one_line(tmp_path):
    proc = run(["train.py", "--logit_softcap=1e999", f"--out_dir={tmp_path}"])
    assert_one_line_error(proc, "logit_softcap must be a finite number, got inf")


def test_edges_of_the_ranges_are_accepted():
    cfg = parse("--grad_clip=0", "--weight_decay=0", "--beta1=0", "--beta2=0.999", "--min_lr=0", "--warmup_iters=0")
    assert (cfg.grad_clip, cfg.beta1, cfg.beta2) == (0.0, 0.0, 0.999)


def test_cli_grad_clip_below_zero_is_one_line(tmp_path):
    assert_one_line_error(run(["train.py", "--grad_clip=-1", f"--out_dir={tmp_path}"]), "grad_clip must be >= 0")


def test_batch_tokens_with_a_disagreeing_gradient_accumulation_steps_is_refused(tmp_path):
    gpt2 = str(ROOT / "configs/gpt2.py")  # batch_tokens = 524,288: 16 micro-steps on 1 process, 2 on 8
    assert parse(gpt2).for_world(1).gradient_accumulation_steps == 16  # the default is no conflict
    assert parse(gpt2, "--gradient_accumulation_steps=2").for_world(8).gradient_accumulation_steps == 2  # agrees
    with pytest.raises(ConfigError, match="makes gradient_accumulation_steps 16 .* set to 2: drop one"):
        parse(gpt2, "--gradient_accumulation_steps=2").for_world(1)
    both = write(tmp_path, "batch_tokens = 4096\ngradient_accumulation_steps = 3\nbatch_size = 4\nblock_size = 64\n")
    with pytest.raises(ConfigError, match="makes gradient_accumulation_steps 16"):
        parse(both).for_world(1)
    proc = run(["train.py", both, "--device=cpu", f"--out_dir={tmp_path / 'o'}"])
    assert_one_line_error(proc, "batch_tokens (4,096)", "gradient_accumulation_steps")


def test_vocab_size_help_says_the_dataset_replaces_it():
    assert "the dataset's vocabulary replaces it" in config.field_help(TrainConfig)["vocab_size"]
