"""Calibration samples: N windows of L token ids from a text file or a token file.

A text file (UTF-8) is tokenized with the source checkpoint's own tokenizer; a token file is a
NumPy `.npy` array of integer ids, 1-D (one stream) or 2-D (rows used as given, as many as
needed; each row at least L long), for checkpoints without a tokenizer or data already tokenized.
A stream is cut into consecutive, disjoint windows; when the tokenizer has a BOS token, every
window starts with it followed by L − 1 text tokens, as a document start would. A stream too short
for N windows gives as many as it holds (the report's notes say so); one with less than one
window is refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compressor.errors import ConfigError, InputError

__all__ = ["Samples", "file_digest", "load_samples"]


@dataclass(frozen=True)
class Samples:
    tokens: np.ndarray  # (n, seq_len) int64
    note: str | None = None  # fewer windows than asked for


def file_digest(path: str | Path) -> str:
    """sha256 of the calibration file: part of the run key, so other data never resumes."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise ConfigError(
            f"cannot read the calibration file: {e.strerror or e}",
            path=str(path),
            hint="give --calibration a readable text file or a .npy file of token ids",
        ) from None
    return h.hexdigest()


def load_samples(path: str | Path, source: str | Path, samples: int, seq_len: int) -> Samples:
    """`samples` windows of `seq_len` tokens (fewer if the data is short, never zero)."""
    path = Path(path)
    if path.suffix == ".npy":
        ids = _token_file(path)
        if ids.ndim == 2:
            return _rows(ids, path, samples, seq_len)
        return _windows(ids, None, path, samples, seq_len)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"cannot read the calibration text: {getattr(e, 'strerror', None) or e}",
            path=str(path),
            hint="give a UTF-8 text file, or a .npy file of token ids",
        ) from None
    tokenizer = _tokenizer(source)
    stream = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    return _windows(stream, tokenizer.bos_token_id, path, samples, seq_len)


def _tokenizer(source: str | Path):  # type: ignore[no-untyped-def]
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError(
            "calibration needs transformers", hint="pip install 'checkpoint-compressor[eval]'"
        ) from None
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as e:
        raise InputError(
            f"the source has no tokenizer to read the calibration text with ({type(e).__name__})",
            path=str(source),
            hint="give --calibration a .npy file of token ids instead of text",
        ) from None


def _token_file(path: Path) -> np.ndarray:
    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"not a NumPy token file: {e}",
            path=str(path),
            hint="save the ids with numpy.save (an integer array, 1-D or 2-D)",
        ) from None
    if ids.dtype.kind not in "iu" or ids.ndim not in (1, 2) or ids.size == 0:
        raise ConfigError(
            f"a token file holds a non-empty 1-D or 2-D integer array, not {ids.dtype} {ids.shape}",
            path=str(path),
            hint="save the token ids with numpy.save",
        )
    if int(ids.min()) < 0:
        raise ConfigError("token ids must be non-negative", path=str(path))
    return ids.astype(np.int64)


def _rows(ids: np.ndarray, path: Path, samples: int, seq_len: int) -> Samples:
    if ids.shape[1] < seq_len:
        raise ConfigError(
            f"the token file's rows hold {ids.shape[1]} tokens, fewer than the sequence length "
            f"{seq_len}",
            path=str(path),
            hint=f"use --calibration-seq-len {ids.shape[1]} or longer rows",
        )
    n = min(samples, ids.shape[0])
    note = _short_note(path, n, samples)
    return Samples(np.ascontiguousarray(ids[:n, :seq_len]), note)


def _windows(
    stream: np.ndarray, bos: int | None, path: Path, samples: int, seq_len: int
) -> Samples:
    body = seq_len - 1 if bos is not None else seq_len
    n = min(samples, len(stream) // body) if body > 0 else 0
    if n == 0:
        raise ConfigError(
            f"the calibration data holds {len(stream)} tokens, less than one window of {seq_len}",
            path=str(path),
            hint="give more text, or a smaller --calibration-seq-len",
        )
    windows = stream[: n * body].reshape(n, body)
    if bos is not None:
        windows = np.concatenate([np.full((n, 1), bos, dtype=np.int64), windows], axis=1)
    return Samples(np.ascontiguousarray(windows), _short_note(path, n, samples))


def _short_note(path: Path, n: int, samples: int) -> str | None:
    if n >= samples:
        return None
    return (
        f"calibration: {path.name} holds {n} window(s), not the {samples} asked for; "
        "calibrated with those"
    )
