"""The SAE feature browser in a real headless Chromium: `actscope sae features` output renders every
latent with its bins, search by latent (the URL fragment) and by token works, and hostile dataset
text (`</script>`, `<!--`, an onerror image) stays text: no injected script runs, no element appears."""

from __future__ import annotations

import json
from pathlib import Path
import re
from urllib.parse import quote

import pytest
from typer.testing import CliRunner

import actscope
from actscope.cli import app
from actscope.sae import TopKSAE
from actscope.sae.features import write_browser
from conftest import run_cli
from test_report_browser import run_chromium

SITE = "blocks.1.hook_resid_post"
SCRIPT = "</script><script>window.__pwned=1;document.body.setAttribute('data-pwned','1')</script>"
COMMENT = "<!--"
IMG = "<img src=x onerror=document.body.setAttribute('data-pwned','2')>"


@pytest.fixture(scope="module")
def page(tiny_llama, tiny_llama_dir, tmp_path_factory):
    """features.html from the CLI on a store of hostile text, plus whole payload tokens in latent 0."""
    model, tok = tiny_llama
    folder = tmp_path_factory.mktemp("sae-browser")
    texts = [f"Notes from a web page {SCRIPT} the quick brown fox {COMMENT} jumps {IMG} over the lazy dog. " * 8] * 6
    store = actscope.record(model, tok, str(folder / "store"), [SITE], texts, seq_len=32, max_tokens=32 * 10,
                            batch_size=4, shard_mb=0.05, dtype="float32", progress=False)
    TopKSAE(k=4, expansion=2, batch_size=64, tokens=320).fit(store, SITE, progress=False).save_pretrained(folder / "sae")
    result = CliRunner().invoke(app, ["sae", "features", "--sae", str(folder / "sae"), "--store", str(folder / "store"),
                                      "--model", str(tiny_llama_dir), "--device", "cpu", "--top", "3", "--bins", "3",
                                      "--per-bin", "2", "--out", str(folder / "features")])
    assert result.exit_code == 0, result.output
    records = json.loads((folder / "features" / "features.json").read_text())
    records[0]["contexts"].append({"value": 99.0, "tokens": ["x", SCRIPT, COMMENT], "at": 1})
    records[0]["bins"][0]["contexts"].append({"value": 99.0, "tokens": [IMG, "y"], "at": 0})
    return write_browser(records, folder / "features" / "hostile.html", title=f"SAE {SCRIPT}"), records


def test_features_record_the_site_on_the_fly_without_a_store(page, tiny_llama_dir, tmp_path, capsys, monkeypatch):
    """`--model` and `--data` instead of `--store`: the SAE's site is recorded to a temporary store
    first, and the result equals running on a store recorded the same way."""
    folder = Path(page[0]).parent.parent
    data = tmp_path / "texts.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    common = ["--sae", str(folder / "sae"), "--model", str(tiny_llama_dir), "--device", "cpu", "--top", "3",
              "--bins", "2", "--per-bin", "2"]
    fly = CliRunner().invoke(app, ["sae", "features", *common, "--data", str(data), "--max-tokens", "256",
                                   "--out", str(tmp_path / "fly")])
    assert fly.exit_code == 0, fly.output
    model, tok = actscope.load_model(str(tiny_llama_dir))
    actscope.record(model, tok, str(tmp_path / "store"), [SITE], str(data), max_tokens=256, dtype="float32",
                    progress=False)
    kept = CliRunner().invoke(app, ["sae", "features", *common, "--store", str(tmp_path / "store"),
                                    "--out", str(tmp_path / "kept")])
    assert kept.exit_code == 0, kept.output
    assert (tmp_path / "fly" / "features.json").read_text() == (tmp_path / "kept" / "features.json").read_text()
    code, _, err = run_cli(["sae", "features", *common, "--store", str(tmp_path / "store"), "--data", str(data),
                            "--out", str(tmp_path / "x")], capsys, monkeypatch)
    assert code == 2 and "--data and --max-tokens choose what to record" in err
    code, _, err = run_cli(["sae", "features", "--sae", str(folder / "sae"), "--out", str(tmp_path / "y")],
                           capsys, monkeypatch)
    assert code == 2 and "give --store DIR, or --model M" in err


def _dom(page_url: str, tmp_path) -> str:
    run = run_chromium(["--dump-dom", page_url], tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not errors, errors
    assert 'data-pwned="' not in run.stdout and "<script>window.__pwned" not in run.stdout  # no attribute set
    assert "<img" not in run.stdout and run.stdout.count("<script") == 2  # ours: the data and the code
    return run.stdout


def _shown(dom: str) -> list[int]:
    return [int(n) for n in re.findall(r'<div class="lat" id="latent-(\d+)">', dom)]


def test_every_latent_renders_and_hostile_text_stays_text(page, tmp_path):
    path, records = page
    dom = _dom(path.as_uri(), tmp_path)
    assert _shown(dom) == list(range(len(records)))[:200]
    assert f"{len(records)} of {len(records)} latents" in dom
    assert "&lt;/script&gt;&lt;script&gt;window.__pwned=1;" in dom  # shown as text, in a span
    assert "&lt;!--" in dom and "&lt;img src=x onerror=" in dom
    assert re.search(r"<h1 id=\"title\">SAE &lt;/script&gt;", dom)
    assert dom.count("<details") == sum(len(r["bins"]) for r in records[:200])
    assert "activations " in dom and " sampled)</summary>" in dom


def test_search_by_latent_number_and_by_token(page, tmp_path):
    path, records = page
    dom = _dom(f"{path.as_uri()}#5", tmp_path)
    assert _shown(dom) == [5] and "1 of" in dom
    assert dom.count("<details class=\"bin\" open=\"\">") == len(records[5]["bins"])  # one latent: bins unfolded
    query = "__pwned"
    want = [r["latent"] for r in records
            if any(query in t for c in r["contexts"] + [c for b in r["bins"] for c in b["contexts"]] for t in c["tokens"])]
    dom = _dom(f"{path.as_uri()}#{quote(query)}", tmp_path)
    assert want and _shown(dom) == want[:200]
    dom = _dom(f"{path.as_uri()}#%", tmp_path)  # a malformed fragment searches for itself, the page still works
    assert f"of {len(records)} latents" in dom


@pytest.mark.parametrize("flags", [["--bins", "-1"], ["--per-bin", "0"], ["--top", "0"]])
def test_bad_features_input_is_one_error_line(page, tmp_path, capsys, monkeypatch, flags):
    folder = page[0].parent.parent
    code, _, err = run_cli(["sae", "features", "--sae", str(folder / "sae"), "--store", str(folder / "store"),
                            "--out", str(tmp_path / "f"), *flags], capsys, monkeypatch)
    assert code == 2 and err.startswith("error: --top and --per-bin must be positive") and err.count("\n") == 1, err
