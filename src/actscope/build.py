"""``python -m actscope.build``: compile every C++ extension now (``make install`` runs it).

A failed build is reported, not fatal: the code that uses an extension then takes its torch path,
which gives the same numbers without the speed (``native.load_extension``).
"""

from __future__ import annotations


def main() -> None:
    from .sparsify.kernel import cpu_kernel, kernel_dir
    from .stats.fast import scan_kernel, scan_kernel_dir

    for what, kern, where in (("sparse CPU kernel", cpu_kernel, kernel_dir),
                              ("scan's passes", scan_kernel, scan_kernel_dir)):
        ok = kern() is not None
        print(f"actscope {what}: {'built' if ok else 'NOT built (fallback: torch ops)'} in {where()}")


if __name__ == "__main__":
    main()
