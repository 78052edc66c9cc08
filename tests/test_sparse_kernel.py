"""The sparse decode kernels: the C++ kernel on every instruction-set path and both thread pools
equals the masked dense computation, the one-pass mask equals the keep rule, the rows limit per
call holds, and the Triton kernels keep the same contract (interpreter here, CUDA on a GPU)."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import VOCAB, random_tokens, tiny_model

from actscope.sparsify import SparseLinear, apply, calibrate
from actscope.sparsify import swap as apply_mod
from actscope.sparsify.kernel import cpu_kernel, mask, masked, reference

_tokens = random_tokens

# --- the kernel ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("kind", ["scalar", "channel", "scaled", "bias"])
def test_kernel_equals_masked_dense(dtype, rows, kind):
    kern = cpu_kernel()
    assert kern is not None, "the C++ kernel must build here (gcc and ninja are installed by make)"
    g = torch.Generator().manual_seed(rows)
    d_in, d_out = 200, 75  # 75: the AVX2 loops' 8-wide body and their scalar tail
    x = torch.randn(rows, d_in, generator=g).to(dtype)
    wt = torch.randn(d_in, d_out, generator=g).to(dtype)
    bias = torch.randn(d_out, generator=g).to(dtype) if kind == "bias" else None
    thresh = torch.tensor([0.7])
    scale = torch.empty(0)
    if kind == "channel":
        thresh = torch.rand(d_in, generator=g) * 1.5
    if kind == "scaled":
        scale = torch.rand(d_in, generator=g) * 2
    counter = torch.zeros(2, dtype=torch.int64)
    got = kern.sparse_linear(x, wt, bias, thresh, scale, counter)
    ref_counter = torch.zeros(2, dtype=torch.int64)
    want = reference(x, wt, bias, thresh, scale, ref_counter)
    assert got.dtype == dtype and got.shape == (rows, d_out)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.float(), want.float(), rtol=tol, atol=tol * 10)
    assert counter.tolist() == ref_counter.tolist()
    assert 0 < counter[0] < counter[1]  # the masks really were partial
    # the same kernel as the registered operator that compiled decoding steps call
    from actscope.sparsify import ops

    op_counter = torch.zeros(2, dtype=torch.int64)
    assert torch.equal(ops.sparse_linear(x, wt, bias, thresh, scale, op_counter), got)
    assert op_counter.tolist() == ref_counter.tolist()


@pytest.fixture(params=["scalar", "avx2", "avx512"])
def isa(request):
    """Each instruction-set path of the CPU kernel, forced in turn (the best one is put back)."""
    kern = cpu_kernel()
    assert kern is not None
    if request.param not in kern.supported_isas():
        pytest.skip(f"this CPU has no {request.param} ({kern.supported_isas()}); "
                    "that path is tested on a CPU that has it")
    kern.set_isa(request.param)
    yield request.param
    kern.set_isa("")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("d_out", [75, 64, 300])
def test_every_isa_path_equals_masked_dense(isa, dtype, rows, d_out):
    """Forced scalar / AVX2 / AVX-512 paths against the masked dense computation: 16- and 8-wide
    bodies with their tails (75, 300), kept-row counts that are not a multiple of the 8-row group,
    every size of AVX-512's tile of 1-4 input rows (rows 2, 3, 5, 16), and prefetching further ahead."""
    kern = cpu_kernel()
    assert kern.isa() == isa
    g = torch.Generator().manual_seed(rows * 1000 + d_out)
    for d_in, thresh_value in ((203, 0.7), (1000, 1.1), (37, 0.0)):
        x = torch.randn(rows, d_in, generator=g).to(dtype)
        wt = torch.randn(d_in, d_out, generator=g).to(dtype)
        bias = torch.randn(d_out, generator=g).to(dtype)
        thresh = torch.tensor([thresh_value])
        for groups in (1, 3):
            kern.set_prefetch_groups(groups)
            counter, ref_counter = torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
            got = kern.sparse_linear(x, wt, bias, thresh, torch.empty(0), counter)
            want = reference(x, wt, bias, thresh, None, ref_counter)
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            assert torch.allclose(got.float(), want.float(), rtol=tol, atol=tol * 10), (d_in, groups)
            assert counter.tolist() == ref_counter.tolist()
        kern.set_prefetch_groups(1)
        # the rows kernel (RowsLinear) on the same path
        w = wt.t().contiguous()
        idx = torch.arange(0, d_out, 3)
        got = kern.rows_linear(x, w, idx)
        want = torch.zeros(rows, d_out)
        want[:, idx] = x.float() @ w[idx].float().t()
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        assert torch.allclose(got.float(), want, rtol=tol, atol=tol * d_in ** 0.5)
    # the streaming read the bench measures against: a plain sum of the bytes
    t = torch.randn(4099)
    assert kern.stream_read(t) == pytest.approx(float(t.double().sum()), abs=1e-2)


def test_both_thread_pools_equal_masked_dense():
    """The kernel's ranges of kept rows run on torch's OpenMP team (the default) or, with
    ACTSCOPE_KERNEL_POOL=own, on the kernel's help-first pool: same outputs, on a weight large
    enough for both threads, the same bits on every call (the ranges are fixed; threads claiming
    chunks as they came free gave 70-138 different roundings over 100-200 calls), and the same
    bits from both pools."""
    import os
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from actscope.sparsify.kernel import cpu_kernel\n"
        "torch.set_num_threads(2); g = torch.Generator().manual_seed(0)\n"
        "x = torch.randn(3, 2048, generator=g); wt = torch.randn(2048, 1024, generator=g)\n"
        "b = torch.randn(1024, generator=g); t = torch.tensor([0.7])\n"
        "c = torch.zeros(2, dtype=torch.int64)\n"
        "got = cpu_kernel().sparse_linear(x, wt, b, t, torch.empty(0), c)\n"
        "want = torch.where(x.abs() > 0.7, x, torch.zeros(())) @ wt + b\n"
        "print(float((got - want).abs().max()), int(c[0]), int(c[1]))\n"
        "outs = {cpu_kernel().sparse_linear(x[:r], wt, b, t, torch.empty(0), c).numpy().tobytes()\n"
        "        for r in (1, 3) for _ in range(100)}\n"
        "import hashlib; print(len(outs), hashlib.sha256(b''.join(sorted(outs))).hexdigest())\n"
    )
    digests = set()
    for pool in ("omp", "own"):
        run = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, ACTSCOPE_KERNEL_POOL=pool),
                             capture_output=True, text=True, timeout=300)
        diff, kept, total, distinct, digest = run.stdout.split()
        assert float(diff) < 1e-3 and 0 < int(kept) < int(total), run.stderr[-2000:]
        assert int(distinct) == 2  # one result for 1 row, one for 3 rows, over 100 calls each
        digests.add(digest)
    assert len(digests) == 1  # and the same bits from either pool


def test_isa_forced_by_environment_and_refused_when_unknown():
    import os
    import subprocess
    import sys

    code = "from actscope.sparsify.kernel import cpu_isa; print(cpu_isa())"
    for name in ("scalar", "avx2"):
        if name not in cpu_kernel().supported_isas():
            continue
        run = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, ACTSCOPE_KERNEL_ISA=name),
                             capture_output=True, text=True, timeout=300)
        assert run.stdout.strip().splitlines()[-1] == name, run.stderr[-2000:]
    run = subprocess.run([sys.executable, "-W", "always", "-c", code],
                         env=dict(os.environ, ACTSCOPE_KERNEL_ISA="sse9"), capture_output=True, text=True, timeout=300)
    assert run.stdout.strip().splitlines()[-1] == "None" and "unknown instruction set 'sse9'" in run.stderr
    with pytest.raises(RuntimeError, match="unknown instruction set"):
        cpu_kernel().set_isa("sse9")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_pass_mask_equals_the_keep_rule(isa, dtype):
    """``masked_input`` (prompts' masked input, one pass) on every instruction-set path: equal to
    ``x * mask(x)`` with scalar and per-channel thresholds, a WINA-like scale, widths that are not
    a multiple of 16, and a NaN, which is dropped (0), as the kernels drop it; counts equal."""
    kern = cpu_kernel()
    g = torch.Generator().manual_seed(3)
    for shape, n_thresh, scaled in [((5, 37), 1, False), ((3, 64), 64, True), ((40, 576), 1, False),
                                    ((2, 1536), 1536, True), ((7, 19), 19, False)]:
        x = torch.randn(*shape, generator=g).to(dtype)
        x[0, 0] = float("nan")
        thresh = torch.rand(n_thresh, generator=g)
        scale = torch.rand(shape[-1], generator=g) * 2 if scaled else None
        got_count, want_count = torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
        got = kern.masked_input(x, thresh, scale if scaled else torch.empty(0), got_count)
        want = x * mask(x, thresh, scale, want_count)
        want[0, 0] = 0.0
        assert torch.equal(got, want) and got_count.tolist() == want_count.tolist(), shape
    with torch.no_grad():  # kernel.masked takes it on AVX2/AVX-512, the torch ops elsewhere: same values
        x = torch.randn(2, 3, 64, generator=g).to(dtype)
        assert torch.equal(masked(x, torch.tensor([0.5])), x * (x.abs().float() > 0.5))
    with pytest.raises(RuntimeError, match="thresh must be float32, one value or one per input"):
        kern.masked_input(x[0], torch.rand(7), torch.empty(0), torch.empty(0, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_kernel_equals_selected_rows(dtype):
    kern = cpu_kernel()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 80, generator=g).to(dtype)
    w = torch.randn(120, 80, generator=g).to(dtype)
    idx = torch.tensor([0, 7, 8, 50, 119])
    got = kern.rows_linear(x, w, idx)
    want = torch.zeros(3, 120)
    want[:, idx] = x.float() @ w[idx].float().t()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert torch.allclose(got.float(), want, rtol=tol, atol=tol * 10)
    assert torch.count_nonzero(got) == 15


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [8, 9, 12, 16, 17])
def test_rows_per_kernel_call_follow_the_dtype_limit(dtype, rows):
    """On CPU the kernel serves up to 16 rows, but bfloat16 on a CPU with AMX only up to 8, where
    torch's dense product is faster beyond (swap.KERNEL_MAX_ROWS_BF16); both paths give the same
    outputs. Checked for a lone linear and for a group (q/k/v) inside ``apply``."""
    limit = apply_mod._BF16_ROWS_ON_THIS_CPU if dtype == torch.bfloat16 else apply_mod.KERNEL_MAX_ROWS
    assert apply_mod._BF16_ROWS_ON_THIS_CPU == (8 if apply_mod._has_amx() else 16)
    lin = torch.nn.Linear(64, 48).to(dtype)
    sparse = SparseLinear(lin, torch.tensor([0.5]))
    sparse.to_kernel_layout()  # as apply() does: the kernel is bound to the module
    calls = []

    class Recorder:
        def __init__(self, kern):
            self.kern = kern

        def sparse_linear(self, *args):
            calls.append(args[0].reshape(-1, args[0].shape[-1]).shape[0])
            return self.kern.sparse_linear(*args)

        def sparse_linear_split(self, *args):  # a group's one call
            calls.append(args[0].reshape(-1, args[0].shape[-1]).shape[0])
            return self.kern.sparse_linear_split(*args)

        def same_bytes(self, *args):
            return self.kern.same_bytes(*args)

    sparse._cpu = Recorder(sparse._cpu)
    x = torch.randn(rows, 64).to(dtype)
    with torch.no_grad():
        got = sparse(x)
    assert calls == ([rows] if rows <= limit else [])
    want = reference(x, lin.weight.detach().t(), lin.bias.detach(), torch.tensor([0.5]))
    sparse.restore_layout()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.float(), want.float(), rtol=tol, atol=tol)

    model = tiny_model("llama", intermediate_size=192).to(dtype)
    config = calibrate(model.float(), method="teal", sparsity=0.5, tokens=_tokens(4), progress=False)
    model.to(dtype)
    calls.clear()
    with torch.inference_mode(), apply(model, config) as handle:
        q = handle.modules["model.layers.0.self_attn.q_proj"]
        assert q.group is not None
        q._cpu = Recorder(q._cpu)
        model(torch.randint(3, VOCAB, (1, rows)))
    assert calls == ([rows] if rows <= limit else [])  # the group's one call, made by q_proj


_TRITON_CHECK = """
import sys
import torch
from actscope.sparsify import triton_kernel as tk
from actscope.sparsify.kernel import mask, reference
dev = sys.argv[1] if len(sys.argv) > 1 else "cpu"
variant = sys.argv[2].split("+") if len(sys.argv) > 2 else ["masked"]
gather, one_launch = "gather" in variant, "one-launch" in variant
tk.set_tiles(gemv=dict(KERNEL="gemv" if "gemv" in variant else "masked", PREFETCH="prefetch" in variant,
                      ACC2D="acc2d" in variant))
g = torch.Generator().manual_seed(1)
for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 0.15)):
    for kind in ("scalar", "channel", "scaled"):
        for rows in (1, 5, 20):
            for d_in, split in ((100, 1), (300, 3), (300, None)):
                x = torch.randn(rows, d_in, generator=g).to(dtype)
                wt = torch.randn(d_in, 70, generator=g).to(dtype)
                bias = torch.randn(70, generator=g).to(dtype) if split != 1 else None
                thresh = torch.rand(d_in, generator=g) if kind == "channel" else torch.tensor([0.6])
                scale = torch.rand(d_in, generator=g) * 2 if kind == "scaled" else torch.empty(0)
                ref_counter = torch.zeros(2, dtype=torch.int64)
                want = reference(x, wt, bias, thresh, scale, ref_counter)
                args = [t.to(dev) if t is not None else None for t in (x, wt, bias, thresh, scale)]
                counter = torch.zeros(2, dtype=torch.int64, device=dev)
                got = tk.sparse_linear(*args, counter, split=split, gather=gather, one_launch=one_launch).cpu()
                assert got.dtype == dtype
                err = float((got.float() - want.float()).abs().max())
                if dtype == torch.bfloat16:  # + one step: the interpreter rounds to bfloat16 toward zero
                    tol = 0.15 + 2 ** -7 * float(want.float().abs().max())
                assert err < tol, (dtype, kind, rows, d_in, split, err)
                assert counter.tolist() == ref_counter.tolist(), (kind, rows, counter, ref_counter)
                if one_launch:  # the workspace is left as it was found: zeros
                    ws, sem = tk.workspace(args[0].device, 70)
                    assert ws is tk.workspace(torch.device(dev), 70)[0]  # "cuda" and "cuda:0": one buffer
                    assert not ws.any() and not sem.any(), (kind, rows, split)
                # the masked dense path's input, in one kernel
                counter = torch.zeros(2, dtype=torch.int64, device=dev)
                xm = tk.masked_input(args[0], args[3], args[4], counter).cpu()
                keep = mask(x, thresh, scale)
                assert torch.equal(xm, torch.where(keep, x, torch.zeros_like(x))), (dtype, kind, rows)
                assert counter.tolist() == [int(keep.sum()), keep.numel()]
print("ok")
"""

TRITON_VARIANTS = ["masked", "gather+one-launch", "gemv", "gemv+one-launch+prefetch+acc2d"]


@pytest.mark.parametrize("variant", TRITON_VARIANTS)
def test_triton_kernel_in_interpreter_mode(variant):
    """The CUDA kernels, run by Triton's CPU interpreter: same contract as the C++ kernel. The
    default masked kernel, and the variants off by default until measured on a GPU: gather-first,
    one launch (its workspace left zeroed after every call), the one-row kernel with x prefetched
    and a 2-D accumulator; and the fused mask."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.fail("Triton is missing: `make test` installs it (the test extra) so its CPU interpreter can "
                    "check the GPU kernel", pytrace=False)
    env = dict(os.environ, TRITON_INTERPRET="1")  # must be set before triton is imported
    run = subprocess.run([sys.executable, "-c", _TRITON_CHECK, "cpu", variant], env=env, capture_output=True,
                         text=True, timeout=600)
    if "__index__" in run.stderr and "only 0-dimensional arrays" in run.stderr:
        # seen with Triton 3.6 and numpy 2.5: the interpreter turns loop bounds into 1-element
        # arrays, which numpy 2.5 no longer converts to int; the compiled kernel is unaffected
        pytest.skip("this Triton's interpreter cannot run loops with runtime bounds under this numpy")
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


def test_triton_kernel_on_cuda():
    """The same check on a real GPU (bfloat16 through tensor cores, split-K atomics, semaphores),
    every variant at once in its own process: compiling dominates, and a GPU machine has cores."""
    import subprocess
    import sys

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here: the Triton kernel is checked on a GPU by bench/gpu_check.sh")
    runs = {v: subprocess.Popen([sys.executable, "-c", _TRITON_CHECK, "cuda", v], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for v in TRITON_VARIANTS}
    failed = {}
    for variant, proc in runs.items():
        out, err = proc.communicate(timeout=600)
        if proc.returncode != 0 or not out.strip().endswith("ok"):
            failed[variant] = err[-1500:]
    assert not failed, failed


def test_triton_kernels_compile_for_a_hopper_gpu():
    """Every Triton kernel and variant compiles to sm_90 machine code, here, without a GPU (Triton
    ships ptxas), so a GPU run never starts by finding a compile error. The PTX also bears out
    what docs/sparsify.md says of the one-row kernel: the general kernel's loop moves x between
    layouts with barriers on every step, the one-row kernel's with a 2-D accumulator does not."""
    import itertools

    pytest.importorskip("triton", reason="`make test` installs Triton (the test extra)")
    from actscope.sparsify import triton_kernel as tk
    from actscope.sparsify.triton_ptx import compile_kernel, loop_stats

    n = 0
    for kind, one_launch, rows, dtype in itertools.product(("masked", "gather", "gemv", "gemv-prefetch-acc2d"),
                                                          (False, True), (1, 4), ("bf16", "fp32")):
        if (dtype == "fp32" and kind != "masked") or (kind.startswith("gemv") and rows > 1):
            continue
        tiles = tk.GEMV if rows == 1 else tk.DOT
        const = dict(HAS_BIAS=True, PER_CHANNEL=True, HAS_SCALE=True, COUNT=True, ONE_LAUNCH=one_launch,
                     BLOCK_K=tiles["BLOCK_K"], BLOCK_N=tiles["BLOCK_N"])
        if kind.startswith("gemv"):
            fn = tk._gemv_kernel
            const.update(PREFETCH="prefetch" in kind, ACC2D="acc2d" in kind)
        else:
            fn = tk._gather_kernel if kind == "gather" else tk._sparse_linear_kernel
            const.update(IEEE=dtype == "fp32", UPCAST=False, ONE_ROW=rows == 1, BLOCK_R=1 if rows == 1 else 16)
        ptx = compile_kernel(fn, const, dtype, tiles["num_warps"], tiles["num_stages"]).asm["ptx"]
        assert "ld.global" in ptx and ("atom.global" in ptx or "red.global" in ptx)
        if one_launch:  # the semaphore: an acquire-release add, and the reset
            assert "atom.global.gpu.acq_rel.add.u32" in ptx and "exch" in ptx, (kind, rows)
        n += 1
    for dtype in ("bf16", "fp32"):
        compile_kernel(tk._mask_kernel, dict(PER_CHANNEL=True, HAS_SCALE=True, COUNT=True, BLOCK=1024), dtype)
        n += 1
    assert n == 18
    one_row = dict(HAS_BIAS=False, PER_CHANNEL=False, HAS_SCALE=False, COUNT=True, ONE_LAUNCH=True)
    general = loop_stats(compile_kernel(tk._sparse_linear_kernel, dict(
        one_row, IEEE=False, UPCAST=False, ONE_ROW=True, BLOCK_R=1, BLOCK_K=128, BLOCK_N=64), num_warps=2).asm["ptx"])
    gemv = loop_stats(compile_kernel(tk._gemv_kernel, dict(
        one_row, PREFETCH=True, ACC2D=True, BLOCK_K=64, BLOCK_N=128), num_warps=4).asm["ptx"])
    assert general["bar.sync"] > 0 and general["shfl.sync"] > 0, general
    assert gemv["bar.sync"] == gemv["shfl.sync"] == 0 and gemv["ld.global"] == 17, gemv  # 16 weight loads + x


def test_bad_arguments_are_refused_with_one_clear_line():
    """Arguments the kernel would read past or misread are refused before any memory is touched."""
    kern = cpu_kernel()
    if kern is None:
        pytest.skip("no C++ compiler here: the kernel could not be built")
    x, wt, b = torch.randn(2, 16), torch.randn(16, 8), torch.randn(8)
    t, empty, c = torch.tensor([0.5]), torch.empty(0), torch.zeros(2, dtype=torch.int64)
    cases = [
        ((x, wt, torch.randn(7), t, empty, c), "bias must have one value per output"),
        ((x, wt, b, torch.rand(15), empty, c), "thresh must be float32, one value or one per input"),
        ((x, wt, b, empty, empty, c), "thresh must be float32"),
        ((x, wt, b, t, torch.rand(3), c), "scale must be empty or float32, one per input"),
        ((x, wt, b, t, empty, torch.zeros(3, dtype=torch.int64)), "counter must be empty or a contiguous int64"),
        ((x, wt, b, t, empty, torch.zeros(2)), "counter must be empty or a contiguous int64"),
        ((x.double(), wt.double(), b, t, empty, c), "float32 or bfloat16 only"),
        ((x, wt.bfloat16(), b, t, empty, c), "x and wt need one dtype"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            kern.sparse_linear(*args)
    with pytest.raises(RuntimeError, match="values must be a contiguous CPU tensor"):
        kern.sparse_linear_split(x, wt, b, t, empty, c, [], torch.empty(5))
    assert c.tolist() == [0, 0]  # nothing was counted by the refused calls


@pytest.mark.parametrize("shape", [(16,), (2, 3, 16), (0, 16), (3, 0)])
def test_inputs_of_any_leading_shape_and_empty_ones(shape):
    """x [..., in]: one row, several leading dimensions, no rows, or no inputs (then y = bias)."""
    kern = cpu_kernel()
    if kern is None:
        pytest.skip("no C++ compiler here: the kernel could not be built")
    d_in = shape[-1]
    x, wt, b = torch.randn(*shape), torch.randn(d_in, 8), torch.randn(8)
    got = kern.sparse_linear(x, wt, b, torch.tensor([0.5]), torch.empty(0), torch.zeros(2, dtype=torch.int64))
    rows = math.prod(shape[:-1])
    want = reference(x.reshape(rows, d_in), wt, b, torch.tensor([0.5])).reshape(*shape[:-1], 8)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
    strided = torch.randn(*shape[:-1], 2 * d_in)[..., ::2]  # not contiguous
    got = kern.sparse_linear(strided, wt, b, torch.tensor([0.5]), torch.empty(0), torch.empty(0, dtype=torch.int64))
    want = reference(strided.reshape(rows, d_in), wt, b, torch.tensor([0.5])).reshape(*shape[:-1], 8)
    assert torch.allclose(got, want, atol=1e-5)


def test_triton_workspaces_are_shared_per_device_and_can_be_zeroed_again():
    """One buffer per (device, width), whatever the device's spelling; zero_workspaces clears what
    a kernel stopped midway would leave (the GPU tuner calls it after a failed setting)."""
    from actscope.sparsify import triton_kernel as tk

    sums, semaphores = tk.workspace("cpu", 48)
    assert sums is tk.workspace(torch.device("cpu"), 48)[0] and sums.shape == (tk.MAX_ROWS * 48,)
    sums.fill_(1.5)
    semaphores.fill_(3)
    tk.zero_workspaces()
    assert not sums.any() and not semaphores.any()


def test_triton_tile_settings_are_checked(monkeypatch):
    """Tiles from ACTSCOPE_TRITON_TILES or set_tiles: unknown keys are refused, bad JSON is named
    in one warning and the defaults stay."""
    from actscope.sparsify import triton_kernel as tk

    with pytest.raises(ValueError, match="unknown tile settings"):
        tk.set_tiles(gemv=dict(BLOCK_M=4))
    before = dict(tk.GEMV)
    with pytest.raises(ValueError, match="BLOCK_N must be"):  # nothing changes when one part is bad
        tk.set_tiles(gemv=dict(BLOCK_N=256), dot=dict(BLOCK_N=8))
    assert tk.GEMV == before
    for bad in ("{not json", '{"GEMV": {"BLOCK_X": 1}}', '{"GEMV": {"BLOCK_N": 8}}', "[1]",
                '{"GEMV": {"BLOCK_N": 256}, "DOT": {"BLOCK_X": 1}}', '{"GEMV": [["BLOCK_N", 256]]}'):
        monkeypatch.setenv("ACTSCOPE_TRITON_TILES", bad)
        with pytest.warns(RuntimeWarning, match="ACTSCOPE_TRITON_TILES ignored"):
            tk._tiles_from_env()
        assert tk.GEMV == before
    monkeypatch.setenv("ACTSCOPE_TRITON_TILES", '{"GEMV": {"BLOCK_N": 128, "PREFETCH": true}}')
    try:
        tk._tiles_from_env()
        assert tk.GEMV == dict(before, BLOCK_N=128, PREFETCH=True)
    finally:
        tk.GEMV.update(before)
