"""The command line's shared vocabulary: each option that several commands take is defined once here.

A command takes one by annotating a parameter with its alias and giving the default there::

    def scan(model: Model = "default", out: Out = "runs/scan", seq_len: SeqLen = 128): ...

A sub-app (``cli_sparsify``, ...) imports from this module, never from ``cli``. List options are
repeated (``--sites a --sites b``); where a comma-separated form existed, ``split_list`` still
accepts it. Deprecated spellings print one ``warning: ...`` line on stderr through ``deprecated``.
"""

from __future__ import annotations

import os
from typing import Annotated, Iterable, List, Optional

import typer

Model = Annotated[str, typer.Option("--model", "-m", help='"default", an HF id, a local dir or a .gguf file')]
Data = Annotated[Optional[str], typer.Option(
    "--data", "-d", help="text/JSONL/Parquet file or hf:NAME; default: Python's manual")]
Out = Annotated[str, typer.Option(
    "--out", "-o", help="where to write (local path or fsspec URL); the command's description says what")]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto (cuda when there is one)")]
SeqLen = Annotated[int, typer.Option("--seq-len", help="tokens per sequence")]
MaxTokens = Annotated[Optional[int], typer.Option("--max-tokens", help="read at most this many tokens of --data")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="sequences per forward pass")]
TextField = Annotated[str, typer.Option("--text-field", help="the text field of JSONL/Parquet rows")]
Prompt = Annotated[str, typer.Option("--prompt", "-p", help="the prompt")]
STORE_HELP = "an activation store folder, from `actscope record`"
StoreDir = Annotated[str, typer.Option("--store", help=STORE_HELP)]
StoreDirs = Annotated[List[str], typer.Option("--store", help=STORE_HELP)]  # commands that take one or two

#: option name -> the shared flags, for tests and for anyone adding a command
SHARED = {"model": ("--model", "-m"), "data": ("--data", "-d"), "out": ("--out", "-o"), "device": ("--device",),
          "seq_len": ("--seq-len",), "max_tokens": ("--max-tokens",), "batch_size": ("--batch-size",),
          "text_field": ("--text-field",), "prompt": ("--prompt", "-p"), "store": ("--store",)}


def device_name(device: str) -> str:
    """``auto`` -> cuda when available, else cpu; under torchrun, ``cuda`` -> this rank's GPU."""
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    local_rank = os.environ.get("LOCAL_RANK")
    if device == "cuda" and local_rank is not None:  # one GPU per torchrun rank
        device = f"cuda:{local_rank}"
    return device


def split_list(values: Optional[Iterable[str]]) -> List[str]:
    """Repeated values, each of which may also be comma-separated (the older spelling): flat, stripped."""
    return [part.strip() for v in values or [] for part in v.split(",") if part.strip()]


def deprecated(old: str, new: str) -> None:
    """One line on stderr; the old spelling still works."""
    typer.echo(f"warning: {old} is deprecated; use {new}", err=True)
