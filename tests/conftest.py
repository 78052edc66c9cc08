"""Shared fixtures: tiny models with a tiny tokenizer, and the default model (integration)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import VOCAB, tiny_model  # noqa: E402


def run_cli(argv, capsys, monkeypatch):
    """Run ``actscope ARGV`` in-process as the console script would: ``(exit code, stdout, stderr)``."""
    from actscope.cli import main

    monkeypatch.setattr(sys, "argv", ["actscope", *argv])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def require_peer(module: str):
    """Import a peer package that a parity test checks against; its absence fails, never skips.

    `make test` installs every peer from requirements/lock.txt, so a missing one is a broken
    environment, and a skipped parity test would let a claim in the README go unchecked.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(f"peer package {module!r} is missing ({exc}): run the suite through `make test`, "
                    "which installs it from requirements/lock.txt", pytrace=False)


def build_tokenizer():
    """A 256-token BPE trained on a slice of Python's manual: offline and deterministic."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    from actscope.data import default_corpus

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(default_corpus()[:40], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny random llama saved as an HF directory, with its tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama", max_position_embeddings=256)
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir):
    from actscope import load_model

    return load_model(str(tiny_llama_dir))


@pytest.fixture(scope="session")
def default_model():
    from actscope import load_model

    return load_model("default")


@pytest.fixture
def ids():
    torch.manual_seed(0)
    return torch.randint(3, VOCAB, (2, 9))


_TOKENIZER_SETTINGS = ("padding_side", "truncation_side", "pad_token", "bos_token", "eos_token", "model_max_length")


def _settings(tokenizer: Any) -> dict[str, Any]:
    return {name: getattr(tokenizer, name, None) for name in _TOKENIZER_SETTINGS}


@pytest.fixture(autouse=True)
def _shared_tokenizers_unchanged(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that changes a session-scoped tokenizer's settings (e.g. ``padding_side``).

    The tokenizers are shared by every test of the session, so such a change would silently alter
    what later tests run and make results depend on test order. Only tokenizers the test already
    requests are checked: this guard never loads a model by itself."""
    shared = []
    if "tiny_tokenizer" in request.fixturenames:
        shared.append(("tiny_tokenizer", request.getfixturevalue("tiny_tokenizer")))
    for name in ("tiny_llama", "default_model"):
        if name in request.fixturenames:
            shared.append((name, request.getfixturevalue(name)[1]))
    before = [_settings(tok) for _, tok in shared]
    yield
    for (name, tok), was in zip(shared, before):
        now = _settings(tok)
        if now != was:
            changed = {k: (was[k], now[k]) for k in was if was[k] != now[k]}
            pytest.fail(f"the test changed the shared {name} tokenizer (was, now): {changed}", pytrace=False)
