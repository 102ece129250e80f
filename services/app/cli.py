"""The `ddpo` command line: train, serve, tiny-models, sample, eval, report, chaos, bench."""

from __future__ import annotations

import logging
import sys


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if argv and argv[0] == "serve":
        # A reward server loads its own code only, not the trainer's stack (diffusers pipelines, Ray, the learner),
        # so `ddpo serve KIND` starts in a few seconds, not ten. Reward servers own their flags (and read
        # environment variables through pydantic-settings).
        from reward_servers.serve import main as serve_main  # lazily: see above

        serve_main(argv[1:])
        return
    # lazily: every other command needs the trainer's stack, which `ddpo serve` does not load
    from services.app.commands import main as commands_main

    commands_main(argv)


if __name__ == "__main__":
    main()
