"""Text sources -> packed token sequences.

Sources: a plain-text file, JSONL (one object per line with a text field), Parquet (a text
column), an HF dataset (``hf:NAME[:SPLIT]``, needs the ``datasets`` package and a network), an
in-memory list of strings, or nothing: the default corpus, Python's reference manual
(``pydoc_data.topics``, shipped with CPython, about 113k SmolLM2 tokens).

Documents are tokenized, joined with the end-of-text token and cut into rows of ``seq_len``.
When the tokenizer itself starts every text with BOS (Llama 2/3, Gemma), each packed row starts
with BOS too, as those models expect; models trained without BOS (GPT-2, SmolLM2) get none.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from .errors import DataError

DEFAULT_CORPUS = "pydoc"


@dataclass
class TokenBatches:
    """Packed sequences: ``input_ids[i]`` is row i, ``doc_ids[i, t]`` the document of token t."""

    input_ids: torch.Tensor  # [num_sequences, seq_len], int64
    doc_ids: torch.Tensor  # [num_sequences, seq_len], int32
    source: str

    @property
    def num_sequences(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_tokens(self) -> int:
        return self.num_sequences * self.seq_len

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[torch.Tensor]:
        stop = self.num_sequences if stop is None else stop
        for i in range(start, stop, batch_size):
            yield self.input_ids[i : min(i + batch_size, stop)]


# --- reading sources ------------------------------------------------------------------------


def _read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "convert it with iconv or pass JSONL/Parquet"
        ) from None
    if not text.strip():
        raise DataError(f"{path}: file is empty (no text to tokenize)")
    return text


def _jsonl_texts(path: Path, field: str) -> Iterator[str]:
    text = _read_utf8(path)
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or field not in row:
            raise DataError(f"{path}:{lineno}: no {field!r} field (use --text-field to choose one)")
        if not isinstance(row[field], str):
            raise DataError(f"{path}:{lineno}: field {field!r} is not a string")
        yield row[field]


def _parquet_texts(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=[field])
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: cannot read Parquet column {field!r} ({msg})") from None
    for value in table.column(field).to_pylist():
        if value is not None:
            yield str(value)


def _hf_texts(spec: str, field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec}: HF datasets need the hf extra: pip install 'actscope[hf]'") from None
    name, _, split = spec[3:].partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train", streaming=True)
    except Exception as exc:
        raise DataError(f"{spec}: cannot load HF dataset ({type(exc).__name__})") from None
    for i, row in enumerate(ds):
        if field not in row:
            fields = ", ".join(sorted(row)[:8])
            raise DataError(f"{spec}: row {i} has no {field!r} field (fields: {fields}); choose one with --text-field")
        if not isinstance(row[field], str):
            raise DataError(f"{spec}: row {i}: field {field!r} is not a string; choose another with --text-field")
        yield row[field]


def default_corpus() -> list[str]:
    """The sections of Python's reference manual, in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def read_texts(source: str | Path | Sequence[str] | None = None, text_field: str = "text") -> tuple[list[str] | Iterator[str], str]:
    """Return ``(texts, description)`` for a source; see the module docstring."""
    if source is None or source == DEFAULT_CORPUS:
        return default_corpus(), "pydoc_data.topics"
    if not isinstance(source, (str, Path)):
        texts = [t for t in source if isinstance(t, str)]
        if not texts:
            raise DataError("no texts given")
        return texts, f"{len(texts)} in-memory texts"
    spec = str(source)
    if spec.startswith("hf:"):
        return _hf_texts(spec, text_field), spec
    path = Path(spec).expanduser()
    if path.is_dir():
        raise DataError(f"{spec} is a directory; give a text, JSONL or Parquet file (or hf:NAME)")
    if not path.is_file():
        hint = " (for an HF dataset write hf:NAME)" if "/" in spec and not path.parent.exists() else ""
        raise DataError(f"{spec}: no such file{hint}")
    suffix = path.suffix.lower()
    if suffix in {".jsonl", ".ndjson"}:
        return _jsonl_texts(path, text_field), str(path)
    if suffix == ".parquet":
        return _parquet_texts(path, text_field), str(path)
    return [_read_utf8(path)], str(path)


# --- tokenizing and packing -----------------------------------------------------------------


def _adds_bos(tokenizer: Any) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def pack(
    texts: Iterable[str],
    tokenizer: Any,
    seq_len: int,
    max_tokens: int | None = None,
    source: str = "",
) -> TokenBatches:
    """Tokenize ``texts`` and pack them into rows of ``seq_len`` (the last partial row is dropped)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise DataError(f"--seq-len must be an integer of at least 2, got {seq_len!r}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0):
        raise DataError(f"--max-tokens must be a positive integer, got {max_tokens!r}")
    bos = tokenizer.bos_token_id if _adds_bos(tokenizer) else None
    sep = tokenizer.eos_token_id
    body = seq_len - (1 if bos is not None else 0)
    budget = None if max_tokens is None else (max_tokens // seq_len) * body
    ids: list[int] = []
    docs: list[int] = []
    for doc, text in enumerate(texts):
        if not text:
            continue
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        if sep is not None:
            toks = toks + [sep]
        ids.extend(toks)
        docs.extend([doc] * len(toks))
        if budget is not None and len(ids) >= budget:
            break
    n_rows = len(ids) // body
    if max_tokens is not None:
        n_rows = min(n_rows, max_tokens // seq_len)
    if max_tokens is not None and max_tokens < seq_len:
        raise DataError(f"--max-tokens {max_tokens} is less than one sequence of --seq-len {seq_len} tokens")
    if n_rows == 0:
        raise DataError(
            f"{source or 'data'}: {len(ids)} tokens is less than one sequence of {seq_len}"
            + (f" (--max-tokens {max_tokens})" if max_tokens is not None else "")
        )
    arr = np.asarray(ids[: n_rows * body], dtype=np.int64).reshape(n_rows, body)
    doc_arr = np.asarray(docs[: n_rows * body], dtype=np.int32).reshape(n_rows, body)
    if bos is not None:
        arr = np.concatenate([np.full((n_rows, 1), bos, dtype=np.int64), arr], axis=1)
        doc_arr = np.concatenate([doc_arr[:, :1], doc_arr], axis=1)
    return TokenBatches(torch.from_numpy(arr), torch.from_numpy(doc_arr), source)


def load_tokens(
    source: str | Path | Sequence[str] | None,
    tokenizer: Any,
    seq_len: int,
    max_tokens: int | None = None,
    text_field: str = "text",
) -> TokenBatches:
    """Read a source and pack it: the one call the recorder and the scan use."""
    texts, description = read_texts(source, text_field)
    return pack(texts, tokenizer, seq_len, max_tokens, description)
