"""Sparse models downstream: multiple-choice accuracy, and greedy decoding over a static KV cache
(one CUDA graph per step on a GPU) against HF's generate."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import random_tokens, tiny_model

from actscope.sparsify import SparsityConfig, apply, calibrate

_tokens = random_tokens


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", intermediate_size=192)


# --- multiple-choice accuracy -------------------------------------------------------------------
def _independent_accuracy(model, items) -> float:
    """Each choice scored by one full forward of context + choice: no cache, no batching."""
    right = 0
    with torch.no_grad():
        for it in items:
            scores = []
            for c in it.choices:
                seq = torch.cat([it.context, c])[None]
                logp = torch.log_softmax(model(input_ids=seq).logits[0].double(), -1)
                pos = torch.arange(it.context.numel() - 1, seq.shape[1] - 1)
                scores.append(float(logp[pos, seq[0, pos + 1]].mean()))
            right += int(max(range(len(scores)), key=scores.__getitem__) == it.answer)
    return right / len(items)


def test_continuation_items_hold_the_true_continuation():
    from actscope.sparsify import continuation_items

    toks = _tokens(6, seq_len=40, seed=5)
    items = continuation_items(toks, n=10, n_choices=3, context=12, length=5)
    assert len(items) == 10 and {len(i.choices) for i in items} == {3}
    for it in items:
        row = next(r for r in range(6) if torch.equal(toks.input_ids[r, : it.context.numel()], it.context)
                   or any(torch.equal(toks.input_ids[r, s: s + 12], it.context) for s in range(0, 29)))
        text = toks.input_ids[row].tolist()
        ctx = it.context.tolist()
        start = next(s for s in range(29) if text[s: s + 12] == ctx)
        assert it.choices[it.answer].tolist() == text[start + 12: start + 17]
    assert len({i.answer for i in items}) > 1  # the right answer is not always in the same place


def test_choice_accuracy_equals_independent_scoring(llama, tiny_tokenizer, tmp_path):
    from actscope.sparsify import choice_accuracy, continuation_items, load_choice_file

    items = continuation_items(_tokens(8, seq_len=48, seed=6), n=12, context=10, length=6)
    assert choice_accuracy(llama, items) == _independent_accuracy(llama, items)
    path = tmp_path / "mc.jsonl"
    rows = [{"context": "The function returns", "choices": ["a list of values", "None", "the keyword argument list"],
             "answer": 0},
            {"context": "An exception is", "choices": ["raised", "a statement that is executed"], "answer": 1}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    file_items = load_choice_file(path, tiny_tokenizer)
    assert [len(i.choices) for i in file_items] == [3, 2]
    assert choice_accuracy(llama, file_items) == _independent_accuracy(llama, file_items)
    # under sparsity, the same independent scoring inside the same config agrees too
    config = calibrate(llama, method="teal", sparsity=0.5, tokens=_tokens(8), progress=False)
    with torch.inference_mode(), apply(llama, config):
        want = _independent_accuracy(llama, items)
    assert choice_accuracy(llama, items, config) == want


def test_bad_choice_file_names_file_and_line(tiny_tokenizer, tmp_path):
    from actscope.errors import SparsifyError
    from actscope.sparsify import load_choice_file

    path = tmp_path / "bad.jsonl"
    path.write_text('{"context": "a", "choices": ["b", "c"], "answer": 0}\n{"context": "a", "choices": ["b"]}\n')
    with pytest.raises(SparsifyError, match=r"bad\.jsonl, line 2"):
        load_choice_file(path, tiny_tokenizer)
    path.write_text('{"context": "a", "choices": ["b", "c"], "answer": 5}\n')
    with pytest.raises(SparsifyError, match="line 1: need at least 2 choices"):
        load_choice_file(path, tiny_tokenizer)
    with pytest.raises(SparsifyError, match="does not exist"):
        load_choice_file(tmp_path / "missing.jsonl", tiny_tokenizer)


def test_evaluate_reports_accuracy_per_point(llama, tiny_tokenizer):
    from actscope.sparsify import evaluate

    text = " ".join(f"word{i % 17} item{i % 5}" for i in range(3000))
    ev = evaluate(llama, tiny_tokenizer, [text], methods=["teal"], sparsities=[0.5], calib_tokens=256,
                  eval_tokens=512, seq_len=64, choices=8, progress=False)
    assert 0.0 <= ev.meta["dense_accuracy"] <= 1.0 and ev.meta["choice_items"] == 8
    assert 0.0 <= ev.curves["teal"][0]["accuracy"] <= 1.0
    assert "accuracy" in ev.to_dict()["curves"]["teal"][0]


# --- static-cache decoding (CUDA graphs on a GPU) -------------------------------------------------
def test_greedy_decode_reproduces_hf_generate(llama):
    from actscope.sparsify.decode import StaticDecoder, greedy_decode

    prompt = _tokens(2, seq_len=7, seed=8).input_ids
    want = llama.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=9, min_new_tokens=9,
                          do_sample=False, pad_token_id=0)
    assert torch.equal(greedy_decode(llama, prompt, 9), want)
    config = calibrate(llama, method="wina", sparsity=0.5, tokens=_tokens(8), progress=False)
    with torch.inference_mode(), apply(llama, config):
        want_sparse = llama.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=9,
                                     min_new_tokens=9, do_sample=False, pad_token_id=0)
        dec = StaticDecoder(llama, batch=2, max_len=20)
        assert torch.equal(dec.generate(prompt, 9), want_sparse)
        assert torch.equal(dec.generate(prompt, 9), want_sparse)  # reusable: the cache is reset
    assert not torch.equal(want, want_sparse)


def test_greedy_decode_rejects_bad_shapes(llama):
    from actscope.errors import SparsifyError
    from actscope.sparsify.decode import StaticDecoder

    dec = StaticDecoder(llama, batch=1, max_len=10)
    with pytest.raises(SparsifyError, match="exceeds the cache length 10"):
        dec.generate(torch.zeros(1, 6, dtype=torch.long), 5)
    with pytest.raises(SparsifyError, match=r"shape \[1, length\]"):
        dec.generate(torch.zeros(2, 3, dtype=torch.long), 2)
    with pytest.raises(SparsifyError, match="needs the model on a CUDA device"):
        StaticDecoder(llama, batch=1, max_len=10, cuda_graph=True)
    with pytest.raises(SparsifyError, match="cpp_wrapper=True is an option of compile=True"):
        StaticDecoder(llama, batch=1, max_len=10, cpp_wrapper=True)


@pytest.mark.parametrize("cpp_wrapper", [False, True])
def test_compiled_decode_matches_the_uncompiled_loop_in_one_graph(llama, cpp_wrapper):
    """``compile=True``: same tokens, dense and sparse; the sparse kernel sits inside the graph
    (with ``cpp_wrapper``, called from C++ through the operator's C++ implementation)."""
    from torch._dynamo.utils import counters

    from actscope.sparsify.decode import greedy_decode

    prompt = _tokens(1, seq_len=6, seed=10).input_ids
    config = calibrate(llama, method="teal", sparsity=0.5, tokens=_tokens(8), progress=False)
    torch._dynamo.reset()
    counters.clear()
    for cfg in (None, config):
        with torch.inference_mode(), apply(llama, cfg or SparsityConfig("teal", 0.0)) as handle:
            plain = greedy_decode(llama, prompt, 8)
            handle.reset()
            compiled = greedy_decode(llama, prompt, 8, compile=True, cpp_wrapper=cpp_wrapper)
            assert torch.equal(plain, compiled)
            if cfg is not None:  # the compiled steps counted kept inputs too, through the op
                assert 0.4 < handle.achieved()["overall"] < 0.6
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()


@pytest.mark.parametrize("variant", ["default", "one-launch+mask+gemv"])
@pytest.mark.filterwarnings("error:.*the Triton.*failed:RuntimeWarning")  # no silent fall-back to dense
def test_cuda_graph_decode_matches_eager_decode(llama, variant, monkeypatch):
    """On a GPU: replayed CUDA graphs give the eager loop's tokens, dense and sparse; also with the
    Triton variants that are off by default (one launch, whose workspace and semaphores a graph
    captures; the one-kernel mask, used here by the prompt as every weight counts as big; the
    one-row kernel with prefetch and a 2-D accumulator)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here")
    from actscope.sparsify import swap
    from actscope.sparsify import triton_kernel as tk
    from actscope.sparsify.decode import greedy_decode

    if variant != "default":
        monkeypatch.setattr(tk, "ONE_LAUNCH", True)
        monkeypatch.setattr(tk, "FUSED_MASK", True)
        for key, value in dict(KERNEL="gemv", PREFETCH=True, ACC2D=True).items():
            monkeypatch.setitem(tk.GEMV, key, value)
        monkeypatch.setattr(swap, "GPU_KERNEL_MIN_BYTES", 0)  # one row: the kernel; more: the masked path

    model = llama.to("cuda")
    try:
        prompt = _tokens(1, seq_len=6, seed=9).input_ids.cuda()
        config = calibrate(model, method="teal", sparsity=0.5, tokens=_tokens(8), progress=False)
        for cfg in (None, config):
            with torch.inference_mode(), apply(model, cfg or SparsityConfig("teal", 0.0)):
                eager = greedy_decode(model, prompt, 12, cuda_graph=False)
                graph = greedy_decode(model, prompt, 12, cuda_graph=True)
            assert torch.equal(eager, graph)
    finally:
        model.to("cpu")


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox",
                                    "olmo", "olmo2"])
def test_greedy_decode_reproduces_hf_generate_across_families(family):
    from actscope.sparsify.decode import greedy_decode

    model = tiny_model(family)
    prompt = torch.randint(3, 200, (2, 6), generator=torch.Generator().manual_seed(1))
    want = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=7, min_new_tokens=7,
                          do_sample=False, pad_token_id=0)
    assert torch.equal(greedy_decode(model, prompt, 7), want)
