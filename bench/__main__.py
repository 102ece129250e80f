"""`python -m bench NAME [flags]`: the same as `ddpo bench NAME [flags]` (see bench.cli)."""

from bench.cli import main

main()
