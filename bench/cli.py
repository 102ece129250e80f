"""`ddpo bench NAME [--preset tiny|sd15|sdxl|sd3] [flags...]`: run one benchmark, which prints one JSON line.

    from bench.cli import run_bench
    run_bench("sampler", ["--preset", "tiny"])     # returns the benchmark's result (a dict, or None)

Each benchmark is a module of this package with `main(argv)`; its own `--help` lists its flags. `--preset` is
passed on to the benchmarks that have sizes; `weights` (always an SD 1.5-sized LoRA) and `reward-server` (sized by
its own flags) accept it and ignore it, so that one command line can run every benchmark at one preset.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple


class Bench(NamedTuple):
    module: str  # bench.<module> with main(argv)
    takes_preset: bool  # whether its main() parses --preset tiny|sd15
    about: str


BENCHES: dict[str, Bench] = {
    "sampler": Bench("sampler", True, "recording sampling loop vs bare CFG UNet loop; fast path vs eager"),
    "learner": Bench("learner", True, "Learner.train_epoch trained samples/s, fast path vs eager"),
    "data-plane": Bench("data_plane", True, "trajectories through the Redis stream vs raw XADD/XREADGROUP"),
    "weights": Bench("weights", False, "LoRA publish-to-applied latency, p50/p99"),
    "e2e": Bench("e2e", True, "trained samples/s of a short distributed run vs the in-process loop"),
    "latency-hiding": Bench("latency_hiding", False, "actor sampling rate with a +1 s reward server vs none"),
    "reward-server": Bench("reward_server", False, "reward-server throughput, batching on vs off"),
    "objectives": Bench(
        "objectives",
        False,
        "quickstart reward per arm (groups, KL, window, CFG-free, lag 0/1/2), 3 seeds, mean +- SE",
    ),
    "precision": Bench(
        "precision", True, "LoRA gradient of a float16/bfloat16 base vs float32 at SD 1.5 shapes"
    ),
}
PRESETS = ("tiny", "sd15", "sdxl", "sd3")


def _without_preset(argv: list[str]) -> list[str]:
    """argv minus `--preset X` / `--preset=X` (for benchmarks that have one size)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--preset":
            skip = True
        elif not arg.startswith("--preset="):
            out.append(arg)
    return out


def run_bench(name: str, argv: list[str] | None = None) -> dict | None:
    """Run benchmark `name` (a key of BENCHES) with its command-line flags; returns what its main() returns."""
    if name not in BENCHES:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHES)}")
    bench = BENCHES[name]
    argv = list(argv or [])
    if not bench.takes_preset:
        argv = _without_preset(argv)
    module = importlib.import_module(f"bench.{bench.module}")
    return module.main(argv)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="ddpo bench",
        description=__doc__.splitlines()[0],
        epilog="\n".join(f"  {n:15s} {b.about}" for n, b in BENCHES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", choices=list(BENCHES), help="benchmark to run")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own flags (see NAME --help)")
    args = parser.parse_args(argv)
    run_bench(args.name, args.args)


if __name__ == "__main__":
    main()
