"""Checkpoints that survive crashes and never run code when loaded.

Saving writes a temporary file in the same folder, fsyncs it, then renames it over the old one:
a rename is atomic, so a crash at any instant leaves either the old checkpoint or the new one,
never half of one. Loading uses torch.load(weights_only=True), which unpickles only tensors and
plain containers and refuses anything that would construct arbitrary objects or call code.

What a training checkpoint holds (training_state, restore) is here too; whether an out_dir may be written
and whether a checkpoint may be resumed is run policy, in run_dir.py.
"""

import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from gpt_residual import files

FORMAT_VERSION = 1
EARLIER = "resume from an earlier ckpt-<step>.pt (copy it to ckpt.pt) or start a new out_dir"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, unsafe or does not fit; printed as one line."""


def save(state: dict, path: Path):
    """Write state to path atomically (temp file + fsync + rename). A failed write (a full disk: torch.save reports
    it as a RuntimeError, fsync as an OSError) is one CheckpointError line saying what to free; the temp file is
    removed and the previous checkpoint is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # nothing half-written stays, whatever stopped the write
        files.remove(tmp)
        failed = isinstance(e, (OSError, RuntimeError))
        err = failed and files.failure(e, path, "a checkpoint", state_bytes(state), what_is_left(path.parent))
        if not err:
            raise
        raise CheckpointError(str(err)) from None
    files.fsync_dir(path.parent)


def state_bytes(state) -> int:
    """About how many bytes torch.save writes for state: its tensors' (the pickled rest is small)."""
    if isinstance(state, torch.Tensor):
        return state.nelement() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def what_is_left(out_dir: Path) -> str:
    """After a failed save: what a resume can start from."""
    latest = Path(out_dir) / "ckpt.pt"
    if not Path(out_dir).is_dir():
        return (f"its folder {out_dir} no longer exists (deleted while training?), and with it every checkpoint of "
                "this run; start again with an out_dir that stays")  # fmt: skip
    if latest.exists():
        return f"the previous checkpoint, ckpt.pt ({describe(latest)}), is intact: resume from it once there is room"
    return "no earlier checkpoint exists; free space or choose another out_dir"


def load(path: Path, mmap: bool = False) -> dict:
    """Load a checkpoint on the CPU, refusing anything but tensors and plain data; with mmap, its tensors are
    memory-mapped from the file and read only when used (what is never used, the optimizer's state for a
    sampler, is never read)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; train first (init_from=scratch) or fix out_dir")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "unsupported global" in str(e).lower():  # a class or function to call: code would run
            raise CheckpointError(
                f"refusing to load {path}: it holds objects other than tensors and plain "
                "data, which could run code; only load checkpoints you trust"
            ) from None
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt (unreadable pickle); {EARLIER}") from None
    except Exception as e:  # garbage bytes can fail the restricted unpickler in any way (KeyError, ...)
        reason = (str(e).strip() or type(e).__name__).splitlines()[0].split(". ")[0][:100]
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({reason}); {EARLIER}") from None
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise CheckpointError(f"{path} is not a checkpoint written by train.py")
    version = state.get("version", 1)  # every train.py checkpoint has one; format 1 had no other
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{path} has an unknown checkpoint format ({version!r}); {EARLIER}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version}, but this code reads formats 1 to {FORMAT_VERSION}: it was "
            "written by a newer version of this project; update the code (git pull) to read it"
        )
    return state


def describe(path: Path) -> str:
    """A short description of the run a checkpoint belongs to, e.g. "step 750 on dataset 'shakespeare_char'",
    read without loading its tensors into memory."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return f"step {state['step']} on dataset '{state['data']['dataset']}'"
    except Exception:  # unreadable or from an older format: still a run not to overwrite
        return f"{Path(path).name} (unreadable)"


def rng_state() -> dict:
    """Every random generator that can influence training."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict):
    random.setstate(_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _link(src: Path, dst: Path):
    """Make dst another name for src, atomically (hard link; a copy where links are not supported)."""
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        try:
            shutil.copyfile(src, tmp)
        except OSError:
            files.remove(tmp)  # a copy that a full disk cut short
            raise
    os.replace(tmp, dst)


def remove_stale_temps(out_dir: Path):
    """Delete temporary files left by a process killed while saving (never a complete checkpoint)."""
    for tmp in Path(out_dir).glob(".ckpt*.tmp*"):
        tmp.unlink(missing_ok=True)


def save_run(state: dict, out_dir: Path, keep: int, is_best: bool) -> Path:
    """Save state as out_dir/ckpt-<step>.pt, point ckpt.pt (the latest) and, if is_best,
    ckpt-best.pt at it, then delete all but the newest `keep` step files. The names are hard
    links, so the latest and the best cost no extra disk space."""
    out_dir = Path(out_dir)
    path = out_dir / f"ckpt-{state['step']:07d}.pt"
    save(state, path)
    try:
        _link(path, out_dir / "ckpt.pt")
        if is_best:
            _link(path, out_dir / "ckpt-best.pt")
    except OSError as e:
        raise CheckpointError(
            f"could not update {out_dir}/ckpt.pt ({e.strerror or e}); the new checkpoint is {path}"
        ) from None
    files.fsync_dir(out_dir)
    for old in step_files(out_dir, below=state["step"])[: -keep + 1 or None]:
        old.unlink(missing_ok=True)
    return path


def step_files(out_dir: Path, below: int | None = None) -> list[Path]:
    """The ckpt-<step>.pt files of out_dir, oldest first; with below, only those of earlier steps.
    An out_dir holds one run (train.py refuses to start another over it), so these are its files;
    files of later steps (left when a run is resumed from an earlier checkpoint) are never pruned,
    the run overwrites them when it gets there."""
    files = sorted(Path(out_dir).glob("ckpt-[0-9]*.pt"))
    if below is not None:
        files = [f for f in files if int(f.stem.split("-")[1]) < below]
    return files


def model_and_optimizer_state(model, optimizer) -> tuple[dict, dict]:
    """Full (unsharded) state dicts on the CPU, the same format for one process, DDP and FSDP;
    the optimizer's is keyed by parameter name. Every rank must call it (FSDP gathers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    fresh = not optimizer.state
    model_state, optimizer_state = get_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if fresh:  # get_state_dict initialises an empty optimizer by a zero step; undo it so saving changes nothing
        optimizer.state.clear()
        optimizer_state["state"] = {}
    return model_state, optimizer_state


def load_model_and_optimizer_state(model, optimizer, state: dict):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(full_state_dict=True),
    )


def training_state(model, optimizer, scaler, rt, **fields) -> dict | None:
    """The whole state of a run, to save: weights and optimizer (full, unsharded), GradScaler, every
    rank's RNG, and the given fields (step, best_val_loss, config, model_config, tokenizer, data).
    Every rank must call it (FSDP gathers, the RNG states are gathered); rank 0 gets the dict, others None."""
    import torch.distributed as dist

    rngs = [None] * rt.world_size
    if rt.ddp:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    model_state, optimizer_state = model_and_optimizer_state(model, optimizer)
    if not rt.master:
        return None
    scaler_state = scaler.state_dict() if scaler.is_enabled() else {}
    return {"version": FORMAT_VERSION, "model": model_state, "optimizer": optimizer_state, "scaler": scaler_state,
            "rng": rngs, **fields}  # fmt: skip


def restore(saved: dict, model, optimizer, scaler, rt) -> bool:
    """Load a checkpoint's weights, optimizer, GradScaler and this rank's RNG. Returns False when the
    checkpoint was written by another number of processes (the RNG streams then differ)."""
    load_model_and_optimizer_state(model, optimizer, saved)
    if saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    rngs = saved["rng"]
    if len(rngs) != rt.world_size:
        return False
    set_rng_state(rngs[rt.rank])
    return True
