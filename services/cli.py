"""The `ddpo` command line: train, serve, tiny-models."""

from __future__ import annotations

import argparse
import logging
import sys


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run DDPO training (default preset: quickstart)")
    p.add_argument("--config", default="quickstart", help="preset name in configs/ or a path to a YAML file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set training.learning_rate=1e-4 (repeatable)",
    )
    p.add_argument("--run-dir", default=None, help="run directory (default runs/<preset>-<timestamp>)")
    p.add_argument(
        "--resume", default=None, metavar="RUN_DIR", help="continue a run from its newest checkpoint"
    )


def _add_tiny_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tiny-models", help="write small random-weight models so every path runs offline")
    p.add_argument("--out", required=True, help="output directory (gets sd/, llava/, aesthetic/)")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if argv and argv[0] == "serve":
        # Reward servers own their flags (and read environment variables through pydantic-settings).
        from reward_servers.serve import main as serve_main

        serve_main(argv[1:])
        return
    parser = argparse.ArgumentParser(prog="ddpo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_tiny_models(sub)
    sub.add_parser("serve", help="run a reward server: ddpo serve {jpeg,aesthetic,llava,bertscore} --help")
    args = parser.parse_args(argv)
    if args.command == "train":
        from services.config import ConfigError
        from services.train import main_from_args

        try:
            main_from_args(args)
        except ConfigError as err:
            parser.exit(2, f"ddpo train: {err}\n")
    elif args.command == "tiny-models":
        from services.tiny_models import write_tiny_models

        write_tiny_models(args.out)


if __name__ == "__main__":
    main()
