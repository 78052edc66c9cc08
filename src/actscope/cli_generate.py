"""``actscope generate``: greedy generation, optionally steered (a vector or one SAE latent) and/or sparse.

Kept out of ``cli`` because its options (steering, sparsity, static cache, compile) and their
interplay are the largest part of the command line; ``cli`` registers ``generate`` in its place.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .cli_options import Device, Model, Prompt, deprecated, device_name
from .errors import ActscopeError
from .validate import finite, positive_int

COMPILE_MIN_TOKENS = 64  # `generate` compiles the sparse decoding step by default from this many new tokens


def generate(
    prompt: Prompt,
    model: Model = "default",
    steer_path: Annotated[Optional[str], typer.Option("--steer", help="a .gguf or saved steering vector")] = None,
    steer_sae: Annotated[Optional[str], typer.Option(
        "--steer-sae", help="steer along one SAE latent's decoder row (unit norm): an SAE folder on "
        "blocks.L.hook_resid_post, or a semi-NMF folder fitted with --model; pick the latent with --latent")] = None,
    latent: Annotated[Optional[int], typer.Option("--latent", help="the latent of --steer-sae")] = None,
    scale: Annotated[float, typer.Option(
        "--scale", help="multiplies the steering vector (with --kl, only its sign counts)")] = 1.0,
    kl: Annotated[Optional[float], typer.Option(
        "--kl", help="calibrate the scale: the largest one whose mean next-token KL to the unsteered model "
        "on the prompt stays under this many nats (e.g. 0.5)")] = None,
    positions: Annotated[str, typer.Option(
        "--positions", help="where to steer: all, prompt or generated")] = "all",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="tokens to generate")] = 40,
    compare: Annotated[bool, typer.Option(
        "--compare", help="also print the unsteered (or dense) continuation")] = False,
    sparsity_config: Annotated[Optional[str], typer.Option(
        "--sparsity-config", help="decode sparsely: a folder from `actscope sparsify calibrate`")] = None,
    device: Device = "auto",
    static_cache: Annotated[Optional[bool], typer.Option(
        "--static-cache/--no-static-cache",
        help="decode over a static KV cache, one CUDA graph per step on a GPU (default: on for sparse decoding on "
        "CUDA, where HF's generate is launch-bound and would hide the sparse kernel's gain)")] = None,
    compile_step: Annotated[Optional[bool], typer.Option(
        "--compile/--no-compile", help="torch.compile the decoding step (implies --static-cache; compiling takes "
        "about a minute, then decoding is about 1.25x faster on CPU; default: on for sparse decoding of at least "
        f"{COMPILE_MIN_TOKENS} new tokens without steering or CoreInfer, where it lets the sparse kernel's gain show)")] = None,
    old_sparsity: Annotated[Optional[str], typer.Option(
        "--sparsity", hidden=True, help="deprecated: use --sparsity-config DIR")] = None,
) -> None:
    """Greedy generation, optionally steered (--steer, or --steer-sae with --latent) and/or with activation sparsity."""
    import time
    from contextlib import ExitStack

    from .models import load_model
    from .sparsify import SparsityConfig, greedy_decode
    from .sparsify import apply as apply_sparsity
    from .intervene.steer_effects import BRACKET_LIMIT, generate as run_generate

    if old_sparsity is not None:
        sparsity_config = _old_sparsity(old_sparsity, sparsity_config)
    if not prompt:
        raise ActscopeError("--prompt is empty: generation needs text to continue")
    positive_int("--max-new-tokens", max_new_tokens)
    finite("--scale", scale)  # NaN or inf would turn every logit into NaN
    if kl is not None:
        finite("--kl", kl, positive=True)
    vec = _steering(steer_path, steer_sae, latent)  # file and range errors before the model loads
    if kl is not None and vec is None:
        raise ActscopeError("--kl calibrates a steering scale: give --steer or --steer-sae too")
    m, tok = load_model(model, device=device_name(device))
    config = SparsityConfig.from_pretrained(sparsity_config) if sparsity_config else None
    stateful = vec is not None or (config is not None and config.method == "coreinfer")
    if compile_step is None:  # the lean step wherever it is correct and pays for its compile
        compile_step = (config is not None and not stateful and static_cache is not False
                        and max_new_tokens >= COMPILE_MIN_TOKENS)
    if static_cache is None:
        static_cache = compile_step or (config is not None and not stateful and m.device.type == "cuda")
    if compile_step and not static_cache:
        raise ActscopeError("--compile compiles the static-cache decoding step: drop --no-static-cache")
    if static_cache and stateful:
        raise ActscopeError("--static-cache and --compile run one fixed step: they cannot carry steering or "
                            "CoreInfer, whose hooks keep Python state across steps; drop them")
    if kl is not None:
        scale = kl_scale(m, tok, vec, prompt, kl, sign=-1.0 if scale < 0 else 1.0)
        if abs(scale) >= BRACKET_LIMIT:
            typer.echo(f"warning: --kl {kl:g}: the KL stays under the bound up to scale {BRACKET_LIMIT:g}, the "
                       "largest tried; steering with that", err=True)

    def run() -> str:
        if not static_cache:
            return run_generate(m, tok, prompt, max_new_tokens)
        ids = tok(prompt, return_tensors="pt").input_ids.to(m.device)
        out = greedy_decode(m, ids, max_new_tokens, compile=compile_step)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    if compare and (vec is not None or config is not None):
        typer.echo(f"[plain] {prompt}{run()}")
    with ExitStack() as stack:
        if vec is not None:
            stack.enter_context(vec.apply(m, scale, positions=positions))
        handle = stack.enter_context(apply_sparsity(m, config)) if config is not None else None
        start = time.perf_counter()
        text = run()
        seconds = time.perf_counter() - start
    label = ""
    if vec is not None:
        what = f"latent {vec.meta['latent']} " if vec.method == "sae_latent" else ""
        label = f"[steered {what}x{scale:.4g}{f', KL {kl:g}' if kl is not None else ''}] "
    typer.echo(f"{label}{prompt}{text}")
    if handle is not None:
        got = handle.achieved()
        typer.echo(f"[{got['targeted']:.0%} {handle.config.method}: achieved {got['overall']:.1%} sparsity, "
                   f"{max_new_tokens / seconds:.1f} tok/s{', compiling included' if compile_step else ''}]", err=True)


def _steering(steer_path: Optional[str], steer_sae: Optional[str], latent: Optional[int]) -> Any:
    """The steering vector of ``--steer`` or of ``--steer-sae``/``--latent``, or None; bad combinations
    fail here, before the model loads."""
    from .intervene.steer import SteeringVector

    if steer_path is not None and steer_sae is not None:
        raise ActscopeError("--steer and --steer-sae both given: steer with one vector at a time")
    if latent is not None and steer_sae is None:
        raise ActscopeError("--latent picks a latent of --steer-sae DIR: give the SAE folder too")
    if steer_path is not None:
        return SteeringVector.from_pretrained(steer_path)
    if steer_sae is None:
        return None
    if latent is None:
        raise ActscopeError("--steer-sae needs --latent N: which latent to steer with")
    from .cli_sae import load_latents

    sae = load_latents(steer_sae)
    if not 0 <= latent < sae.d_sae:
        raise ActscopeError(f"--latent {latent} is out of range: {steer_sae} has latents 0..{sae.d_sae - 1}")
    return SteeringVector.from_sae(sae, latent)


def kl_scale(model: Any, tokenizer: Any, vector: Any, prompt: str, epsilon: float, sign: float = 1.0) -> float:
    """The largest scale (times ``sign``) whose mean next-token ``KL(p_steered || p)`` on ``prompt``
    stays under ``epsilon`` (``calibrate_scale`` with bracketing); one error line if none does."""
    from .intervene.steer_effects import calibrate_scale

    scale = calibrate_scale(model, tokenizer, vector, [prompt], epsilon=epsilon, max_scale=None, steps=10, sign=sign)
    if scale == 0 or not math.isfinite(scale):
        raise ActscopeError(f"--kl {epsilon:g}: even a scale of 1/64 moves the next-token distribution by more "
                            "than that; give a larger --kl")
    return scale


def _old_sparsity(value: str, sparsity_config: Optional[str]) -> str:
    """``generate --sparsity DIR``, the old spelling of ``--sparsity-config DIR``."""
    if sparsity_config is not None:
        raise ActscopeError("--sparsity and --sparsity-config both given; use --sparsity-config DIR only")
    try:
        float(value)
        is_number = not Path(value).exists()
    except ValueError:
        is_number = False
    if is_number:
        raise ActscopeError(f"generate --sparsity {value}: generate decodes with calibrated thresholds; calibrate "
                            "them with `actscope sparsify calibrate --sparsity "
                            f"{value} --out DIR`, then pass --sparsity-config DIR")
    deprecated("`generate --sparsity DIR`", "--sparsity-config DIR (--sparsity is always a number)")
    return value
