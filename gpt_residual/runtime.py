"""Where am I running: rank, world size, device and dtype, with or without torchrun.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; when they are present we join the process group
(nccl on CUDA, gloo on CPU) and each process drives the GPU of its *local* rank. Only the global
rank 0 prints, logs and writes files.
"""

import contextlib
import ctypes
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Dense bf16/fp16 tensor-core peak FLOP/s by GPU name (vendor datasheets, without sparsity).
# Matched as substrings of torch.cuda.get_device_name(), most specific first.
PEAK_FLOPS = [
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("A6000", 155e12),
    ("V100", 125e12),
    ("T4", 65e12),
]


@dataclass
class Runtime:
    rank: int  # global rank, 0..world_size-1
    local_rank: int  # rank within this node: which GPU to use
    world_size: int
    device: str  # e.g. "cuda:0", "cpu"
    dtype: torch.dtype  # compute dtype under autocast (float32: no autocast)
    ddp: bool  # launched by torchrun with more than one process group member

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def print(self, *args, **kwargs):
        if self.master:
            print(*args, **kwargs, flush=True)


class DeviceError(ValueError):
    """A device or dtype request this machine cannot satisfy (printed as one line)."""


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device={device} but no CUDA GPU is visible; use --device=cpu or auto")
    if device == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("device=mps but MPS is not available; use --device=cpu or auto")
    return device


def resolve_dtype(dtype: str, device_type: str) -> torch.dtype:
    if dtype == "auto":
        if device_type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype == "float16" and device_type != "cuda":
        raise DeviceError(
            f"dtype=float16 needs a CUDA GPU (it trains with a GradScaler); on {device_type} "
            "use dtype=float32 or bfloat16"
        )
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def init_runtime(device: str = "auto", dtype: str = "auto", parallel: str = "ddp") -> Runtime:
    """Set up this process: distributed group (under torchrun), device, dtype, TF32."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if ddp:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
        world_size = int(os.environ["WORLD_SIZE"])
    else:
        rank, local_rank, world_size = 0, 0, 1
    device = resolve_device(device)
    if device == "cuda" or (ddp and device.startswith("cuda")):
        device = f"cuda:{local_rank}"
    device_type = device.split(":")[0]
    if device_type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere and newer
        torch.backends.cudnn.allow_tf32 = True
    compute = resolve_dtype(dtype, device_type)
    if parallel == "fsdp" and compute == torch.float16:  # explicit float16 is refused by TrainConfig
        raise DeviceError(
            "dtype=auto chose float16 (this GPU has no bfloat16), but parallel=fsdp trains in bfloat16 or float32 "
            "(float16 would need a sharded GradScaler); set dtype=float32 or parallel=ddp"
        )
    if ddp and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Runtime(rank, local_rank, world_size, device, compute, ddp)


def keep_freed_memory() -> bool:
    """Keep memory that training frees for its next allocations (glibc, Linux; False elsewhere). By default glibc
    returns every freed block above its mmap threshold (128 KiB, adapting up to 32 MiB) to the system and maps
    fresh pages for the next one, which the kernel faults in and zeroes: an eval forward of a 6.8M-parameter BPE
    model (its 8 x 64 x 50304 logits are 103 MB) faulted ~75k pages, as much system time as compute
    (docs/benchmarks.md). With both thresholds at 1 GiB the freed blocks are reused; the resident set stays near
    its peak instead of shrinking between steps."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    big = 1 << 30
    return bool(mallopt(M_MMAP_THRESHOLD, big) or mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(
        mallopt(M_TRIM_THRESHOLD, big)
    )


def synchronize(rt: Runtime):
    """Wait for the device to finish its queued work (for timing; a no-op on the CPU)."""
    if rt.device_type == "cuda":
        torch.cuda.synchronize(rt.device)


def shutdown(rt: Runtime):
    if rt.ddp and dist.is_initialized():
        dist.barrier()  # no rank tears the group down while another still has collectives in flight
        dist.destroy_process_group()


def peak_flops(rt: Runtime, override: float = 0.0) -> float | None:
    """Peak FLOP/s of one device for MFU: the override, else the GPU's dense bf16 figure
    (halved for float32, which runs on TF32 tensor cores); None when unknown (e.g. CPU)."""
    if override > 0:
        return override
    if rt.device_type != "cuda":
        return None
    name = torch.cuda.get_device_name(rt.device)
    for key, flops in PEAK_FLOPS:
        if key in name:
            return flops / 2 if rt.dtype == torch.float32 else flops
    return None


def torch_version() -> tuple[int, int]:
    """torch's (major, minor), e.g. (2, 6) for 2.6.0+cu124."""
    return tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])


def parallelize(model: torch.nn.Module, parallel: str, rt: Runtime) -> torch.nn.Module:
    """Shard with FSDP2 (parallel="fsdp"; before the optimizer is built), in place. DDP wrapping is
    done after torch.compile, by wrap_ddp. Single-process runs are left alone."""
    if parallel == "fsdp" and rt.ddp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if rt.device_type == "cpu" and torch_version() < (2, 7):  # FSDP2 records stream events: CPU has them from 2.7
            raise DeviceError(f"parallel=fsdp on CPU needs torch >= 2.7 (this is {torch.__version__}); "
                              "use parallel=ddp or a newer torch")

        # compute in the run's dtype, reduce gradients in float32; each block is one unit of sharding
        mp = MixedPrecisionPolicy(param_dtype=rt.dtype, reduce_dtype=torch.float32)
        for block in model.transformer.h:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    return model


def wrap_ddp(model: torch.nn.Module, parallel: str, rt: Runtime) -> torch.nn.Module:
    if rt.ddp and parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)
    return model


@contextlib.contextmanager
def no_grad_sync(model: torch.nn.Module, skip: bool):
    """Skip the gradient all-reduce on accumulation micro-steps (DDP: no_sync; FSDP2: the flag)."""
    if not skip:
        yield
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


# ----------------------------------------------------------------------------- stopping when asked


class Interrupted(BaseException):
    """Raised by GracefulStop inside an interruptible phase (data preparation, compilation,
    evaluation): that phase is abandoned. A BaseException, so library code that catches Exception
    (torch.compile does) cannot swallow it."""


class GracefulStop:
    """Ctrl-C or SIGTERM (a preemption) asks the run to stop; the training loop checks `requested`.

    Inside `interruptible()` a signal raises Interrupted at once, so a long phase that has nothing
    to save (preparing data, the first compile) ends within seconds, not when the phase ends. A
    second signal outside such a phase raises KeyboardInterrupt: the user insists.
    """

    def __init__(self, rt: Runtime):
        self.rt, self.requested, self._depth = rt, None, 0
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.requested is not None and not self._depth:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        if self._depth:
            raise Interrupted(self.requested)
        self.rt.print(f"\n{self.requested} received: finishing this step and saving a checkpoint")

    @contextlib.contextmanager
    def interruptible(self):
        if self.requested is not None:
            raise Interrupted(self.requested)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    def agreed(self) -> bool:
        """Whether any rank was asked to stop. Under torchrun a signal may reach one rank only, so the
        ranks agree by an all-reduce: call it at the same point on every rank (it syncs with the device)."""
        if not self.rt.ddp:
            return self.requested is not None
        flag = torch.tensor(float(self.requested is not None), device=self.rt.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.requested is None:
            self.requested = "SIGTERM"
        return self.requested is not None

    def restore(self):
        for s, handler in self._old.items():
            signal.signal(s, handler)
