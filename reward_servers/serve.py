"""`ddpo serve {jpeg,aesthetic,llava,bertscore,pickscore,clipscore} [flags]`: run one reward server under uvicorn.

Every flag is also an environment variable with the prefix DDPO_REWARD_ (`--max-batch-size 8` or
`DDPO_REWARD_MAX_BATCH_SIZE=8`); flags win. The bearer token comes only from DDPO_REWARD_AUTH_TOKEN, so that it never
shows in a process list. Also runnable as `python -m reward_servers.serve KIND [flags]`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from reward_servers import aesthetic, bertscore, clip_similarity, jpeg, llava
from reward_servers.kit.settings import ENV_PREFIX, ServerSettings

logger = logging.getLogger(__name__)

ENV_ONLY_FIELDS = frozenset({"auth_token"})


@dataclass(frozen=True)
class ServerKind:
    settings_cls: type[ServerSettings]
    create_app: Callable[[Any], FastAPI]
    help: str


KINDS: dict[str, ServerKind] = {
    "jpeg": ServerKind(jpeg.JpegSettings, jpeg.create_app, "JPEG size in kB and compressibility (-kB)"),
    "aesthetic": ServerKind(aesthetic.AestheticSettings, aesthetic.create_app, "LAION aesthetic predictor"),
    "llava": ServerKind(llava.LlavaSettings, llava.create_app, "LLaVA answers to questions about images"),
    "bertscore": ServerKind(bertscore.BertScoreSettings, bertscore.create_app, "BERTScore of text pairs"),
    "pickscore": ServerKind(
        clip_similarity.PickScoreSettings,
        clip_similarity.create_pickscore_app,
        "PickScore of images for their prompts (human preference)",
    ),
    "clipscore": ServerKind(
        clip_similarity.ClipScoreSettings,
        clip_similarity.create_clipscore_app,
        "CLIPScore of images for their prompts (2.5 * max(cos, 0))",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per server kind, one flag per settings field (values are validated by the settings)."""
    parser = argparse.ArgumentParser(prog="ddpo serve", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True, metavar="{" + ",".join(KINDS) + "}")
    for name, kind in KINDS.items():
        p = sub.add_parser(name, help=kind.help, description=kind.help)
        for field_name, info in kind.settings_cls.model_fields.items():
            if field_name in ENV_ONLY_FIELDS:
                continue
            default = "required" if info.is_required() else f"default: {info.default}"
            p.add_argument(
                "--" + field_name.replace("_", "-"),
                dest=field_name,
                default=argparse.SUPPRESS,  # absent flags leave the field to the environment and the default
                metavar=field_name.upper(),
                help=f"{info.description} ({default}; env {ENV_PREFIX}{field_name.upper()})",
            )
    return parser


def parse_args(argv: list[str]) -> tuple[ServerKind, ServerSettings]:
    """The server kind that `argv` names and its settings: flags over environment over defaults. Exits 2 on bad
    values."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    kind = KINDS[args.pop("kind")]
    try:
        return kind, kind.settings_cls(**args)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        parser.error(problems)
        raise  # unreachable: parser.error exits


def main(argv: list[str] | None = None) -> None:
    """Parse flags, build the app and serve it until interrupted; exit 1 if the model fails to load."""
    argv = list(sys.argv[1:] if argv is None else argv)
    kind, settings = parse_args(argv)
    if not logging.getLogger().handlers:  # `ddpo serve` has configured logging already
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(settings.log_level.upper())
    app = kind.create_app(settings)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            access_log=settings.access_log,
            timeout_graceful_shutdown=10,
        )
    )

    def stop_on_load_failure() -> None:
        server.should_exit = True

    app.state.on_load_failure = stop_on_load_failure
    server.run()
    if app.state.load_error is not None:
        logger.error("exiting: %s", app.state.load_error)
        sys.exit(1)


if __name__ == "__main__":
    main()
