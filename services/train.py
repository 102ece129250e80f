"""`python -m services.train [--config ...] [--set ...]`: the training driver as a module, e.g. for
`ray job submit -- python -m services.train --config compressibility` (the same as `ddpo train`).

A documented entry point kept at this path; the driver itself is `services.app.driver`.
"""

from __future__ import annotations

import sys

from services.app.cli import main as cli_main


def main(argv: list[str] | None = None) -> None:
    cli_main(["train", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    main()
