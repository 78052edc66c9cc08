"""The HTML report in a real headless Chromium: loads cleanly, plots render, corpus text is inert."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

import actscope
from actscope.report.html import render
from planted import planted_gpt2

PAYLOAD = "<script>document.title='pwned';document.body.setAttribute('data-pwned','1')</script>"
IMG_PAYLOAD = "<img src=x onerror=document.title=1>"


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.fail("the report test needs Chromium: apt-get install chromium (make test does this as root)")
    return exe


def run_chromium(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-extensions", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
        "--virtual-time-budget=5000",
    ]
    return subprocess.run([chromium(), *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def report_page(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("browser")
    corpus = folder / f"corpus{IMG_PAYLOAD}.txt"
    text = (f"Notes from a web page. {PAYLOAD} The quick brown fox. {IMG_PAYLOAD} " * 60)
    corpus.write_text(text)
    report = actscope.scan(planted_gpt2(), tiny_tokenizer, str(corpus), seq_len=64, max_tokens=64 * 16,
                           batch_size=4, progress=False)
    return report, report.save(folder / "out"), folder


def test_escaping_of_every_text_field():
    report = {
        "model": {"name": PAYLOAD, "model_type": "x", "n_layers": 1, "n_heads": 1, "d_ff": 2},
        "tokens": 1, "source": PAYLOAD, "actscope_version": "0", "summary": [PAYLOAD],
        "attention_sinks": {"enabled": False}, "dormant_heads": [],
        "massive_activations": [{"layer": 0, "dim": 0, "position": 0, "token": PAYLOAD, "value": 1e4,
                                 "ratio_to_median": 1e4, "count": 1}],
        "residual_median": [1.0],
        "mlp_sparsity": [{"layer": 0, "density": {"0": 0.5}, "tau": 0.0, "token_sparsity": 0.5,
                          "chunk_sparsity_8": 0.1, "delta_sparsity": 0.1, "cett_sparsity": 0.2}],
        "dead_neurons": [{"layer": 0, "dead": 0, "rare": 0, "d_ff": 2}], "neural_codes": [{"layer": 0, "uniqueness": 1.0}],
        "layer_use": [{"layer": 0, "relative_update": 1.0, "cos_attn_to_residual": 0.1, "cos_mlp_to_residual": 0.1,
                       "logit_lens_kl": 0.0, "skip_kl": 0.1}],
        "logit_lens": {"positions": [0], "tokens": [PAYLOAD], "next_token_prediction": [PAYLOAD],
                       "layers": [{"layer": 0, "top": [[PAYLOAD]], "final_token_rank": [0]}]},
        "neurons": [{"layer": 0, "neuron": 0, "max": 1.0, "kurtosis": 0.0, "density": 0.5,
                     "contexts": [{"before": PAYLOAD, "token": PAYLOAD, "after": PAYLOAD, "value": 1.0}]}],
    }
    import torch

    page = render(report, {"neuron_density": torch.rand(1, 2)})
    assert PAYLOAD not in page and "<script>document.title" not in page
    assert page.count("<script>") == 1  # ours
    assert "&lt;script&gt;document.title=&#x27;pwned&#x27;" in page


def test_report_loads_renders_and_stays_inert(report_page, tmp_path):
    report, page, folder = report_page
    html = page.read_text()
    assert "&lt;img src=x onerror=document.title=1&gt;" in html  # the corpus file name, escaped
    dom = run_chromium(["--dump-dom", page.as_uri()], tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console_errors = [l for l in dom.stderr.splitlines() if "CONSOLE" in l or "Uncaught" in l]
    assert not console_errors, console_errors
    assert "data-pwned" not in dom.stdout
    assert re.search(r"<title>actscope scan: [^<]*</title>", dom.stdout)
    ok = re.search(r'data-images-ok="(\d+)/(\d+)"', dom.stdout)
    assert ok and ok.group(1) == ok.group(2) and int(ok.group(1)) >= 4, "every plot image decoded"
    charts = re.search(r'data-charts="(\d+)"', dom.stdout)
    assert charts and int(charts.group(1)) >= 10
    shot = folder / "report.png"
    run = run_chromium([f"--screenshot={shot}", "--window-size=1280,2600", page.as_uri()], tmp_path)
    assert run.returncode == 0 and shot.stat().st_size > 20_000
