"""Only the learner can publish weights, only actors can produce trajectories: forgeries written straight into the
real Redis at 127.0.0.1:6379 are refused (weights by a subscriber, trajectories by the learner's StreamSource), while
genuine ones go through; and a short distributed run survives both, counting them in metrics.jsonl (the same run,
at lag 0 with two actors and two learner ranks, is the check that such a run is synchronous and on-policy)."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path

import pytest
import redis
import torch
from test_distributed import REDIS_URL, check_ledger, dist_config, redis_keys_cleanup  # noqa: F401 (a fixture)

from learner.loop import StreamSource
from services.app.driver import RUN_SECRET_FILE, make_run_dir, run_distributed
from services.keys import RunKeys
from services.signing import RUN_SECRET_ENV, RunSigner, new_run_secret
from services.streams import MAC_FIELD, PAYLOAD_FIELD, TrajectoryStream, WeightChannel, WeightSubscriber
from services.trajectory import ScoredTrajectory, encode_tensors, encode_trajectory

SECRET = new_run_secret()


def lora_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "unet.a.lora_A.weight": torch.randn(4, 8, generator=g),
        "unet.a.lora_B.weight": torch.randn(8, 4, generator=g),
    }


def traj(i: int, version: int = 0) -> ScoredTrajectory:
    return ScoredTrajectory(latents=torch.zeros(3, 4, 2, 2), log_probs=torch.zeros(2), timesteps=torch.arange(2),
                            prompt="p", reward=float(i), policy_version=version, trajectory_id=f"t{i}")  # fmt: skip


def forge_weights(client: redis.Redis, run_id: str, version: int, state: dict[str, torch.Tensor]) -> None:
    """What an attacker with write access to Redis does: a well-formed next publication (right sha256, next seq)
    with a MAC made under a key that is not the run's."""
    keys = RunKeys(run_id)
    blob = encode_tensors(state, {"version": version})
    sha = hashlib.sha256(blob).hexdigest()
    seq = int(client.get(keys.weights_seq) or 0) + 1
    mac = RunSigner("not the run secret", run_id).weights_mac(seq, version, False, sha)
    client.hset(keys.weights, mapping={"version": version, "sha256": sha, "blob": blob, "seq": seq, "mac": mac,
                                       "rollback": "0"})  # fmt: skip
    client.set(keys.weights_version, version)
    client.set(keys.weights_seq, seq)
    client.publish(keys.weights_notify, str(version))


# ---- the signatures themselves ---------------------------------------------------------------------------------------
def test_macs_bind_secret_run_and_every_signed_field():
    signer = RunSigner(SECRET, "run-a")
    mac = signer.weights_mac(3, 2, False, "ab" * 32)
    assert signer.verify_weights(3, 2, False, "ab" * 32, mac)
    assert len(mac) == 64  # hex of HMAC-SHA256
    for seq, version, rollback, sha in [(4, 2, False, "ab" * 32), (3, 1, False, "ab" * 32),
                                        (3, 2, True, "ab" * 32), (3, 2, False, "cd" * 32)]:  # fmt: skip
        assert not signer.verify_weights(seq, version, rollback, sha, mac)
    assert not RunSigner(SECRET, "run-b").verify_weights(3, 2, False, "ab" * 32, mac)  # another run
    assert not RunSigner(new_run_secret(), "run-a").verify_weights(3, 2, False, "ab" * 32, mac)
    assert not signer.verify_weights(3, 2, False, "ab" * 32, None)
    tmac = signer.trajectory_mac(b"t1", b"payload")
    assert signer.verify_trajectory(b"t1", b"payload", tmac)
    assert not signer.verify_trajectory(b"t2", b"payload", tmac) and not signer.verify_trajectory(
        b"t1", b"payloaD", tmac
    )
    # framing: moving a byte from one part to the next changes the message
    assert signer.trajectory_mac(b"t1p", b"ayload") != tmac


def test_signer_comes_from_the_argument_or_the_environment(monkeypatch):
    monkeypatch.delenv(RUN_SECRET_ENV, raising=False)
    assert RunSigner.for_run("r") is None  # signing off: unit tests, in-process runs
    monkeypatch.setenv(RUN_SECRET_ENV, SECRET)
    from_env = RunSigner.for_run("r")
    assert from_env is not None and RunSigner(SECRET, "r").trajectory_mac(
        b"t", b"p"
    ) == from_env.trajectory_mac(b"t", b"p")
    assert RunSigner.for_run("r", "other").trajectory_mac(b"t", b"p") != from_env.trajectory_mac(b"t", b"p")


# ---- weights ---------------------------------------------------------------------------------------------------------
def test_forged_weights_are_refused_and_the_next_genuine_version_applied(r, run_id, caplog):
    signer = RunSigner(SECRET, run_id)
    learner = WeightChannel(r, run_id, signer=signer)
    actor = WeightSubscriber(WeightChannel(r, run_id, signer=signer))
    learner.publish(1, lora_state(1))
    assert actor.poll()[0] == 1
    forge_weights(r, run_id, 2, lora_state(666))
    with caplog.at_level(logging.WARNING, logger="services.streams"):
        assert actor.poll() is None and actor.poll() is None  # refused, and not fetched or counted again
        assert actor.wait(timeout_s=0.3, poll_s=0.05) is None  # nothing genuine: waits out its timeout
    assert actor.version == 1 and actor.forged == 1
    assert learner.forged_count() == 1  # weights:forged, which the learner's metrics read
    assert sum("refusing a weights publication" in m for m in caplog.messages) == 1
    # the learner publishes over the forgery (its version check ignores an unverified stored version)
    learner.publish(2, lora_state(2))
    version, state = actor.poll()
    assert version == 2
    torch.testing.assert_close(state, lora_state(2))


def test_tampered_blob_under_a_copied_signature_is_refused(r, run_id):
    signer = RunSigner(SECRET, run_id)
    learner = WeightChannel(r, run_id, signer=signer)
    actor = WeightSubscriber(WeightChannel(r, run_id, signer=signer))
    learner.publish(1, lora_state(1))
    # keep the learner's seq, version, sha256 and mac; swap the blob (its own version in the metadata, well-formed)
    r.hset(learner.key, "blob", encode_tensors(lora_state(666), {"version": 1}))
    assert actor.poll() is None and actor.forged == 1
    # or raise the version under the copied mac
    learner.publish(2, lora_state(2))
    r.hset(learner.key, "version", "3")
    r.set(learner.seq_key, int(r.get(learner.seq_key)) + 1)
    assert actor.poll() is None and actor.forged == 2 and actor.version == -1


def test_unsigned_channel_and_subscriber_still_work_without_a_secret(r, run_id):
    ch = WeightChannel(r, run_id)
    sub = WeightSubscriber(WeightChannel(r, run_id))
    ch.publish(1, lora_state(1))
    assert sub.poll()[0] == 1 and b"mac" not in r.hgetall(ch.key)


# ---- trajectories ----------------------------------------------------------------------------------------------------
def test_forged_trajectories_are_dropped_by_the_learner_and_genuine_ones_used(r, run_id, tiny_train_config):
    cfg = tiny_train_config(sampling={"batch_size": 2, "num_batches_per_epoch": 2})
    signer = RunSigner(SECRET, run_id)
    actor = TrajectoryStream(r, run_id, record_produced=True, signer=signer)
    learner_stream = TrajectoryStream(r, run_id, signer=signer)
    source = StreamSource(cfg, r, run_id, learner_stream)
    source.open_version(0)
    actor.add_many([traj(0), traj(1)])
    # a forgery with no MAC, one under another key, and a tampered payload (reward 1e6) under a copied MAC
    genuine = r.xrange(actor.key)[0][1]
    r.xadd(actor.key, {PAYLOAD_FIELD: encode_trajectory(traj(90)), b"trajectory_id": b"t90"})
    forged = encode_trajectory(traj(91))
    r.xadd(actor.key, {PAYLOAD_FIELD: forged, b"trajectory_id": b"t91",
                       MAC_FIELD: RunSigner("guess", run_id).trajectory_mac(b"t91", forged)})  # fmt: skip
    tampered = traj(0)
    tampered.reward, tampered.trajectory_id = 1e6, "t92"
    r.xadd(actor.key, {PAYLOAD_FIELD: encode_trajectory(tampered), b"trajectory_id": genuine[b"trajectory_id"],
                       MAC_FIELD: genuine[MAC_FIELD]})  # fmt: skip
    assert sorted(actor.remaining_ids()) == ["t0", "t1"]  # forgeries are never part of the ledger
    actor.add_many([traj(2), traj(3)])
    got = source.collect(4, version=0)
    assert sorted(t.trajectory_id for t in got.batch) == ["t0", "t1", "t2", "t3"]
    assert got.forged_trajectories == 3 and max(t.reward for t in got.batch) == 3.0
    assert source.consumed == 4  # forged entries are no consumed samples: the quota stays exact
    assert len(r.xrange(learner_stream.dead_letter_key)) == 3
    assert (
        r.xlen(actor.key) == 4
    )  # the forgeries are acknowledged and gone; the genuine ones wait for the checkpoint
    source.ack(got.ack_ids)
    assert r.xlen(actor.key) == 0
    assert got.forged_weights == 0
    r.incr(RunKeys(run_id).weights_forged, 2)  # two actors refused a forged version
    actor.add_many([traj(4), traj(5), traj(6), traj(7)])
    assert source.collect(4, version=0).forged_weights == 2


# ---- a distributed run under attack ----------------------------------------------------------------------------------
class Forger(threading.Thread):
    """Once the run has written a metrics row: one forged trajectory into its stream and one forged weights version
    onto its channel, written straight into Redis."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(daemon=True)
        self.run_dir = run_dir
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            metrics = self.run_dir / "metrics.jsonl"
            deadline = time.monotonic() + 600
            while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
                assert time.monotonic() < deadline, "the run wrote no metrics row"
                time.sleep(0.2)
            run_id = json.loads((self.run_dir / "run.json").read_text())["run_id"]
            client = redis.Redis.from_url(REDIS_URL)
            keys = RunKeys(run_id)
            version = int(client.get(keys.weights_version))
            for _ in range(3):  # again if the learner published over it before an actor looked
                forge_weights(client, run_id, version + 1, {})
                forged_seq = int(client.get(keys.weights_seq))
                while (
                    not client.get(keys.weights_forged)
                    and int(client.get(keys.weights_seq) or 0) == forged_seq
                ):
                    time.sleep(0.05)
                if client.get(keys.weights_forged):
                    break
            bogus = traj(0, version=version)
            bogus.reward, bogus.trajectory_id = 1e6, "forged-trajectory"
            client.xadd(keys.trajectories, {PAYLOAD_FIELD: encode_trajectory(bogus),
                                            b"trajectory_id": b"forged-trajectory", MAC_FIELD: b"0" * 64})  # fmt: skip
        except BaseException as e:  # surfaced by the test
            self.error = e
        finally:
            self.done.set()


@pytest.mark.timeout(600)
@pytest.mark.usefixtures("local_ray")
def test_a_lag_zero_run_of_two_actors_and_two_learner_ranks_is_on_policy_and_refuses_forgeries(
    tiny_sd_path,
    tmp_path,
    redis_keys_cleanup,  # noqa: F811 (the fixture imported above)
    monkeypatch,
):
    """One distributed run for two checks. max_policy_lag 0 with two sampling actors and cluster.num_learners 2 (a
    gloo group of Ray actors; rank 0 streams, publishes and checkpoints): every update trains on samples of the
    current version only, the first inner step's importance ratio is 1 (within 1e-4), and the quota makes production
    exact (nothing stale, nothing unused). Forgeries written into its Redis after the first row: refused and counted,
    the run goes on. Lag 0 also makes the forgeries land: the epochs after the first row sample only after they are
    in, so the learner reads the forged entry before the run ends, and an actor waits for the next version (seeing
    the forged one) while the learner trains."""
    monkeypatch.delenv(RUN_SECRET_ENV, raising=False)  # the driver generates the run's secret
    cfg = dist_config(
        tiny_sd_path,
        num_epochs=3,
        training={"gradient_accumulation_steps": 2},  # one optimizer step per epoch
        # no actor fails here: the starvation re-opening (10 s in dist_config) would let a loaded machine's slow
        # actor start-up claim an extra batch that later arrives stale
        cluster={"max_policy_lag": 0, "num_sampler_actors": 2, "num_learners": 2, "lag0_starvation_s": 600},
    )
    run_dir = make_run_dir(cfg, str(tmp_path / "run"))
    redis_keys_cleanup.append(run_dir)
    forger = Forger(run_dir)
    forger.start()
    rows = run_distributed(cfg, run_dir, progress=False)
    assert forger.done.wait(5) and forger.error is None, forger.error
    ids = check_ledger(run_dir, cfg.num_epochs)
    # synchronous and on-policy
    for row in rows:
        assert row["policy_lag_max"] == 0 and row["dropped_stale"] == 0
        assert abs(row["ratio_first_step"] - 1.0) < 1e-4
        assert row["clipfrac"] == 0.0  # one optimizer step: every trained step saw the sampling weights
        assert row["learner_ranks"] == 2
    assert len(ids["used"]) == cfg.samples_per_epoch * cfg.num_epochs
    assert len(ids["dropped"]) == 0
    assert (run_dir / "checkpoints" / "epoch_0002").exists()
    # the forgeries: refused and counted; the forged trajectory is not in produced, used, dropped or unused
    assert "forged-trajectory" not in ids["produced"] + ids["used"] + ids["unused"]
    assert sum(row["forged_trajectories"] for row in rows) >= 1
    assert sum(row["forged_weights"] for row in rows) >= 1
    assert all(row["reward_mean"] < 1e5 for row in rows)
    # the run's secret: generated, kept from others, and in none of the files the run writes for people
    secret_file = run_dir / RUN_SECRET_FILE
    assert secret_file.stat().st_mode & 0o077 == 0
    secret = secret_file.read_text().strip()
    for name in ("config.yaml", "metrics.jsonl", "ledger.jsonl", "run.json"):
        assert secret not in (run_dir / name).read_text()
