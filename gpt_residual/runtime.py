"""Where am I running: rank, world size, device and dtype, with or without torchrun.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; when they are present we join the process group
(nccl on CUDA, gloo on CPU) and each process drives the GPU of its *local* rank. Only the global
rank 0 prints, logs and writes files.
"""

import contextlib
import ctypes
import datetime
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
        backend, store = "nccl" if device_type == "cuda" else "gloo", attempt_store()
        if store is None:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)
    return Runtime(rank, local_rank, world_size, device, compute, ddp)


def attempt_store(env=os.environ):
    """Under torchrun, the launcher's store seen through a prefix of its own for each attempt (the restart count), or
    None elsewhere. torchrun lets its workers share the launcher's store (TORCHELASTIC_USE_AGENT_STORE) across
    restarts (--max-restarts), and the store still holds the addresses the previous attempt's processes published: a
    restarted rank may read one and connect to a process that is gone (gloo: "Connection refused"; with torch 2.13 the
    restart in tests/test_faults.py failed 3 times in 3 without this, and passed 3 in 3 with it). torch's own
    rendezvous once gave each attempt a prefix; this does it again."""
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(minutes=30))  # torch's default for the process group's store
    return dist.PrefixStore(f"gpt_residual/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def keep_freed_memory(device_type: str) -> bool:
    """On a CPU, keep memory that training frees for its next allocations (glibc, Linux; False elsewhere, and for
    a GPU, whose memory torch's caching allocator keeps already). By default glibc
    returns every freed block above its mmap threshold (128 KiB, adapting up to 32 MiB) to the system and maps
    fresh pages for the next one, which the kernel faults in and zeroes: an eval forward of a 6.8M-parameter BPE
    model (its 8 x 64 x 50304 logits are 103 MB) faulted ~75k pages, as much system time as compute
    (docs/benchmarks.md). With both thresholds at 1 GiB (the mmap one at 32 MiB where a glibc caps it there) the
    freed blocks are reused; the resident set stays near its peak instead of shrinking between steps."""
    if device_type != "cpu":
        return False
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


def from_rank0(rt: Runtime, value):
    """value as rank 0 has it, on every rank (one broadcast under torchrun): a check that only rank 0 can make
    reaches every rank, so all of them act on it, or raise, together."""
    if not rt.ddp:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(rt: Runtime, ended_well: bool = True):
    """Leave the process group. After a run that ended well, every rank comes here: a barrier first, so no rank tears
    the group down while another still has collectives in flight. After a failure no rank waits for the others (the
    one that failed may never come): the process ends, its connections close, and a peer's pending collective fails
    at once (gloo: "Connection closed by peer") instead of waiting out its timeout. torchtitan does the same: it
    destroys the group only after a clean run."""
    if rt.ddp and dist.is_initialized() and ended_well:
        try:
            dist.barrier()
        except Exception as e:  # a peer through the barrier may close its connection before this rank read its part
            if not is_peer_loss(e):  # (seen with gloo: "Connection reset by peer"): the run has ended all the same
                raise
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
    """Ctrl-C or SIGTERM (a preemption) asks the run to stop. A signal only sets a flag, `requested` (the first
    signal this process received); the training loop acts on agreed(), which under torchrun all-reduces every
    rank's flag at the same point on every rank, so all ranks stop, and save, at the same step, whichever of them
    was signalled (a scheduler may signal every process, torchrun forwards its own, or one process alone gets it).

    Inside `interruptible()` a signal raises Interrupted at once, so a long phase that has nothing to save
    (preparing data, the first compile) ends within seconds. A second Ctrl-C (SIGINT) that this process receives
    raises KeyboardInterrupt: the user insists; inside `shielded()` (a checkpoint being written) it waits until
    the write is done. SIGTERM never insists: Slurm sends it to every process of a job and torchrun forwards its own,
    so a worker may get two at once; a scheduler that insists sends SIGKILL.
    """

    def __init__(self, rt: Runtime):
        self.rt, self.requested, self.stopped = rt, None, None  # stopped: the signal the ranks agreed to stop on
        self._depth, self._shield, self._insisted = 0, 0, False
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        again, self.requested = self.requested is not None, self.requested or signal.Signals(signum).name
        if self._depth:
            raise Interrupted(self.requested)
        if again and signum == signal.SIGINT:
            if not self._shield:
                raise KeyboardInterrupt
            self._insisted = True  # raised when the checkpoint is written

    @contextlib.contextmanager
    def interruptible(self):
        if self.requested is not None:
            raise Interrupted(self.requested)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    @contextlib.contextmanager
    def shielded(self):
        """A checkpoint write: an insisting Ctrl-C waits for its end, so it never leaves a checkpoint half written."""
        self._shield += 1
        try:
            yield
        finally:
            self._shield -= 1
        if self._insisted and not self._shield:
            raise KeyboardInterrupt

    def agreed(self) -> bool:
        """Whether any rank was asked to stop. Under torchrun the ranks all-reduce their flags: call it at the same
        point on every rank (it waits for the device). Every rank acts on the value they agreed on, never on its own
        flag read again (a signal may land just after the all-reduce): `stopped` is set once, on every rank at the
        same call, to the agreed signal (the highest-numbered one any rank received)."""
        flag = signal.Signals[self.requested].value if self.requested else 0
        if self.rt.ddp:
            reduced = torch.tensor(float(flag), device=self.rt.device)
            dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
            flag = int(reduced.item())
        if flag and self.stopped is None:
            self.stopped = signal.Signals(flag).name
            self.rt.print(f"\n{self.stopped} received: saving a checkpoint and stopping")
        return self.stopped is not None

    def restore(self, ending: bool = False):
        """Put back the handlers found at start. ending: this process is leaving a failed run of many processes, and
        torchrun's SIGTERM to the survivors must not cut short the line that says why: signals are ignored."""
        for s, handler in self._old.items():
            signal.signal(s, signal.SIG_IGN if ending else handler)


# ----------------------------------------------------------------------------- when a process of the run fails


class PeerLost(RuntimeError):
    """A collective failed because another process of the run is gone (its message: what to do now)."""


def is_peer_loss(e: BaseException) -> bool:
    """Whether e is a collective that failed because a peer process ended: gloo's closed or reset connection (a
    plain RuntimeError naming its transport), or a DistError (NCCL, the store)."""
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and "gloo/transport" in str(e))


def first_to_report(kind: str, env=os.environ) -> tuple[bool, str]:
    """Claim the run's one report of how it ended, kind "error" or "stop": (whether this process is the first of the
    run to report, the first report's kind). Under torchrun the claim is one compare-and-set on the launcher's store,
    which outlives the workers, so an error that every rank raises, or that one rank's failure caused in the others,
    is printed once. Without torchrun, or when the store cannot be reached: (True, kind)."""
    if "RANK" not in env or "MASTER_ADDR" not in env:
        return True, kind
    mine = f"{kind}:{env['RANK']}"
    key = f"gpt_residual/ended/{env.get('TORCHELASTIC_RUN_ID', '')}/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    try:
        store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                              timeout=datetime.timedelta(seconds=5))  # fmt: skip
        first = store.compare_set(key, "", mine).decode()
    except Exception:  # e.g. rank 0 hosted the store and is gone
        return True, kind
    return first == mine, first.split(":")[0]
