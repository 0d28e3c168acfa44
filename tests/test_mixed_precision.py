"""Mixed precision: dtype resolution, bf16 autocast on the CPU, train.py's fp16 + GradScaler path,
peak FLOP/s by GPU name, and MFU.

Real fp16 training needs a CUDA GPU, and runtime.resolve_dtype refuses float16 elsewhere. But CPU
autocast runs every op of this model in float16 and torch.amp.GradScaler("cpu") works, so with
resolve_dtype patched to allow it, train.train runs its real fp16 path on the CPU: the scaled
backward, unscale_, clipping, scaler.step skipping steps whose gradients overflowed, scaler.update,
the scaler state in checkpoints and its restore on resume.

Not covered without a GPU: CUDA fp16/bf16 kernels and their numerics, the fused CUDA AdamW under
the GradScaler, torch.compile with autocast, and real bf16-capability detection (mocked here).
"""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import metrics_records

import train
from gpt_residual import checkpoint, config, runtime
from gpt_residual.health import TrainingError
from model import GPT


def train_records(out_dir) -> list[dict]:
    return [r for r in metrics_records(out_dir) if "loss" in r]


# ----------------------------------------------------------------------------- which dtype


def test_float16_is_refused_off_cuda():
    for device_type in ("cpu", "mps"):
        with pytest.raises(
            runtime.DeviceError, match="dtype=float16 needs a CUDA GPU .* use dtype=float32 or bfloat16"
        ):
            runtime.resolve_dtype("float16", device_type)


def test_float16_run_on_cpu_fails_with_one_line(tmp_path, capsys):
    code = train.main(["--device=cpu", "--dtype=float16", f"--out_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: dtype=float16 needs a CUDA GPU"), err


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_dtype_on_cuda_prefers_bf16_when_supported(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert runtime.resolve_dtype("auto", "cuda") == expected
    assert runtime.resolve_dtype("float16", "cuda") == torch.float16  # asked for explicitly: allowed
    assert runtime.resolve_dtype("float32", "cuda") == torch.float32


def test_auto_dtype_off_cuda_is_float32():
    assert runtime.resolve_dtype("auto", "cpu") == torch.float32
    assert runtime.resolve_dtype("auto", "mps") == torch.float32
    assert runtime.resolve_dtype("bfloat16", "cpu") == torch.bfloat16


def test_autocast_only_below_float32():
    rt = runtime.Runtime(0, 0, 1, "cpu", torch.float32, False)
    with rt.autocast():
        assert not torch.is_autocast_enabled("cpu")
    rt.dtype = torch.bfloat16
    with rt.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


# ----------------------------------------------------------------------------- bf16 on the CPU


def test_bfloat16_trains_on_cpu(tiny_cfg):
    cfg = tiny_cfg(dtype="bfloat16", max_iters=20, log_interval=1)
    result = train.train(cfg)
    out = Path(cfg.out_dir)
    assert json.loads((out / "config.json").read_text())["compute_dtype"] == "bfloat16"
    evals = [r for r in metrics_records(out) if "val_loss" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.2, evals
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train_records(out))
    state = checkpoint.load(out / "ckpt.pt")
    assert {v.dtype for v in state["model"].values()} == {torch.float32}  # autocast: float32 master weights
    assert state["scaler"] == {}  # no GradScaler for bf16
    assert result["val_loss"] == pytest.approx(evals[-1]["val_loss"])


# ----------------------------------------------------------------------------- fp16 + GradScaler, driven on the CPU


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """Let dtype=float16 through on the CPU; record every GradScaler train.py makes. scale=S makes
    the scaler start at S instead of 2**16 (a scale that large overflows float16 gradients)."""
    original = runtime.resolve_dtype
    monkeypatch.setattr(runtime, "resolve_dtype", lambda d, t: torch.float16 if d == "float16" else original(d, t))
    made = []
    real = torch.amp.GradScaler

    def use(scale: float | None = None):
        class Recorded(real):
            def __init__(self, device="cuda", *args, **kwargs):
                if scale is not None:
                    kwargs["init_scale"] = scale
                super().__init__(device, *args, **kwargs)
                made.append(self)

        monkeypatch.setattr(torch.amp, "GradScaler", Recorded)
        return made

    use()
    return use


def initial_weights(cfg) -> dict:
    torch.manual_seed(cfg.seed)
    cfg.vocab_size = 35  # the char_data fixture's vocabulary
    return GPT(cfg.model_config()).state_dict()


def never_stepped(optimizer_state: dict) -> bool:
    """No real gradient ever reached AdamW: its moments are zero (or it has no state at all)."""
    moments = [t for s in optimizer_state["state"].values() for k, t in s.items() if k.startswith("exp_avg")]
    return all(not t.any() for t in moments)


def test_fp16_trains_with_a_grad_scaler(tiny_cfg, fp16_on_cpu):
    made = fp16_on_cpu()
    cfg = tiny_cfg(dtype="float16", max_iters=30, log_interval=1)
    train.train(cfg)
    out = Path(cfg.out_dir)
    assert len(made) == 1 and made[0].is_enabled() and made[0]._device == "cpu"
    assert json.loads((out / "config.json").read_text())["compute_dtype"] == "float16"
    evals = [r for r in metrics_records(out) if "val_loss" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3, evals
    steps = train_records(out)
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in steps)
    state = checkpoint.load(out / "ckpt.pt")
    assert state["scaler"]["scale"] == made[0].get_scale() == 2.0**16  # no overflow: never backed off
    assert {v.dtype for v in state["model"].values()} == {torch.float32}


def test_fp16_overflowing_steps_are_skipped_and_the_scale_resumes(tiny_cfg, fp16_on_cpu):
    """A scale of 2**40 overflows float16 gradients: train.py must not raise (the scaler handles
    it), every step is skipped (weights and optimizer untouched), the scale halves each time, and
    a resumed run continues from the saved scale, not a fresh one."""
    made = fp16_on_cpu(2.0**40)
    cfg = tiny_cfg(dtype="float16", max_iters=3, log_interval=1, eval_interval=100, checkpoint_interval=0)
    train.train(cfg)
    out = Path(cfg.out_dir)
    steps = train_records(out)
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(not torch.isfinite(torch.tensor(r["grad_norm"])) for r in steps), steps  # inf/nan gradients...
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)  # ...of a finite loss
    state = checkpoint.load(out / "ckpt.pt")
    assert state["scaler"]["scale"] == made[0].get_scale() == 2.0**37
    assert never_stepped(state["optimizer"])  # no gradient reached AdamW
    init = initial_weights(tiny_cfg(dtype="float16"))
    for key, value in state["model"].items():
        assert torch.equal(value, init[key]), f"{key} changed in a skipped step"

    made = fp16_on_cpu()  # a fresh scaler would start at 2**16, which does not overflow here
    train.train(tiny_cfg(dtype="float16", max_iters=4, log_interval=1, eval_interval=100, init_from="resume"))
    assert made[-1].get_scale() == 2.0**36  # restored 2**37, overflowed again, halved
    state = checkpoint.load(out / "ckpt.pt")
    assert state["step"] == 4 and never_stepped(state["optimizer"])
    assert all(torch.equal(value, init[key]) for key, value in state["model"].items())


def test_fp16_training_recovers_after_the_scale_backs_off(tiny_cfg, fp16_on_cpu):
    made = fp16_on_cpu(2.0**24)
    cfg = tiny_cfg(dtype="float16", max_iters=30, log_interval=1)
    train.train(cfg)
    out = Path(cfg.out_dir)
    finite = [bool(torch.isfinite(torch.tensor(r["grad_norm"]))) for r in train_records(out)]
    skipped = finite.index(True)
    assert skipped >= 1 and all(finite[skipped:]), finite  # overflow first, then clean steps
    assert made[0].get_scale() == 2.0 ** (24 - skipped)
    evals = [r for r in metrics_records(out) if "val_loss" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.2, evals


def test_checkpoint_before_the_first_real_step_does_not_change_training(tiny_cfg, fp16_on_cpu, tmp_path):
    """Saving must not touch the optimizer. While every step so far was skipped, AdamW has no state;
    if writing a checkpoint then gave it one (a step counter of 1), every later update would be
    bias-corrected as one step older and the run would differ from the same run without that save."""
    finals = []
    for name, interval in (("saves", 2), ("no-saves", 0)):
        fp16_on_cpu(2.0**24)  # the first few steps overflow and are skipped
        cfg = tiny_cfg(dtype="float16", max_iters=12, eval_interval=100, checkpoint_interval=interval)
        cfg.out_dir = str(tmp_path / name)
        train.train(cfg)
        finals.append(checkpoint.load(Path(cfg.out_dir) / "ckpt.pt"))
    a, b = finals
    assert a["scaler"]["scale"] == b["scaler"]["scale"] < 2.0**24
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), f"{key} differs when checkpoints were saved"


@pytest.mark.parametrize("log_interval", [1, 100], ids=["at-a-log-step", "before-a-checkpoint"])
def test_fp16_stops_after_too_many_skipped_steps(tiny_cfg, fp16_on_cpu, monkeypatch, log_interval):
    """From the 7th step on every scaled loss is inf (an overflow that never backs off enough): the run
    must stop with one line naming the step at which max_skipped_steps=3 skips came in a row (step 8),
    checked at log time or before the next checkpoint, and ckpt.pt stays the last good one (step 6)."""
    fp16_on_cpu()
    recorded = torch.amp.GradScaler

    class Overflowing(recorded):
        calls = 0

        def scale(self, outputs):
            Overflowing.calls += 1
            return super().scale(outputs) * (math.inf if Overflowing.calls > 6 else 1.0)

    monkeypatch.setattr(torch.amp, "GradScaler", Overflowing)
    cfg = tiny_cfg(dtype="float16", max_iters=40, log_interval=log_interval, eval_interval=100,
                   checkpoint_interval=3, max_skipped_steps=3)
    with pytest.raises(TrainingError) as e:
        train.train(cfg)
    message = str(e.value)
    assert "\n" not in message and message.startswith("step 8: float16 gradients overflowed 3 steps in a row")
    assert "the last checkpoint is kept" in message
    state = checkpoint.load(Path(cfg.out_dir) / "ckpt.pt")
    assert state["step"] == 6 and state["scaler"]["scale"] == 2.0**16  # saved before the first overflow
    assert sorted(int(p.stem[5:]) for p in Path(cfg.out_dir).glob("ckpt-*.pt")) == [3, 6]  # none after step 6


def test_fp16_skipped_steps_are_counted_in_a_row_only(tiny_cfg, fp16_on_cpu):
    """A scale of 2**24 overflows the first steps, then backs off and trains: fewer skips in a row than
    max_skipped_steps never stop the run."""
    made = fp16_on_cpu(2.0**24)
    cfg = tiny_cfg(dtype="float16", max_iters=30, log_interval=1, max_skipped_steps=20)
    train.train(cfg)
    skipped = 24 - int(math.log2(made[0].get_scale()))
    assert 1 <= skipped < 20
    with pytest.raises(TrainingError, match=f"step {skipped - 1}: float16 gradients overflowed {skipped} steps"):
        fp16_on_cpu(2.0**24)
        train.train(tiny_cfg(dtype="float16", max_iters=30, log_interval=1, max_skipped_steps=skipped, overwrite=True))


def test_max_skipped_steps_is_checked(tiny_cfg):
    with pytest.raises(config.ConfigError, match="max_skipped_steps must be >= 0"):
        tiny_cfg(max_skipped_steps=-1)


def test_auto_float16_under_fsdp_is_refused(monkeypatch, tmp_path, capsys):
    """A GPU without bf16 makes dtype=auto float16, which FSDP cannot train (no sharded GradScaler)."""
    monkeypatch.setattr(runtime, "resolve_dtype", lambda d, t: torch.float16)
    code = train.main(["--device=cpu", "--parallel=fsdp", f"--out_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: dtype=auto chose float16") and "set dtype=float32 or parallel=ddp" in err[0]
    assert runtime.init_runtime("cpu", "auto", "ddp").dtype == torch.float16  # DDP keeps its GradScaler


# ----------------------------------------------------------------------------- peak FLOP/s and MFU


def cuda_rt(dtype=torch.bfloat16) -> runtime.Runtime:
    return runtime.Runtime(0, 0, 1, "cuda:0", dtype, False)


@pytest.mark.parametrize(
    "name, flops",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 989e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100-PCIE-40GB", 312e12),
        ("NVIDIA A10G", 70e12),
        ("NVIDIA A10", 125e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA B200", 2.25e15),
        ("Tesla T4", 65e12),
    ],
)
def test_peak_flops_by_gpu_name(monkeypatch, name, flops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert runtime.peak_flops(cuda_rt()) == flops
    assert runtime.peak_flops(cuda_rt(torch.float16)) == flops
    assert runtime.peak_flops(cuda_rt(torch.float32)) == flops / 2  # TF32 tensor cores


def test_peak_flops_unknown_cpu_and_override(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert runtime.peak_flops(cuda_rt()) is None
    assert runtime.peak_flops(cuda_rt(), override=123e12) == 123e12
    cpu = runtime.Runtime(0, 0, 1, "cpu", torch.float32, False)
    assert runtime.peak_flops(cpu) is None
    assert runtime.peak_flops(cpu, override=1e12) == 1e12


def test_mfu_is_logged_with_the_peak(tiny_cfg):
    cfg = tiny_cfg(max_iters=4, log_interval=1, peak_flops=1e12)
    train.train(cfg)
    out = Path(cfg.out_dir)
    model = GPT(dataclasses.replace(cfg.model_config(), vocab_size=35))  # the char_data fixture's vocabulary
    for r in train_records(out):
        assert r["mfu"] == pytest.approx(model.flops_per_token() * r["tokens_per_sec"] / 1e12, rel=1e-9)
        assert 0 < r["mfu"] < 1
    cfg = tiny_cfg(max_iters=2, log_interval=1, out_dir=str(out.parent / "no-peak"))
    train.train(cfg)
    assert all(r["mfu"] is None for r in train_records(out.parent / "no-peak"))  # CPU: no known peak


def test_estimate_mfu_formula():
    from model import GPTConfig

    model = GPT(GPTConfig(block_size=16, vocab_size=35, n_layer=2, n_head=2, n_embd=32))
    per_token = 6 * model.num_params() + 12 * 2 * 32 * 16
    assert model.flops_per_token() == per_token
    assert model.estimate_mfu(1000.0, per_token * 4000.0) == pytest.approx(0.25)
