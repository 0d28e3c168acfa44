"""The prepare scripts stream their input: the same token files as before (byte for byte), memory bounded by a
chunk whatever the input's size, no torch; and bench.py's --prepare, which compares them with nanoGPT's."""

import hashlib
import importlib.util
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run, tiny_text

from data import encode
from gpt_residual import config
from scripts import bench_prepare

PIECES = ["First", "Citizen", ":", " ", "  ", "\n", "\n\n", "\r\n", "\r", "\t", " \n", "\n ", "\u3000", "\xa0",
          "'s", "'ll", " 's", "don't", "42", " 1999", "—", "日本語", "✓", "🙂", "Ünïcödé", "  \t\n", "x",
          "."]  # fmt: skip


def golden_text(seed: int = 0, n: int = 3000) -> str:
    """Shakespeare-like text, then pieces that stress the tokenizers: CRLF and lone CR, runs of mixed whitespace,
    Unicode spaces, contractions, digits, characters outside the BMP."""
    rng = random.Random(seed)
    return tiny_text(2) + "".join(PIECES[int(rng.random() * len(PIECES))] for _ in range(n)) + "  end \n\n\n"


# sha256 (first 16 hex digits) of train.bin, val.bin, meta.json as the prepare scripts wrote them before they
# streamed (commit 9fae8b1: whole text in memory, Python lists, tiktoken's encode_ordinary on each split)
GOLDEN = {
    "shakespeare_char": ("44b500a88cf31443", "7791429635c19910", "d22de23c1762d8ee"),
    "shakespeare": ("c6c4a1d7701eccf9", "abb5ff55d1e09ae9", "7e996722f989497c"),
    "text char": ("5b4fa17d1cc4ab8e", "12a210f24adf9d90", "fdb3a62c5802e5fb"),
    "text gpt2": ("9babc8f677a6c458", "9cb45d3c59ab1bf2", "cd7a5ef9c0d21d9c"),
}


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"prepare_{name}_stream", ROOT / "data" / name / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def digests(folder: Path) -> tuple:
    files = ("train.bin", "val.bin", "meta.json")
    return tuple(hashlib.sha256((folder / f).read_bytes()).hexdigest()[:16] for f in files)


@pytest.mark.parametrize("chunk", [None, 7])  # 7 characters: every split and carry crosses chunks
def test_the_same_token_files_as_before(tmp_path, monkeypatch, gpt2_bpe, chunk):
    monkeypatch.setattr(encode, "CHUNK", chunk or encode.CHUNK)
    text = tmp_path / "in.txt"
    text.write_bytes(golden_text().encode("utf-8"))  # bytes: the CRs stay in the file, as a user's would
    for name in ("shakespeare_char", "shakespeare"):
        load(name).prepare(out_dir=tmp_path / name, input_path=str(text))
        assert digests(tmp_path / name) == GOLDEN[name], name
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_bytes(golden_text(1, 500).encode())
    (docs / "b.txt").write_bytes(golden_text(2, 700).encode())
    for tokenizer in ("char", "gpt2"):
        load("text").prepare(str(docs), tokenizer=tokenizer, out_dir=str(tmp_path / tokenizer))
        assert digests(tmp_path / tokenizer) == GOLDEN[f"text {tokenizer}"], tokenizer


def test_bpe_in_chunks_equals_tiktoken_whole(gpt2_bpe):
    """Random texts over the characters where the GPT-2 pattern's lookahead and whitespace rules matter (Unicode
    spaces that Python's isspace disagrees on, contractions, the literal end-of-text), cut into chunks of 1-12
    characters: the ids equal tiktoken's encode_ordinary of the whole text."""
    alphabet = [" ", "  ", "\n", "\t", "\r", "\x0b", "\x0c", "\x1c", "\x85", "\xa0", "\u1680", "\u2000", "\u200a",
                "\u200b", "\u2028", "\u202f", "\u3000", "\u180e", "a", "Z", "é", "日", "1", "٣", "'", "'s", "'ll",
                "'re", "'ve", "'m", "'d", "'t", "'x", "!", ".", "—", "🙂", "\u0301", "<|endoftext|>", "_"]  # fmt: skip
    bpe, rng = encode.BPEEncoder(), random.Random(0)
    for _ in range(1500):
        text = "".join(alphabet[int(rng.random() * len(alphabet))] for _ in range(rng.randint(0, 60)))
        size = rng.randint(1, 12)
        ids = [*bpe.encode(text[i : i + size] for i in range(0, len(text), size))]
        got = np.concatenate([np.zeros(0, np.uint16), *ids]).tolist()
        assert got == gpt2_bpe.encode_ordinary(text), (text, size)


@pytest.mark.parametrize("text", [golden_text(3, 800), tiny_text(3), tiny_text(3) + "é"], ids=["utf8", "ascii", "both"])
def test_char_vocabulary_and_ids_in_chunks(text):
    """Chunks of ASCII (a byte translation), of other text (a table lookup), and both in one text."""
    chunks = [text[i : i + 5] for i in range(0, len(text), 5)]
    itos, n = encode.vocabulary(chunks)
    assert itos == sorted(set(text)) and n == len(text)
    ids = np.concatenate(list(encode.CharEncoder(itos, "uint16").encode(chunks)))
    assert ids.dtype == np.uint16 and ids.tolist() == [itos.index(c) for c in text]


def peak_mib(script: str, text: Path, out: Path, chunk: int) -> float:
    """The peak resident MiB of data/<script>/prepare.py, run with chunks of `chunk` characters."""
    code = "import runpy, sys; from data import encode; encode.CHUNK = int(sys.argv.pop(2)); sys.argv.pop(0); " \
           "runpy.run_path(sys.argv[0], run_name='__main__')"  # fmt: skip
    args = ["--input", str(text), "--out_dir", str(out)]
    return bench_prepare.run([sys.executable, "-c", code, f"data/{script}/prepare.py", str(chunk), *args], ROOT)[1]


@pytest.mark.parametrize("script", ["shakespeare_char", "shakespeare"])
def test_memory_does_not_grow_with_the_input(tmp_path, script, request):
    """Peak resident memory of a prepare of 1 MB and of 8 MB (in chunks of 256K characters): the same to a few MB.
    Before, a prepare held about 20 times its input (the text, a Python list of every id, copies of it)."""
    if script == "shakespeare":
        request.getfixturevalue("gpt2_bpe")
    unit = tiny_text(4000)
    peaks = []
    for mb in (1, 8):
        text = tmp_path / f"{mb}.txt"
        text.write_text(unit * round(mb * 1e6 / len(unit)))
        peaks.append(peak_mib(script, text, tmp_path / f"out{mb}", chunk=1 << 18))
    assert peaks[1] - peaks[0] < 8, peaks  # 7 MB more input: ~140 MB more memory before


def test_prepare_scripts_import_no_torch(tmp_path):
    """torch was imported (1.4-2.3 s, ~200 MB) through gpt_residual.dataset without being used."""
    text = tmp_path / "in.txt"
    text.write_text(tiny_text())
    code = (
        "import runpy, sys; sys.argv = [sys.argv[1], '--input', sys.argv[2], '--out_dir', sys.argv[3]]; "
        "runpy.run_path(sys.argv[0], run_name='__main__'); print('torch imported:', 'torch' in sys.modules)"
    )
    for script in ("data/shakespeare_char/prepare.py", "data/text/prepare.py"):
        proc = subprocess.run([sys.executable, "-c", code, script, str(text), str(tmp_path / "out")], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert "torch imported: False" in proc.stdout, script


def test_bench_prepare_side_by_side(tmp_path):
    """bench.py --prepare against the nanoGPT copy in ../shared (its char script only: the BPE side says so)."""
    nanogpt = ROOT.parent / "shared" / "reference" / "nanoGPT"
    if not (nanogpt / "data" / "shakespeare_char" / "prepare.py").is_file():
        pytest.skip(f"needs nanoGPT's char prepare at {nanogpt} (../shared)")
    copy = tmp_path / "nanoGPT"
    (copy / "data" / "shakespeare_char").mkdir(parents=True)
    (copy / "data/shakespeare_char/prepare.py").write_text((nanogpt / "data/shakespeare_char/prepare.py").read_text())
    text = tmp_path / "in.txt"
    text.write_text(tiny_text(400))
    proc = run(["-m", "scripts.bench", "--prepare", f"--nanogpt={copy}", f"--input={text}", "--repeats=1",
                "--tokenizers=char", f"--json={tmp_path / 'b.json'}"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for row in ("char: wall s", "char: peak MiB"):
        cells = next(line for line in lines if line.startswith(row))[len(row) :].split()
        assert len(cells) == 3 and all(float(c) > 0 for c in cells), cells
    assert any(line.startswith("char: same train.bin, val.bin") and "yes" in line for line in lines)
    assert sorted(p.name for p in copy.rglob("*")) == ["data", "prepare.py", "shakespeare_char"]  # never written to
    with pytest.raises(config.ConfigError, match="no /nonexistent/data/shakespeare_char/prepare.py"):
        bench_prepare.PrepareBenchOptions(nanogpt="/nonexistent")
