"""The command line: real runs, and a one-line error with exit status 2 for each bad input; one
vocabulary of shared options, with the old spellings still working behind a warning."""

from __future__ import annotations


import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from conftest import run_cli as run
from actscope import open_store
from actscope.cli import _layers, app
from actscope.cli_options import SHARED, split_list




def test_sites_lists_every_site_with_shape(tiny_llama_dir, capsys, monkeypatch):
    code, out, err = run(["sites", "--model", str(tiny_llama_dir)], capsys, monkeypatch)
    assert code == 0 and "warning" not in err
    lines = dict(line.split("\t") for line in out.strip().splitlines())
    assert lines["blocks.1.hook_resid_post"] == "[1, 4, 64]"
    assert lines["blocks.0.attn.hook_k"] == "[1, 4, 2, 16]"
    assert lines["blocks.0.attn.hook_pattern"] == "[1, 4, 4, 4]"
    assert len(lines) == 2 + 2 * 12


def test_sites_pattern_is_repeated_and_old_spellings_warn(tiny_llama_dir, capsys, monkeypatch):
    code, out, err = run(["sites", "-m", str(tiny_llama_dir), "--pattern", "blocks.0.hook_resid_post",
                          "--pattern", "blocks.1.attn.hook_k"], capsys, monkeypatch)
    assert code == 0 and "warning" not in err
    assert [line.split("\t")[0] for line in out.strip().splitlines()] == [
        "blocks.0.hook_resid_post", "blocks.1.attn.hook_k"]
    # the old positional MODEL and `-p PATTERN` still work, each with one warning line
    code, old, err = run(["sites", str(tiny_llama_dir), "-p", "blocks.0.hook_resid_post",
                          "-p", "blocks.1.attn.hook_k"], capsys, monkeypatch)
    assert code == 0 and old == out
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "--model MODEL" in warnings[0] and "--pattern" in warnings[1], err
    code, _, err = run(["sites", str(tiny_llama_dir), "--model", str(tiny_llama_dir)], capsys, monkeypatch)
    assert code == 2 and err.startswith("error: two models given")


def test_record_then_resume_from_cli(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    data = tmp_path / "corpus.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    args = ["record", "--model", str(tiny_llama_dir), "--data", str(data), "--sites", "blocks.*.hook_resid_post",
            "--seq-len", "64", "--out", str(tmp_path / "st"), "--dtype", "float16"]
    code, out, _ = run(args, capsys, monkeypatch)
    assert code == 0 and "2 sites" in out
    store = open_store(str(tmp_path / "st"))
    assert store.dtype == "float16" and store.num_tokens % 64 == 0 and store.num_tokens > 0
    code, _, _ = run(args, capsys, monkeypatch)  # re-run: nothing left to do, still fine
    assert code == 0


def _gguf_without_tokenizer(path):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown_model", "unknown model 'no-such-org/no-such-model'"),
        ("gguf_no_tokenizer", "has no usable tokenizer data"),
        ("missing_gguf", "GGUF file not found"),
        ("unknown_site", "closest valid sites: blocks.1.hook_resid_post"),
        ("empty_file", "file is empty"),
        ("not_utf8", "not UTF-8 text"),
        ("seq_len", "exceeds the model's context length of 256"),
        ("bad_dtype", "unknown dtype 'float8'"),
    ],
)
def test_bad_input_gives_one_line_error(case, message, tiny_llama_dir, tmp_path, capsys, monkeypatch):
    model, data, extra = str(tiny_llama_dir), [], []
    sites = "blocks.*.hook_resid_post"
    if case == "unknown_model":
        model = "no-such-org/no-such-model"
    elif case == "gguf_no_tokenizer":
        model = str(tmp_path / "bare.gguf")
        _gguf_without_tokenizer(model)
    elif case == "missing_gguf":
        model = str(tmp_path / "nothing.gguf")
    elif case == "unknown_site":
        sites = "blocks.1.hook_resid_pots"
    elif case in {"empty_file", "not_utf8"}:
        f = tmp_path / "data.txt"
        f.write_bytes(b"" if case == "empty_file" else b"\xff\xfe bad bytes")
        data = ["--data", str(f)]
    elif case == "seq_len":
        extra = ["--seq-len", "1024"]
    elif case == "bad_dtype":
        extra = ["--dtype", "float8"]
    out = tmp_path / "store"
    code, _, err = run(["record", "--model", model, "--sites", sites, "--out", str(out), *data, *extra],
                       capsys, monkeypatch)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert not (out / "manifest.json").exists()


def test_steer_and_generate_from_cli(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos.write_text("I love this\nWhat a happy day\n")
    neg.write_text("I hate this\nWhat a sad day\n")
    vec = tmp_path / "vec.gguf"
    code, out, err = run(["steer", "--model", str(tiny_llama_dir), "--positive", str(pos), "--negative", str(neg),
                          "--layers", "0-1", "--out", str(vec)], capsys, monkeypatch)
    assert code == 0, err
    assert "layers 0-1" in out and vec.exists()
    code, out, err = run(["generate", "--model", str(tiny_llama_dir), "--steer", str(vec), "--scale", "8",
                          "--prompt", "Today", "--max-new-tokens", "5", "--compare"], capsys, monkeypatch)
    assert code == 0, err
    assert out.count("Today") == 2 and "[steered x8]" in out
    code, _, err = run(["generate", "--model", str(tiny_llama_dir), "--steer", str(vec), "--prompt", "Today",
                        "--static-cache"], capsys, monkeypatch)
    assert code == 2 and "cannot carry steering" in err
    code, _, err = run(["steer", "--model", str(tiny_llama_dir), "--positive", str(pos), "--negative", str(neg),
                        "--layers", "0-x", "--out", str(vec)], capsys, monkeypatch)
    assert code == 2 and "use a range like 8-20" in err


def test_layers_are_repeated_ranges_and_the_comma_form_still_works():
    assert _layers(["0-2", "5"]) == _layers(["0,1,2,5"]) == _layers(["0-1,2", "5"]) == [0, 1, 2, 5]
    assert _layers(None) is None and _layers([]) is None
    assert split_list(["teal,wina", " topk "]) == ["teal", "wina", "topk"] and split_list(None) == []


def test_patch_from_cli(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    code, out, err = run(["patch", "--model", str(tiny_llama_dir), "--clean", "the value of the list",
                          "--corrupted", "the value of the dict", "--target", " value", "--out", str(tmp_path)],
                         capsys, monkeypatch)
    assert code == 0, err
    assert "largest effect" in out and (tmp_path / "effects.json").exists() and (tmp_path / "effects.png").exists()


def test_default_foil_lives_in_patch(tiny_llama):
    """The CLI passes no foil: patch() picks the corrupted run's top token, as the CLI used to."""
    import torch

    import actscope

    model, tok = tiny_llama
    clean, corrupted = "the value of the list", "the value of the dict"
    with torch.inference_mode():
        top = int(model(input_ids=tok(corrupted, return_tensors="pt").input_ids).logits[0, -1].argmax())
    chosen = actscope.patch(model, tok, clean, corrupted, target=" value", sites="resid_pre")
    given = actscope.patch(model, tok, clean, corrupted, target=" value", foil=top, sites="resid_pre")
    assert chosen.foil == given.foil == tok.decode([top])
    assert torch.equal(chosen.patched, given.patched) and chosen.corrupted == given.corrupted
    assert actscope.patch(model, tok, clean, corrupted, target=" value", metric="prob").foil is None


def test_causal_trace_from_cli_and_the_old_name_warns(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    args = ["-m", str(tiny_llama_dir), "-p", "the value of the list", "--subject", "value", "--target", " value",
            "--samples", "2"]
    code, out, err = run(["causal-trace", *args, "-o", str(tmp_path / "new")], capsys, monkeypatch)
    assert code == 0 and "warning" not in err, err
    assert "p(target)" in out and (tmp_path / "new" / "effects.json").exists()
    code, old, err = run(["trace", *args, "-o", str(tmp_path / "old")], capsys, monkeypatch)
    assert code == 0 and "p(target)" in old and (tmp_path / "old" / "effects.json").exists()
    assert err.startswith("warning: `actscope trace` is deprecated; use `actscope causal-trace`"), err
    help_text = CliRunner().invoke(app, ["--help"]).output
    assert "causal-trace" in help_text and " trace " not in help_text  # the alias is hidden


def test_sparsify_calibrate_eval_and_sparse_generation(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    import json

    data = tmp_path / "corpus.txt"
    data.write_text("The quick brown fox jumps over the lazy dog while the cat sleeps. " * 300)
    cfg = tmp_path / "wina"
    code, out, err = run(["sparsify", "calibrate", "--model", str(tiny_llama_dir), "--data", str(data),
                          "--method", "wina", "--sparsity", "0.5", "--seq-len", "32", "--max-tokens", "512",
                          "--out", str(cfg)], capsys, monkeypatch)
    assert code == 0, err
    assert (cfg / "sparsity_config.json").exists() and (cfg / "thresholds.safetensors").exists()
    code, out, err = run(["generate", "--model", str(tiny_llama_dir), "--prompt", "The quick",
                          "--sparsity-config", str(cfg), "--max-new-tokens", "4"], capsys, monkeypatch)
    assert code == 0, err
    assert out.startswith("The quick") and "achieved" in err and "wina" in err and "warning" not in err
    code, out_old, err = run(["generate", "--model", str(tiny_llama_dir), "-p", "The quick",
                              "--sparsity", str(cfg), "--max-new-tokens", "4"], capsys, monkeypatch)
    assert code == 0 and out_old == out, err  # the old spelling still decodes sparsely, with a warning
    assert err.startswith("warning: `generate --sparsity DIR` is deprecated; use --sparsity-config DIR"), err
    code, _, err = run(["generate", "--model", str(tiny_llama_dir), "-p", "x", "--sparsity", "0.5"],
                       capsys, monkeypatch)
    assert code == 2 and err.startswith("error: generate --sparsity 0.5:") and "--sparsity-config DIR" in err
    code, out_static, err = run(["generate", "--model", str(tiny_llama_dir), "--prompt", "The quick", "--device", "cpu",
                                 "--sparsity-config", str(cfg), "--max-new-tokens", "4", "--static-cache"],
                                capsys, monkeypatch)
    assert code == 0, err
    assert out_static == out  # the static-cache loop decodes exactly what HF's generate does
    code, out_compiled, err = run(["generate", "--model", str(tiny_llama_dir), "--prompt", "The quick", "--device",
                                   "cpu", "--sparsity-config", str(cfg), "--max-new-tokens", "4", "--compile"],
                                  capsys, monkeypatch)
    assert code == 0, err
    assert out_compiled == out and "compiling included" in err
    # from COMPILE_MIN_TOKENS new tokens on, sparse decoding compiles its step by default
    code, out_long, err = run(["generate", "--model", str(tiny_llama_dir), "--prompt", "The quick", "--device", "cpu",
                               "--sparsity-config", str(cfg), "--max-new-tokens", "64"], capsys, monkeypatch)
    assert code == 0 and "compiling included" in err, err
    code, out_plain, err = run(["generate", "--model", str(tiny_llama_dir), "--prompt", "The quick", "--device", "cpu",
                                "--sparsity-config", str(cfg), "--max-new-tokens", "64", "--no-compile"],
                               capsys, monkeypatch)
    assert code == 0 and "compiling included" not in err and out_plain.startswith(out.strip()), err
    code, _, err = run(["generate", "--model", str(tiny_llama_dir), "--prompt", "x", "--compile", "--no-static-cache"],
                       capsys, monkeypatch)
    assert code == 2 and "drop --no-static-cache" in err
    code, out, err = run(["sparsify", "eval", "--model", str(tiny_llama_dir), "--data", str(data),
                          "--methods", "teal,topk", "--sparsities", "0.3", "--sparsities", "0.6", "--calib-tokens", "256",
                          "--eval-tokens", "256", "--seq-len", "32", "--choices", "6",
                          "--out", str(tmp_path / "ev")], capsys, monkeypatch)
    assert code == 0, err
    assert "accuracy" in out
    result = json.loads((tmp_path / "ev" / "sparsity_eval.json").read_text())
    assert set(result["curves"]) == {"teal", "topk"} and len(result["curves"]["teal"]) == 2
    assert result["meta"]["choice_items"] == 6 and "accuracy" in result["curves"]["topk"][1]
    assert set(result["ppl_p_sparsity"]["teal"]) == {"1%", "5%"}
    paired = result["paired"]["topk vs teal"]["0.3"]
    assert paired["low"] <= paired["ratio"] <= paired["high"] and "perplexity topk vs teal  30%:" in out
    assert (tmp_path / "ev" / "ppl_vs_sparsity.svg").read_text().startswith("<svg xmlns")
    code, _, err = run(["generate", "--model", str(tiny_llama_dir), "--prompt", "x", "--sparsity-config",
                        str(tmp_path / "nothing")], capsys, monkeypatch)
    assert code == 2 and "no sparsity_config.json" in err


# -- one vocabulary ---------------------------------------------------------------------------------

ALL_DATA = ["model", "data", "out", "device", "seq_len", "max_tokens", "batch_size", "text_field"]
TAKES = {  # command -> the shared options it takes
    "sites": ["model", "seq_len", "device"],
    "record": ALL_DATA,
    "scan": ALL_DATA,
    "steer": ["model", "out", "device"],
    "generate": ["model", "device", "prompt"],
    "patch": ["model", "out", "device"],
    "causal-trace": ["model", "out", "device", "prompt"],
    "sparsify calibrate": ["model", "data", "out", "device", "seq_len", "max_tokens", "batch_size"],
    "sparsify eval": ["model", "data", "out", "device", "seq_len", "batch_size"],
    "compare cka": ["store", "out", "max_tokens"],
    "compare encode": ["store", "out"],
    "compare probe": ["store", "out"],
    "sae train": ["store", "out", "batch_size"],
    "sae eval": ["store", "out", "model", "batch_size", "device"],
    "nmf fit": ["store", "out", "model", "device"],
    "sae features": ["store", "out", "model", "data", "max_tokens", "device"],
}


def _commands(group=None, prefix: str = "") -> dict:
    """Every visible leaf command by its full name, e.g. "sparsify eval" (typer's own click types)."""
    group = group or typer.main.get_command(app)
    out = {}
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            out.update(_commands(cmd, f"{prefix}{name} "))
        elif not cmd.hidden:
            out[f"{prefix}{name}"] = cmd
    return out


def _options(cmd) -> list:
    return [p for p in cmd.params if p.param_type_name == "option" and p.name != "help"]


def test_every_command_takes_the_shared_options_from_one_definition():
    commands = _commands()
    assert set(commands) == set(TAKES)
    helps: dict[str, set] = {}
    for name, cmd in commands.items():
        by_flag = {flag: p for p in _options(cmd) if not p.hidden for flag in p.opts}
        for opt in TAKES[name]:
            param = by_flag.get(SHARED[opt][0])
            assert param is not None, f"{name} lacks {SHARED[opt][0]}"
            assert param.name == opt and tuple(param.opts) == SHARED[opt], (name, param.opts)
            helps.setdefault(opt, set()).add(param.help)
        for opt, flags in SHARED.items():  # a command that does not take a shared option has no look-alike
            if opt not in TAKES[name]:
                assert not set(flags) & set(by_flag), f"{name} has its own {flags}"
    assert all(len(h) == 1 for h in helps.values()), helps  # one help text each: one definition


@pytest.mark.parametrize("command", sorted(TAKES))
def test_help_shows_the_shared_options(command):
    result = CliRunner().invoke(app, [*command.split(), "--help"])
    assert result.exit_code == 0, result.output
    for opt in TAKES[command]:
        assert all(flag in result.output for flag in SHARED[opt]), (command, opt)


def test_every_option_has_help_and_p_means_prompt():
    group = typer.main.get_command(app)
    every = dict(_commands())
    every["trace"] = group.commands["trace"]
    for name, cmd in every.items():
        for p in _options(cmd):
            assert p.help, f"{name} {p.opts[0]} has no help text"
            if "-p" in p.opts and not p.hidden:
                assert p.opts == ["--prompt", "-p"], f"{name}: -p is {p.opts}"
    assert [p for p in _options(group.commands["sites"]) if "-p" in p.opts][0].hidden  # the deprecated pattern
    sparsity = {name: p for name, cmd in every.items() for p in _options(cmd) if "--sparsity" in p.opts}
    assert set(sparsity) == {"sparsify calibrate", "generate"} and sparsity["generate"].hidden
    bad = CliRunner().invoke(app, ["sparsify", "calibrate", "--out", "x", "--sparsity", "half"])
    assert bad.exit_code == 2 and "Invalid value for '--sparsity'" in bad.output  # always a number where shown
