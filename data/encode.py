"""Text files in bounded chunks, and their token ids chunk by chunk: what the prepare scripts encode with. Memory is
a few chunks whatever the size of the input, and the ids equal those of encoding each text whole (tested).

char   A char vocabulary is the sorted set of the text's characters, so it is known only after one reading of the
       text (vocabulary(): a numpy histogram of code points per chunk); the ids are then one table lookup per chunk.
gpt2   tiktoken's GPT-2 BPE. Its pre-tokenizing pattern ends in `\\s+(?!\\S)|\\s`: a run of whitespace before a
       word gives up its last character to the word (" word"). That lookahead sends tiktoken to a backtracking
       regex engine, about half of its time. BPE cuts the text before the last character of each run of 2+
       whitespace characters followed by a non-space (where that pattern splits anyway) and encodes the pieces
       with the same pattern minus the lookahead, which the regex crate runs as an automaton: the same ids (the
       pieces are split identically), about 2x faster on one thread. A chunk is cut where a non-space meets a
       space (a split point of the pattern too); the rest is carried into the next chunk.
"""

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from gpt_residual.tokens import DataError, gpt2_encoding

CHUNK = 1 << 22  # characters per read: 4-16 MB of text
# Unicode White_Space: what the regex crate's \s matches (Python's str.isspace differs, e.g. on U+001C-U+001F)
WHITESPACE = [*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F,
              0x205F, 0x3000]  # fmt: skip
IS_SPACE = np.zeros(WHITESPACE[-1] + 1, dtype=bool)
IS_SPACE[WHITESPACE] = True
ASCII_SPACE = bytes(IS_SPACE[:256])  # for bytes.translate: 1 for a space, else 0
GPT2_NO_LOOKAHEAD = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+"""


def read_chunks(path: Path, size: int | None = None) -> Iterator[str]:
    """path's text, `size` (default CHUNK) characters at a time, read as open() reads it (UTF-8, universal
    newlines)."""
    try:
        with open(path, encoding="utf-8") as f:
            while chunk := f.read(size or CHUNK):
                yield chunk
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read '{path}' as UTF-8 text: {e}") from None


def code_points(text: str) -> np.ndarray:
    """The characters of text as numbers: uint8 for ASCII (one byte each, no decoding), else uint32."""
    if text.isascii():
        return np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def is_space(text: str) -> np.ndarray:
    """Which characters of text are whitespace (Unicode White_Space), as a bool array."""
    if text.isascii():  # a byte translation: several times faster than indexing a table with an array
        return np.frombuffer(text.encode("ascii").translate(ASCII_SPACE), dtype=bool)
    points = code_points(text)
    return IS_SPACE[np.minimum(points, len(IS_SPACE) - 1)] & (points < len(IS_SPACE))


# ----------------------------------------------------------------------------- char


def vocabulary(chunks: Iterable[str]) -> tuple[list[str], int]:
    """(the sorted characters, how many characters) of the concatenated chunks."""
    seen = np.zeros(0x110000, dtype=bool)
    ascii_seen, n = b"", 0
    for chunk in chunks:
        n += len(chunk)
        if chunk.isascii():  # bytes.translate deletes the characters seen so far: what is left is new
            rest = chunk.encode("ascii").translate(None, ascii_seen)
            while rest:
                ascii_seen += rest[:1]
                rest = rest.translate(None, rest[:1])
        else:
            counts = np.bincount(code_points(chunk))
            seen[: len(counts)] |= counts > 0
    seen[list(ascii_seen)] = True
    return [chr(c) for c in np.flatnonzero(seen)], n


class CharEncoder:
    """One id per character: its place in itos (itos sorted, as vocabulary() returns it)."""

    def __init__(self, itos: list[str], dtype: str):
        self.table = np.zeros(ord(itos[-1]) + 1 if itos else 1, dtype=dtype)
        self.table[[ord(c) for c in itos]] = np.arange(len(itos))
        small = len(self.table) <= 256 and len(itos) <= 256  # ASCII text and ids below 256: a byte translation
        self.ascii = bytes(self.table.astype(np.uint8)) + bytes(256 - len(self.table)) if small else None

    def encode(self, chunks: Iterable[str]) -> Iterator[np.ndarray]:
        for chunk in chunks:
            if self.ascii is not None and chunk.isascii():
                ids = np.frombuffer(chunk.encode("ascii").translate(self.ascii), dtype=np.uint8)
                yield ids.astype(self.table.dtype)
            else:
                yield self.table[code_points(chunk)]


# ----------------------------------------------------------------------------- GPT-2 BPE


class BPEEncoder:
    """tiktoken's GPT-2 BPE (encode_ordinary: special tokens are plain text), chunk by chunk, as uint16 ids."""

    def __init__(self):
        self.core = gpt2_encoding(GPT2_NO_LOOKAHEAD)._core_bpe

    def encode(self, chunks: Iterable[str]) -> Iterator[np.ndarray]:
        """The ids of the concatenated chunks, equal to encode_ordinary of the whole text."""
        carry = ""
        for chunk in chunks:
            text = carry + chunk
            space = is_space(text)
            starts = np.flatnonzero(space[1:] & ~space[:-1])  # a non-space then a space: a split of the pattern
            if not len(starts):  # no such place yet: read on
                carry = text
                continue
            cut = int(starts[-1]) + 1
            yield self.encode_cut(text[:cut], space[:cut])
            carry = text[cut:]
        if carry:
            yield self.encode_cut(carry, is_space(carry))

    def encode_cut(self, text: str, space: np.ndarray) -> np.ndarray:
        """text cut before the last character of every run of 2+ spaces followed by a non-space, each piece
        encoded with the pattern minus its lookahead."""
        cuts = (np.flatnonzero(space[:-2] & space[1:-1] & ~space[2:]) + 1).tolist()
        bounds = [0, *cuts, len(text)]
        pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
        if not hasattr(self.core, "encode_to_tiktoken_buffer"):  # tiktoken < 0.8: lists of ids
            return np.array([i for piece in pieces for i in self.core.encode_ordinary(piece)], dtype=np.uint16)
        encode, plain_text = self.core.encode_to_tiktoken_buffer, set()  # no special tokens: encode_ordinary's ids
        parts = [encode(piece, plain_text) for piece in pieces]
        return np.frombuffer(b"".join(parts), dtype=np.uint32).astype(np.uint16)
