"""The README's first command, as a user runs it: `ddpo train` with the quickstart preset in a fresh directory.

Checks what the acceptance lines ask of a quickstart run: the reward rises by more than the first epoch's
standard error, and the run directory holds the grids, the curve, TensorBoard events, checkpoints with a
diffusers LoRA, and report.html.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


@pytest.mark.timeout(900)
def test_quickstart_learns_and_leaves_a_complete_run_directory(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "services.cli", "train", "--run-dir", str(run)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=840)  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    assert (tmp_path / ".cache" / "tiny-models" / "sd" / "model_index.json").exists()  # written on first use
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(16))
    first, last = rows[0], rows[-1]
    margin = first["reward_std"] / math.sqrt(first["samples"])
    assert last["reward_mean"] - first["reward_mean"] > margin, (first, last)
    # what a person looks at
    for name in ("config.yaml", "reward_curve.png", "report.html", "ledger.jsonl", "produced_ids.txt"):
        assert (run / name).exists(), name
    assert (run / "images" / "epoch_0000.png").exists() and (run / "images" / "epoch_0015.png").exists()
    assert (run / "images" / "eval_epoch_0003.png").exists() and (run / "eval" / "epoch_0015.json").exists()
    assert "eval/jpeg_compressibility_mean" in rows[3]
    report = (run / "report.html").read_text()
    assert "<h2>Reward curve" in report and 'src="data:image/png;base64,' in report  # the curve, embedded
    assert 'src="images/eval_epoch_0015.png"' in report and "images/epoch_0015.png" in report
    lora = run / "checkpoints" / "epoch_0015" / "lora" / "pytorch_lora_weights.safetensors"
    assert lora.exists()
    # TensorBoard events hold the metrics: read one scalar back and compare it with metrics.jsonl
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    events = acc.Scalars("reward_mean")
    assert [e.step for e in events] == list(range(16))
    assert events[-1].value == pytest.approx(last["reward_mean"], rel=1e-6)
