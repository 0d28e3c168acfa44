"""A full disk at every write: one line saying what to free, no temp file left, the previous checkpoint intact,
metrics.jsonl whole lines, an exact resume once there is room. On a real full filesystem (a small tmpfs; skipped,
with the reason, where this process may not mount one) and with ENOSPC injected at each write site."""

import builtins
import errno
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TINY, assert_one_line_error, metrics_records, run, tiny_text

from data import token_files
from gpt_residual import checkpoint, console, files, runlog


@pytest.fixture
def small_fs(tmp_path):
    """mount(bytes) -> a folder on a new tmpfs of that size, unmounted after the test; grow(folder, bytes)."""
    mounted = []

    def mount(size: int) -> Path:
        folder = tmp_path / f"fs{len(mounted)}"
        folder.mkdir()
        try:
            proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                  capture_output=True, text=True, timeout=30)  # fmt: skip
        except OSError as e:
            pytest.skip(f"a real full disk needs a small tmpfs, and mount cannot run here ({e})")
        if proc.returncode:
            pytest.skip(f"a real full disk needs a small tmpfs (root): mount says {proc.stderr.strip()!r}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)


def grow(folder: Path, size: int):
    subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True, timeout=30)


def fill(folder: Path, leave: int = 0) -> Path:
    """Fill folder's filesystem with one file, leaving about `leave` bytes (whole pages) free."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while f.write(b"\0" * 4096):
                pass
        except OSError:
            pass
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def leftovers(folder: Path) -> list[str]:
    """Temporary files left behind anywhere below folder."""
    return sorted(str(p) for p in Path(folder).rglob("*") if ".tmp" in p.name or p.name.endswith(".part"))


def tiny_flags(**overrides) -> list[str]:
    return [f"--{k}={v}" for k, v in {**TINY, **overrides}.items()]


# ----------------------------------------------------------------------------- a real full filesystem


def test_training_on_a_full_disk_keeps_its_checkpoint_and_resumes_exactly(small_fs, tmp_path, char_data):
    """The second checkpoint does not fit: one line saying how much to free, the first checkpoint intact, no temp
    file, metrics.jsonl whole; after growing the disk, the resume ends bit-identical to an uninterrupted run."""
    flags = tiny_flags(data_dir=char_data, max_iters=20, checkpoint_interval=10, keep_checkpoints=2)
    ref = run(["train.py", *flags, f"--out_dir={tmp_path / 'ref'}"], timeout=300)
    assert ref.returncode == 0, ref.stderr
    size = (tmp_path / "ref" / "ckpt-0000010.pt").stat().st_size
    disk = small_fs((int(size * 1.6) // 4096 + 4) * 4096)  # room for one checkpoint, the config and the log
    out = disk / "out"
    proc = run(["train.py", *flags, f"--out_dir={out}"], timeout=300)
    assert_one_line_error(proc, "no space left on the device", "is needed", "ckpt.pt (step 10", "is intact")
    assert leftovers(disk) == []
    assert checkpoint.load(out / "ckpt.pt")["step"] == 10
    assert [r["step"] for r in metrics_records(out) if "val_loss" in r] == [0, 10, 20]  # whole lines only
    grow(disk, 8 * size)
    resumed = run(["train.py", *flags, f"--out_dir={out}", "--init_from=resume"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    final, expected = (checkpoint.load(d / "ckpt.pt")["model"] for d in (out, tmp_path / "ref"))
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert metrics_records(out)[-1]["step"] == 20


def test_config_json_on_a_full_disk_is_one_line(small_fs, tmp_path, char_data):
    disk = small_fs(64 * 1024)
    fill(disk)
    proc = run(["train.py", *tiny_flags(data_dir=char_data), f"--out_dir={disk / 'out'}"], timeout=300)
    assert_one_line_error(proc, "no space left on the device writing config.json")
    assert leftovers(disk) == []


def test_metrics_write_on_a_full_disk_is_cut_back(small_fs):
    """A record that half fits is cut back off: the log stays whole lines, and takes the next record once there is
    room. One line says what happened."""
    disk = small_fs(64 * 1024)
    logger = runlog.Logger(str(disk), active=True)
    logger.log({"step": 0, "loss": 1.0})
    filler = fill(disk, leave=4096)
    with pytest.raises(files.WriteError, match="no space left on the device writing metrics.jsonl.*earlier record"):
        logger.log({"step": 1, "sample": "x" * 20_000})  # larger than the room left: a partial write, then ENOSPC
    assert metrics_records(disk) == [{"step": 0, "loss": 1.0}]
    filler.unlink()
    logger.log({"step": 2, "loss": 0.5})
    logger.close()
    assert metrics_records(disk) == [{"step": 0, "loss": 1.0}, {"step": 2, "loss": 0.5}]


@pytest.mark.parametrize("script", ["shakespeare_char", "shakespeare"])
def test_token_files_on_a_full_disk_are_one_line_not_a_sigbus(small_fs, tmp_path, script, request):
    """A memmap over a sparse file died of SIGBUS here, printing nothing; now: one line, nothing left behind."""
    if script == "shakespeare":
        request.getfixturevalue("gpt2_bpe")
    text = tmp_path / "input.txt"
    text.write_text(tiny_text(2000))  # 400 KB of text: 800 KB of char tokens
    disk = small_fs(128 * 1024)
    proc = run([f"data/{script}/prepare.py", "--input", str(text), "--out_dir", str(disk / "data")])
    assert_one_line_error(proc, "no space left on the device writing train.bin", "nothing was kept")
    assert leftovers(disk) == [] and not (disk / "data" / "meta.json").exists()


# ----------------------------------------------------------------------------- ENOSPC at each write site


class FullAfter:
    """A file of a disk with room[0] bytes left: it takes that much, then fails with ENOSPC (after a partial write,
    as a real disk does)."""

    def __init__(self, f, room: list):
        self.f, self.room = f, room

    def write(self, data):
        view = memoryview(data).cast("B") if not isinstance(data, str) else data
        n = min(len(view), self.room[0])
        if n:
            self.f.write(view[:n])
            self.room[0] -= n
        if n < len(view):
            raise no_space()
        return n

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def no_space():
    return OSError(errno.ENOSPC, "No space left on device")


def fail(e: Exception):
    raise e


@pytest.fixture
def disk_full(monkeypatch):
    """disk_full(folder, room): the files opened for writing below folder share `room` bytes, then ENOSPC."""

    def install(folder: Path, room: int = 100):
        real_open, left = builtins.open, [room]

        def full_open(path, mode="r", *args, **kwargs):
            f = real_open(path, mode, *args, **kwargs)
            inside = Path(os.fspath(path)).resolve().is_relative_to(Path(folder).resolve())
            return FullAfter(f, left) if inside and any(c in mode for c in "wax+") else f

        monkeypatch.setattr(builtins, "open", full_open)

    return install


def saved_state(step: int) -> dict:
    return {"step": step, "model": {"w": torch.full((256,), float(step))}, "model_config": {}, "data": {"dataset": "d"}}


def test_checkpoint_save_fails_whole(tmp_path, disk_full):
    """torch.save's RuntimeError (its writer wraps the OSError) and an fsync's ENOSPC: one line each, no temp file,
    ckpt.pt untouched."""
    checkpoint.save_run(saved_state(10), tmp_path, keep=2, is_best=False)
    before = (tmp_path / "ckpt.pt").read_bytes()
    disk_full(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match=r"no space left on the device.*about 1\.0 KiB is needed"):
        checkpoint.save_run(saved_state(20), tmp_path, keep=2, is_best=False)
    assert leftovers(tmp_path) == [] and (tmp_path / "ckpt.pt").read_bytes() == before


def test_checkpoint_fsync_and_link_copy_fail_whole(tmp_path, monkeypatch):
    checkpoint.save_run(saved_state(10), tmp_path, keep=2, is_best=False)
    before = (tmp_path / "ckpt.pt").read_bytes()
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", lambda fd: fail(no_space()))
        with pytest.raises(checkpoint.CheckpointError, match="no space left.*ckpt.pt \\(step 10.*is intact"):
            checkpoint.save_run(saved_state(20), tmp_path, keep=2, is_best=False)
    assert leftovers(tmp_path) == [] and (tmp_path / "ckpt.pt").read_bytes() == before
    with monkeypatch.context() as m:  # a filesystem without hard links: ckpt.pt is a copy, which a full disk cuts
        m.setattr(os, "link", lambda *a: fail(OSError(errno.EPERM, "Operation not permitted")))
        m.setattr(checkpoint.shutil, "copyfile", lambda src, dst: Path(dst).write_bytes(b"x") and fail(no_space()))
        with pytest.raises(checkpoint.CheckpointError, match="could not update .*ckpt.pt"):
            checkpoint.save_run(saved_state(30), tmp_path, keep=2, is_best=False)
    assert leftovers(tmp_path) == [] and (tmp_path / "ckpt.pt").read_bytes() == before


def test_metrics_write_fails_whole(tmp_path, disk_full):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n{"step": 5, "lo')  # a run killed mid-write
    disk_full(tmp_path, room=10)
    logger = runlog.Logger(str(tmp_path), active=True)  # a resume: the partial line is cut before appending
    with pytest.raises(files.WriteError, match="no space left on the device writing metrics.jsonl"):
        logger.log({"step": 10, "loss": 0.5})
    logger.close()
    assert metrics_records(tmp_path) == [{"step": 0, "loss": 1.0}]


def test_a_resume_cuts_a_partial_line_before_appending(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n{"step": 5, "lo')
    logger = runlog.Logger(str(tmp_path), active=True)
    logger.log({"step": 5, "loss": 0.9})
    logger.close()
    assert metrics_records(tmp_path) == [{"step": 0, "loss": 1.0}, {"step": 5, "loss": 0.9}]


def test_the_reader_takes_a_record_glued_to_a_partial_line(tmp_path):
    """Logs that older versions left (a resume appended to a partial line) read again: the glued record is kept."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n{"step": 5, "lo{"step": 5, "loss": 0.9}\n')
    assert runlog.read(str(tmp_path)) == [{"step": 0, "loss": 1.0}, {"step": 5, "loss": 0.9}]


def test_config_json_write_fails_whole(tmp_path, disk_full):
    path = tmp_path / "config.json"
    path.write_text('{"old": 1}')
    disk_full(tmp_path)
    with pytest.raises(files.WriteError, match="no space left on the device writing config.json"):
        console.write_config(path, {"n_layer": 2, "padding": "x" * 1000}, None)
    assert leftovers(tmp_path) == [] and json.loads(path.read_text()) == {"old": 1}


@pytest.mark.parametrize("room", [0, 100, 3000, 3200])
def test_token_files_and_meta_fail_whole(tmp_path, disk_full, room):
    """ENOSPC in train.bin (room 0, 100; it is 3000 bytes), in val.bin (3000) or meta.json (3200): one WriteError,
    no temp file, no meta.json (a folder without meta.json is not a dataset)."""
    disk_full(tmp_path, room)
    meta = {"tokenizer": "char", "vocab_size": 5, "itos": list("abcde")}
    with pytest.raises(files.WriteError, match="no space left on the device writing (train.bin|val.bin|meta.json)"):
        token_files.write_dataset(tmp_path / "d", [1, 2, 3] * 500, [4] * 100, meta)
    assert leftovers(tmp_path) == [] and not (tmp_path / "d" / "meta.json").exists()


def test_a_library_that_names_the_errno_in_its_message(tmp_path):
    """safetensors (the export's weights) raises SafetensorError '... (os error 28)'; a bug stays a bug."""
    full = Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    with pytest.raises(files.WriteError, match="no space left on the device writing the weights"):
        with files.writing(tmp_path / "model.safetensors", "the weights"):
            raise full
    denied = files.failure(Exception("I/O error: Permission denied (os error 13)"), tmp_path / "x", "x")
    assert "permission denied; choose a folder you can write to" in str(denied)
    with pytest.raises(KeyError):
        with files.writing(tmp_path / "x", "x"):
            raise KeyError("a bug")


def test_an_export_on_a_full_disk_is_one_line_and_leaves_nothing(small_fs, tmp_path):
    """scripts.export into a full tmpfs: one line saying what to free, no half-written folder or temp folder."""
    pytest.importorskip("transformers")
    from test_export import char_meta, save_run, small

    meta = char_meta()
    save_run(tmp_path / "run", small(meta["vocab_size"]), meta)
    disk = small_fs(256 * 1024)
    fill(disk, leave=4 * 4096)
    proc = run(["-m", "scripts.export", f"--out_dir={tmp_path / 'run'}", f"--to={disk / 'hf'}"])
    assert_one_line_error(proc, "no space left on the device writing the export", "nothing was written")
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]
