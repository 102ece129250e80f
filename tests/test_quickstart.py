"""The README's first command, as a user runs it: `ddpo train` with the quickstart preset in a fresh directory.

Checks what the acceptance lines ask of a quickstart run: the reward rises by a margin a person sees (the mean of
the last 3 epochs exceeds the first 3 epochs' by >= 2 per-sample standard deviations of those first epochs), the
held-out evaluation rises by >= 2 of its first standard deviations, no sampling work is thrown away, and the run
directory holds the grids, the evaluation strips, the curve, TensorBoard events, checkpoints and report.html.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

METRIC_KEYS = {"epoch", "policy_version", "reward_mean", "reward_std", "samples", "samples_per_s", "approx_kl",
               "clipfrac", "loss", "policy_lag_mean", "dropped_stale", "forged_trajectories",
               "forged_weights"}  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quickstart_learns_visibly_and_leaves_a_complete_run_directory(quickstart_run):
    run = quickstart_run  # `ddpo train` in a fresh directory, once per session (conftest.py)
    assert (
        run.parent / ".cache" / "tiny-models" / "sd" / "model_index.json"
    ).exists()  # written on first use
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = len(rows)
    assert [r["epoch"] for r in rows] == list(range(epochs)) and epochs >= 16
    # the training reward: an effect size a person sees, not a standard error
    first = np.mean([r["reward_mean"] for r in rows[:3]])
    last = np.mean([r["reward_mean"] for r in rows[-3:]])
    first_std = np.mean([r["reward_std"] for r in rows[:3]])
    assert last - first >= 2 * first_std, (first, last, first_std)
    # the held-out prompts, fixed seeds: the first and last evaluations
    evals = [r for r in rows if "eval/jpeg_compressibility_mean" in r]
    e0, e1 = evals[0], evals[-1]
    rise = e1["eval/jpeg_compressibility_mean"] - e0["eval/jpeg_compressibility_mean"]
    assert rise >= 2 * e0["eval/jpeg_compressibility_std"], (e0, e1)
    # no wasted samples: nothing dropped as stale; the balance of actors and learner is reported
    used = sum(r["samples"] for r in rows)
    dropped = sum(r["dropped_stale"] for r in rows)
    assert dropped / (used + dropped) <= 0.05
    assert all(0.0 <= r["actor_idle_frac"] <= 1.0 for r in rows[1:])
    assert all("clipfrac_lag0" in r and "dropped_stale_frac" in r for r in rows)
    # what a person looks at
    for name in ("config.yaml", "reward_curve.png", "report.html", "ledger.jsonl", "produced_ids.txt"):
        assert (run / name).exists(), name
    assert (run / "images" / "epoch_0000.png").exists() and (
        run / "images" / f"epoch_{epochs - 1:04d}.png"
    ).exists()
    assert (run / "images" / "eval_strips.png").exists()
    assert (run / "eval" / f"epoch_{epochs - 1:04d}.json").exists()
    report = (run / "report.html").read_text()
    assert "<h2>Reward curve" in report and 'src="data:image/png;base64,' in report  # the curve, embedded
    # the held-out images as strips: one row per prompt and seed, every evaluated epoch side by side
    assert 'class="strips"' in report
    first_eval, last_eval = f"epoch_{e0['epoch']:04d}", f"epoch_{e1['epoch']:04d}"
    row_start = report.index("a horse<br>seed 2024")
    row = report[row_start : report.index("</tr>", row_start)]
    assert f'src="eval/{first_eval}/00.png"' in row and f'src="eval/{last_eval}/00.png"' in row
    lora = run / "checkpoints" / f"epoch_{epochs - 1:04d}" / "lora" / "pytorch_lora_weights.safetensors"
    assert lora.exists()
    # TensorBoard events hold the metrics: read one scalar back and compare it with metrics.jsonl
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    events = acc.Scalars("reward_mean")
    assert [e.step for e in events] == list(range(epochs))
    assert events[-1].value == pytest.approx(rows[-1]["reward_mean"], rel=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_train_writes_the_run_directory(quickstart_run):
    """What `ddpo train` (the session's quickstart run, conftest.py) leaves: the config it ran, one metrics row per
    epoch with the documented keys, and a checkpoint every save_every epochs and after the last."""
    from services.config import load_config

    run = quickstart_run
    preset = load_config("quickstart")
    assert load_config(str(run / "config.yaml")) == preset  # the whole config, as the run saw it
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = list(range(preset.num_epochs))
    assert [r["epoch"] for r in rows] == epochs
    assert [r["policy_version"] for r in rows] == [e + 1 for e in epochs]
    assert all(set(r) >= METRIC_KEYS for r in rows)
    assert all(r["forged_trajectories"] == 0 and r["forged_weights"] == 0 for r in rows)  # only genuine data
    # the run secret the driver generated signs everything, and appears in no file the run writes for people
    secret = (run / "run_secret").read_text().strip()
    texts = [p for p in run.rglob("*") if p.suffix in {".yaml", ".json", ".jsonl", ".txt", ".log", ".html"}]
    assert texts and all(secret not in p.read_text(errors="replace") for p in texts)
    saved = [e for e in epochs if (e + 1) % preset.save_every == 0 or e + 1 == preset.num_epochs]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"epoch_{e:04d}" for e in saved]
