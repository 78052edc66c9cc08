"""Make the running environment hold exactly the packages of a lock file (like pip-sync).

Run with the environment's own Python: ``.venv/bin/python requirements/sync.py requirements/lock.txt``.
Installs every pinned line with ``--no-deps`` (the lock is already a full resolution, including the
peers whose own pins we skip), then removes what the lock does not name, so a package dropped from
the lock cannot linger and hide a missing dependency. actscope itself is installed editable after.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata

KEEP = {"actscope"}  # installed editable from the checkout, never from the lock


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(lock: str) -> None:
    pinned = set()
    for line in open(lock, encoding="utf-8"):
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            pinned.add(_norm(re.split(r"[=<>!~ ;\[]", line, maxsplit=1)[0]))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "--no-deps", "-r", lock], check=True)
    extra = sorted({_norm(d.metadata["Name"]) for d in metadata.distributions()} - pinned - KEEP)
    if extra:
        print("removing packages the lock does not name:", " ".join(extra))
        subprocess.run([*pip, "uninstall", "-y", *extra], check=True)


if __name__ == "__main__":
    main(sys.argv[1])
