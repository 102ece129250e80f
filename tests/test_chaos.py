"""`ddpo chaos`: the audit of a run's books catches what it claims to, the fault schedule covers every kind, bad
input is refused before anything starts, and a 2-minute soak of `quickstart-alignment` under every kind of fault ends
with nothing lost, nothing used twice and every fault recovered. The soak is the suite's end-to-end run of the
prompt-alignment topology and of actor and learner crashes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from learner.checkpoint import save_checkpoint
from services.app import cli
from services.app.chaos import FAULTS, audit_run, fault_schedule, run_chaos
from services.app.driver import make_run_dir
from services.config import load_config


def write_books(run_dir: Path, epochs: int = 3, per_epoch: int = 4) -> None:
    """A consistent run directory: metrics and ledger rows per epoch, the id ledgers, one checkpoint."""
    ids = [f"t{i}" for i in range(epochs * per_epoch + 2)]
    with (run_dir / "metrics.jsonl").open("w") as m, (run_dir / "ledger.jsonl").open("w") as g:
        for e in range(epochs):
            m.write(json.dumps({"epoch": e, "policy_version": e + 1}) + "\n")
            used = ids[e * per_epoch : (e + 1) * per_epoch]
            g.write(json.dumps({"epoch": e, "used": used[:-1] if e == 1 else used,
                                "dropped_stale": used[-1:] if e == 1 else []}) + "\n")  # fmt: skip
    (run_dir / "produced_ids.txt").write_text("".join(i + "\n" for i in ids))
    (run_dir / "unused_ids.txt").write_text("".join(i + "\n" for i in ids[-2:]))
    save_checkpoint(run_dir, epochs - 1, {"epoch": epochs - 1})


def test_audit_passes_consistent_books(tmp_path):
    write_books(tmp_path)
    audit = audit_run(tmp_path)
    assert audit["failures"] == []
    assert (audit["produced"], audit["used"], audit["dropped"], audit["unused"]) == (14, 11, 1, 2)
    assert (audit["duplicated"], audit["lost"], audit["epochs"]) == (0, 0, 3)


def _use_twice(run_dir: Path) -> None:  # a trajectory used in two epochs
    ledger = run_dir / "ledger.jsonl"
    ledger.write_text(ledger.read_text().replace('"t4"', '"t0"'))


def _forget_unused(run_dir: Path) -> None:  # a produced trajectory that nobody accounts for
    (run_dir / "unused_ids.txt").write_text("t12\n")


def _row_twice(
    run_dir: Path,
) -> None:  # an epoch row written twice (a resumed learner kept a dead process's row)
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"epoch": 2, "policy_version": 3}) + "\n")


def _corrupt_checkpoint(run_dir: Path) -> None:
    (run_dir / "checkpoints" / "epoch_0002" / "tensors.safetensors").write_bytes(b"junk")


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (_use_twice, "used twice"),
        (_forget_unused, "neither used, dropped nor unused"),
        (_row_twice, "repeated: [2]"),
        (_corrupt_checkpoint, "epoch_0002 does not load"),
    ],
)
def test_audit_names_each_broken_book(tmp_path, edit, named):
    write_books(tmp_path)
    edit(tmp_path)
    failures = audit_run(tmp_path)["failures"]
    assert any(named in f for f in failures), failures


def test_audit_restores_the_learner_from_the_newest_checkpoint(tmp_path, tiny_train_config):
    write_books(tmp_path)  # its checkpoint holds no learner state
    failures = audit_run(tmp_path, tiny_train_config())["failures"]
    assert failures == ["the newest checkpoint epoch_0002 does not restore a learner: 'learner'"], failures


def test_fault_schedule_is_seeded_and_covers_every_kind_each_round():
    a, b = fault_schedule(FAULTS, random.Random(7)), fault_schedule(FAULTS, random.Random(7))
    first = [next(a) for _ in range(3 * len(FAULTS))]
    assert first == [next(b) for _ in range(3 * len(FAULTS))]
    for k in range(3):
        assert sorted(first[k * len(FAULTS) : (k + 1) * len(FAULTS)]) == sorted(FAULTS)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--set", "cluster.in_process=true"], "cluster.in_process"),
        (["--set", "cluster.num_learners=2"], "cluster.num_learners"),
        (["--minutes", "0"], "--minutes"),
    ],
)
def test_chaos_refuses_bad_input_by_name_before_anything_starts(tmp_path, capsys, args, named):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["chaos", "--run-dir", str(run_dir), *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.startswith("ddpo chaos: ") and named in err and len(err.strip().splitlines()) == 1
    assert not run_dir.exists()


@pytest.mark.slow  # about 3 minutes: two minutes of faults, then the run's end and the audit
@pytest.mark.timeout(1200)
@pytest.mark.usefixtures("local_ray")  # the session's Ray (conftest.py): the soak's run joins it
def test_two_minute_soak_loses_nothing_and_recovers_from_every_fault(tiny_models, tmp_path):
    """`quickstart-alignment` (two sampling actors, the tiny LLaVA and the real MiniLM BERTScore over HTTP) for two
    minutes of faults of every kind. A checkpoint every second epoch: a learner killed after an epoch's row and before
    its checkpoint replays that epoch from the un-acknowledged entries (the audit would see its row twice)."""
    cfg = load_config(
        "quickstart-alignment",
        [
            f"model.pretrained={tiny_models / 'sd'}",
            f"reward.servers.llava.model={tiny_models / 'llava'}",
            "evaluation.every=0",
            "logging.images_per_epoch=0",
            "save_every=2",
            "save_keep_last=3",
        ],
    )
    run_dir = make_run_dir(cfg, str(tmp_path / "run"))
    summary = run_chaos(cfg, run_dir, minutes=2.0, seed=0)
    print(json.dumps(summary))
    assert summary["failures"] == [] and summary["ok"]
    assert summary["faults"] == summary["recovered"]
    assert all(summary["faults"][kind] >= 1 for kind in FAULTS), summary["faults"]
    assert summary["lost"] == summary["duplicated"] == 0
    assert summary["used"] + summary["dropped"] + summary["unused"] == summary["produced"] > 0
    assert summary["checkpoints"] == 3  # save_keep_last
    # the restarted Redis replayed its append-only file: the run's stream survived it
    assert any((run_dir / "chaos-redis").glob("appendonly*"))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # BERTScore recall of cosine similarities: within [-1, 1], and MiniLM's are positive in practice
    assert all(0.0 < r["reward_mean"] <= 1.0 and r["samples"] == cfg.samples_per_epoch for r in rows)
    ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    assert {a for r in ledger for a in r["actors"]} == {"sampler-0", "sampler-1"}
