"""`ddpo bench objectives`: what the techniques beyond the paper buy on the CPU quickstart, measured with seeds.

Each arm is the quickstart (`configs/quickstart.yaml`, the README's `ddpo train`) with a few `--set` overrides, run
`--seeds` times (seeds 0, 1, ...) for the same number of epochs, i.e. the same budget of trained samples. Per run:
the training reward against samples consumed (trained + dropped as stale), the mean reward of the last 3 epochs,
the held-out evaluation of the last epoch and the KL to the base model (logged in every arm: `logging.kl_to_base`).
Per arm: mean +- standard error over seeds, and the difference to the baseline with z = diff / sqrt(se_a^2 + se_b^2);
|z| > 2 is reported as exceeding the run-to-run noise. One JSON line per arm, a plot of every arm's reward curve
(mean over seeds) against samples consumed, and a summary line.

Runs already finished in --out are read back, not rerun (so an interrupted study continues where it stopped).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

ARMS: dict[str, list[str]] = {
    "baseline": [],  # DDPO-IS, the per-prompt tracker, synchronous (max_policy_lag 0)
    "groups4": ["sampling.group_size=4", "stat_tracking.mode=group"],
    "kl": ["training.kl_coef=1.0"],
    "kl_small": ["training.kl_coef=0.01"],
    "window3": ["sampling.sde_window=[2,5]"],
    "cfgfree": ["sampling.guidance_scale=1", "training.cfg=false"],
    "lag1": ["cluster.max_policy_lag=1"],
    "lag2": ["cluster.max_policy_lag=2"],
}
COMMON = ["logging.kl_to_base=true", "logging.images_per_epoch=0"]
LAST = 3  # epochs averaged for the final training reward


def run_dir(out: Path, arm: str, seed: int) -> Path:
    return out / "runs" / f"{arm}-s{seed}"


def read_rows(path: Path) -> list[dict]:
    metrics = path / "metrics.jsonl"
    if not metrics.exists():
        return []
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def train(out: Path, arm: str, seed: int, epochs: int) -> list[dict]:
    """One quickstart run of the arm (skipped when its run directory already holds `epochs` rows)."""
    directory = run_dir(out, arm, seed)
    rows = read_rows(directory)
    if len(rows) >= epochs:
        return rows
    if directory.exists():  # an interrupted run: start it again from scratch (same seed, same budget)
        shutil.rmtree(directory)
    sets = [f"seed={seed}", f"num_epochs={epochs}", f"evaluation.every={epochs}", *COMMON, *ARMS[arm]]
    cmd = [
        sys.executable,
        "-m",
        "services.app.cli",
        "train",
        "--config",
        "quickstart",
        "--run-dir",
        str(directory),
    ]
    cmd += [arg for s in sets for arg in ("--set", s)]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    log = directory.parent / f"{arm}-s{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, env=env)
    return read_rows(directory)


def summarise_run(rows: list[dict]) -> dict:
    consumed, curve = 0, []
    for row in rows:
        consumed += int(row["samples"]) + int(row.get("dropped_stale", 0))
        curve.append((consumed, float(row["reward_mean"])))
    evals = [r for r in rows if "eval/jpeg_compressibility_mean" in r]
    kls = [r["kl_to_base"] for r in rows[-LAST:] if r.get("kl_to_base") is not None]
    return {
        "final_reward": sum(r["reward_mean"] for r in rows[-LAST:]) / min(LAST, len(rows)),
        "first_reward": sum(r["reward_mean"] for r in rows[:LAST]) / min(LAST, len(rows)),
        "eval": evals[-1]["eval/jpeg_compressibility_mean"] if evals else None,
        "kl_to_base": sum(kls) / len(kls) if kls else None,
        "consumed": consumed,
        "curve": curve,
    }


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def compare(arm: dict, base: dict, key: str) -> dict:
    diff = arm[f"{key}_mean"] - base[f"{key}_mean"]
    se = math.sqrt(arm[f"{key}_se"] ** 2 + base[f"{key}_se"] ** 2)
    z = diff / se if se > 0 else float("nan")
    return {f"{key}_diff": diff, f"{key}_z": z, f"{key}_exceeds_noise": bool(abs(z) > 2)}


def plot(out: Path, curves: dict[str, list[list[tuple[int, float]]]]) -> Path:
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    for arm, runs in curves.items():
        n = min(len(c) for c in runs)
        xs = [sum(c[i][0] for c in runs) / len(runs) for i in range(n)]
        ys = [sum(c[i][1] for c in runs) / len(runs) for i in range(n)]
        ax.plot(xs, ys, label=f"{arm} (n={len(runs)})", marker="o", markersize=2)
    ax.set_xlabel("samples consumed (trained + dropped as stale)")
    ax.set_ylabel("training reward: -kB of JPEG (mean over seeds)")
    ax.set_title("CPU quickstart: DDPO-IS and the techniques beyond the paper")
    ax.legend()
    ax.grid(alpha=0.3)
    path = out / "objectives.png"
    FigureCanvasAgg(fig).print_figure(str(path), dpi=110, bbox_inches="tight")
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="ddpo bench objectives", description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--seeds", type=int, default=3, help="runs per arm (seeds 0..N-1)")
    parser.add_argument(
        "--epochs", type=int, default=16, help="epochs per run (the same budget for every arm)"
    )
    parser.add_argument("--out", default="bench-objectives", help="directory for runs, plot and results")
    args = parser.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"--arms: unknown arm(s) {unknown}; known: {', '.join(ARMS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    curves: dict[str, list] = {}
    for arm in arms:
        runs = [summarise_run(train(out, arm, seed, args.epochs)) for seed in range(args.seeds)]
        curves[arm] = [r["curve"] for r in runs]
        result: dict = {"bench": "objectives", "arm": arm, "overrides": ARMS[arm], "seeds": args.seeds,
                        "epochs": args.epochs, "consumed": sum(r["consumed"] for r in runs) / len(runs)}  # fmt: skip
        for key in ("first_reward", "final_reward", "eval", "kl_to_base"):
            values = [r[key] for r in runs if r[key] is not None]
            if values:
                result[f"{key}_mean"], result[f"{key}_se"] = mean_se(values)
        if arm != "baseline" and "baseline" in results:
            for key in ("final_reward", "eval", "kl_to_base"):
                if f"{key}_mean" in result and f"{key}_mean" in results["baseline"]:
                    result.update(compare(result, results["baseline"], key))
        results[arm] = result
        print(json.dumps(result), flush=True)
    figure = plot(out, curves)
    summary = {"bench": "objectives", "plot": str(figure), "arms": list(results)}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(summary), flush=True)
    return results


if __name__ == "__main__":
    main()
