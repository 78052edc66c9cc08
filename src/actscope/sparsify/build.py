"""``python -m actscope.sparsify.build``: compile the sparse CPU kernel now (``make install`` runs it).

A failed build is reported, not fatal: actscope then falls back to masked dense matmuls.
"""

from .kernel import _build_dir, cpu_kernel

if __name__ == "__main__":
    ok = cpu_kernel() is not None
    print(f"actscope sparse CPU kernel: {'built' if ok else 'NOT built (fallback: masked dense)'} in {_build_dir()}")
