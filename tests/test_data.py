"""Text sources, packing and their errors."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actscope import DataError, load_tokens
from actscope.data import default_corpus, pack, read_texts


def test_default_corpus_is_pythons_manual(tiny_tokenizer):
    texts = default_corpus()
    assert len(texts) > 50 and any("assert" in t for t in texts)
    toks = load_tokens(None, tiny_tokenizer, seq_len=64, max_tokens=640)
    assert toks.input_ids.shape == (10, 64) and toks.source == "pydoc_data.topics"


def test_packing_adds_bos_only_when_the_tokenizer_does(tiny_tokenizer):
    texts = ["alpha beta gamma " * 20, "delta epsilon " * 20]
    plain = pack(texts, tiny_tokenizer, seq_len=16)
    assert (plain.input_ids[:, 0] != tiny_tokenizer.bos_token_id).any()
    # documents are separated by EOS and tracked in doc_ids
    flat, docs = plain.input_ids.reshape(-1), plain.doc_ids.reshape(-1)
    eos_at = (flat == tiny_tokenizer.eos_token_id).nonzero()[0].item()
    assert docs[eos_at] == 0 and docs[eos_at + 1] == 1

    class WithBos:
        bos_token_id, eos_token_id = tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id

        def __call__(self, text, add_special_tokens=True):
            ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
            return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

    bos = pack(texts, WithBos(), seq_len=16)
    assert (bos.input_ids[:, 0] == tiny_tokenizer.bos_token_id).all()


def test_max_tokens_is_respected(tiny_tokenizer):
    toks = load_tokens(None, tiny_tokenizer, seq_len=32, max_tokens=100)
    assert toks.num_tokens == 96


def test_jsonl_and_parquet_sources(tmp_path, tiny_tokenizer):
    rows = [{"text": f"row {i} " + "words " * 30, "id": i} for i in range(5)]
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pq_path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": [r["text"] for r in rows]}), pq_path)
    a = load_tokens(str(jl), tiny_tokenizer, seq_len=16)
    b = load_tokens(str(pq_path), tiny_tokenizer, seq_len=16, text_field="body")
    assert a.input_ids.equal(b.input_ids)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "file is empty"),
        (b"   \n", "file is empty"),
        (b"caf\xe9 au lait", r"not UTF-8 text \(byte 0xe9 at offset 3\)"),
    ],
)
def test_bad_text_files(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        read_texts(str(path))
    assert str(path) in str(err.value)


def test_bad_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"txt": "no field"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: no 'text' field"):
        list(read_texts(str(path))[0])
    path.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        list(read_texts(str(path))[0])


def test_missing_file_and_too_little_text(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match="no such file"):
        read_texts(str(tmp_path / "nope.txt"))
    short = tmp_path / "short.txt"
    short.write_text("hi")
    with pytest.raises(DataError, match="less than one sequence"):
        load_tokens(str(short), tiny_tokenizer, seq_len=64)
