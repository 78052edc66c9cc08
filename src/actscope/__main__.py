"""``python -m actscope`` (and ``torchrun -m actscope``) run the CLI."""

from .cli import main

main()
