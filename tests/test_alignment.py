"""`quickstart-alignment`: the paper's prompt-alignment topology end to end on the CPU: two sampling actors, a tiny
LLaVA server and a BERTScore server (real MiniLM) spawned as HTTP processes, the learner on Ray."""

from __future__ import annotations

import json

import pytest

from services.app.driver import make_run_dir, run_distributed
from services.config import load_config


@pytest.mark.timeout(900)
@pytest.mark.usefixtures("local_ray")  # the session's Ray (conftest.py): the run joins it
def test_quickstart_alignment_runs_two_epochs_through_both_servers(tiny_models, tmp_path):
    tiny_sd_path, llava = tiny_models / "sd", tiny_models / "llava"
    cfg = load_config(
        "quickstart-alignment",
        [f"model.pretrained={tiny_sd_path}", f"reward.servers.llava.model={llava}", "evaluation.every=0"],
    )
    assert cfg.num_epochs == 2 and cfg.cluster.num_sampler_actors == 2
    run_dir = make_run_dir(cfg, str(tmp_path / "run"))
    rows = run_distributed(cfg, run_dir, progress=False)
    assert [r["epoch"] for r in rows] == [0, 1]
    for row in rows:
        assert row["samples"] == cfg.samples_per_epoch
        # BERTScore recall of cosine similarities: within [-1, 1], and MiniLM's are positive in practice
        assert 0.0 < row["reward_mean"] <= 1.0
    ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    used = [i for r in ledger for i in r["used"]]
    assert len(used) == len(set(used)) == 2 * cfg.samples_per_epoch
    # both servers were spawned on loopback and answered
    for kind in ("llava", "bertscore"):
        log = (run_dir / "logs" / f"reward-{kind}.log").read_text()
        assert "Traceback" not in log
    produced = set((run_dir / "produced_ids.txt").read_text().split())
    assert produced >= set(used)
    actors = {a for r in ledger for a in r["actors"]}
    assert actors == {"sampler-0", "sampler-1"}, f"samples came from {actors}"
