"""The `ddpo` commands that need the trainer's stack (diffusers pipelines, Ray, the learner): train, tiny-models,
sample, eval, report, chaos, bench; `services.app.cli` dispatches here (and `ddpo serve` to the reward servers)."""

from __future__ import annotations

import argparse
import sys

from bench.cli import main as bench_main
from reward_servers.serve import KINDS as SERVER_KINDS
from services.app import chaos
from services.app.driver import main_from_args, write_tiny_models
from services.app.evaluate import run_eval
from services.app.sample import run_sample
from services.config import ConfigError
from services.report import write_report

DESCRIPTION = "The `ddpo` command line: train, serve, tiny-models, sample, eval, report, chaos, bench."


def _add_set_option(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run DDPO training (default preset: quickstart)")
    p.add_argument("--config", default="quickstart", help="preset name in configs/ or a path to a YAML file")
    _add_set_option(p, "override a config field, e.g. --set training.learning_rate=1e-4 (repeatable)")
    p.add_argument("--run-dir", default=None, help="run directory (default runs/<preset>-<timestamp>)")
    p.add_argument(
        "--resume", default=None, metavar="RUN_DIR", help="continue a run from its newest checkpoint"
    )


def _add_tiny_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tiny-models", help="write small random-weight models so every path runs offline")
    p.add_argument(
        "--out", required=True, help="output directory (gets sd/, llava/, aesthetic/, pickscore/, clipscore/)"
    )


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="render images with our sampler (image i uses seed S + i)")
    p.add_argument("--model", required=True, help="base pipeline: hub id or local directory")
    p.add_argument("--lora", default=None, help="diffusers-format LoRA: a directory or .safetensors file")
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--negative-prompt", default="", help="prompt of the unconditional CFG branch")
    p.add_argument("--n", type=int, default=4, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument(
        "--eta", type=float, default=0.0, help="DDIM eta, or the flow SDE noise level (0 = deterministic)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="dtype the base model runs in (float32 is exact; bfloat16/float16 are faster on GPUs)",
    )
    p.add_argument("--out", required=True, help="output directory")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="(re)compute the held-out evaluation of a run's checkpoints")
    p.add_argument("run_dir", help="run directory (with config.yaml and checkpoints/)")
    p.add_argument(
        "--checkpoint",
        action="extend",
        nargs="+",
        default=None,
        metavar="NAME",
        help="checkpoints to evaluate: epoch_NNNN or epoch numbers (default: all)",
    )
    _add_set_option(p, "override the run's config, e.g. --set evaluation.prompts='[a fox]' (repeatable)")


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write RUN_DIR/report.html: curves, evaluation grids, samples, config")
    p.add_argument("run_dir", help="run directory")


def main(argv: list[str]) -> None:
    """The commands after `services.app.cli.main` has set up logging and sent `ddpo serve` elsewhere."""
    if argv and argv[0] == "bench":
        # Benchmarks own their flags: ddpo bench {sampler,learner,data-plane,weights,e2e,latency-hiding,...}
        bench_main(argv[1:])
        return
    parser = argparse.ArgumentParser(prog="ddpo", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_tiny_models(sub)
    _add_sample(sub)
    _add_eval(sub)
    _add_report(sub)
    chaos.add_parser(sub, _add_set_option)
    kinds = ",".join(SERVER_KINDS)
    sub.add_parser("serve", help=f"run a reward server: ddpo serve {{{kinds}}} --help")
    sub.add_parser(
        "bench", help="benchmarks that print one JSON line: ddpo bench NAME [--preset tiny|sd15|sdxl|sd3]"
    )
    args = parser.parse_args(argv)
    # mistakes in what the user asked for end in one line and exit status 2; anything else keeps its traceback
    user_errors = (ConfigError,) if args.command in ("train", "chaos") else (ConfigError, FileNotFoundError)
    try:
        if args.command == "train":
            main_from_args(args)
        elif args.command == "tiny-models":
            write_tiny_models(args.out)
        elif args.command == "sample":
            for path in run_sample(args):
                print(path)
        elif args.command == "eval":
            for path in run_eval(args):
                print(path)
        elif args.command == "report":
            print(write_report(args.run_dir))
        elif args.command == "chaos":
            sys.exit(chaos.main_from_args(args))
    except user_errors as err:
        parser.exit(2, f"ddpo {args.command}: {err}\n")
