"""`python -m prefetch_tune` runs the CLI."""

from prefetch_tune.cli import main

main()
