"""Trajectory stream and weight channel against the real Redis on 127.0.0.1:6379 (unique keys per test)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable

import pytest
import redis
import torch

from services.streams import (
    Backpressure,
    Deduplicator,
    TrajectoryStream,
    WeightChannel,
    WeightIntegrityError,
    WeightSubscriber,
    redis_client,
)
from services.trajectory import ScoredTrajectory


def traj(i: int, t_steps: int = 3) -> ScoredTrajectory:
    g = torch.Generator().manual_seed(i)
    return ScoredTrajectory(
        latents=torch.randn(t_steps + 1, 4, 4, 4, generator=g),  # [T+1, C, h, w]
        log_probs=torch.randn(t_steps, generator=g),  # [T]
        timesteps=torch.arange(t_steps),  # [T]
        prompt=f"prompt {i}",
        reward=float(i),
        policy_version=i % 3,
        trajectory_id=f"traj-{i}",
    )


def pending(r: redis.Redis, s: TrajectoryStream) -> int:
    """Entries delivered to some consumer and not yet acknowledged (XPENDING)."""
    return int(r.xpending(s.key, s.group)["pending"])


class FakeClock:
    """Stands in for the `time` module of services.streams: `sleep` is recorded and moves `monotonic` on, and
    `on_sleep` runs what the rest of the system does while the caller waits (checks on events, not on clocks)."""

    def __init__(self, on_sleep: Callable[[], None] | None = None) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.on_sleep = on_sleep

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if self.on_sleep is not None:
            self.on_sleep()


# ---- trajectory stream ----------------------------------------------------------------------------------------


def test_add_read_ack_round_trip(r: redis.Redis, run_id: str) -> None:
    s = TrajectoryStream(r, run_id, max_backlog=10)
    sent = [traj(i) for i in range(3)]
    ids = [s.add(t) for t in sent]
    got = s.read("learner-0", count=10, block_ms=100)
    assert [e for e, _ in got] == ids
    for t, (_, d) in zip(sent, got, strict=True):
        assert d.trajectory_id == t.trajectory_id and d.prompt == t.prompt and d.reward == t.reward
        assert d.latents.dtype == torch.bfloat16 and torch.equal(d.latents, t.latents.bfloat16())
        assert torch.equal(d.log_probs, t.log_probs) and torch.equal(d.timesteps, t.timesteps)
    assert s.backlog() == 0 and pending(r, s) == 3  # delivered, not yet acked: no longer backlog
    assert s.ack(ids) == 3
    assert s.backlog() == 0 and pending(r, s) == 0
    assert r.xrange(s.key) == []  # ack deletes the data
    assert s.read("learner-0", count=10, block_ms=50) == []


def test_produced_ledger_is_written_with_the_entries(r: redis.Redis, run_id: str) -> None:
    s = TrajectoryStream(r, run_id, max_backlog=10, record_produced=True)
    ids = s.add_many([traj(i) for i in range(4)])
    assert len(ids) == 4 and s.produced_ids() == [f"traj-{i}" for i in range(4)]
    assert [d.trajectory_id for _, d in s.read("learner-0", count=10)] == s.produced_ids()
    with pytest.raises(ValueError, match="record_produced"):
        TrajectoryStream(r, run_id).produced_ids()


def test_group_creation_is_idempotent_and_sees_earlier_entries(r: redis.Redis, run_id: str) -> None:
    producer = TrajectoryStream(r, run_id)
    producer.add(traj(0))
    consumer = TrajectoryStream(r, run_id)  # created after the entry: still delivered (group starts at id 0)
    assert [t.trajectory_id for _, t in consumer.read("c", count=5)] == ["traj-0"]


def test_pending_entries_are_redelivered_to_same_consumer_after_crash(r: redis.Redis, run_id: str) -> None:
    s = TrajectoryStream(r, run_id)
    ids = [s.add(traj(i)) for i in range(4)]
    held = s.read("learner-0", count=2)
    assert [e for e, _ in held] == ids[:2]
    del s  # "crash" before ack

    s2 = TrajectoryStream(r, run_id)
    first = s2.read("learner-0", count=1)
    second = s2.read("learner-0", count=1)
    assert [e for e, _ in first + second] == ids[:2]  # own pending first, in order, each once
    rest = s2.read("learner-0", count=10)
    assert [e for e, _ in rest] == ids[2:]  # then the new ones
    assert s2.read("learner-0", count=10) == []  # held-but-unacked entries are not handed out again
    s2.ack(ids)
    assert s2.backlog() == 0


def test_idle_entries_of_dead_consumer_are_reclaimed(r: redis.Redis, run_id: str) -> None:
    s = TrajectoryStream(r, run_id, min_idle_ms=60_000)
    ids = [s.add(traj(i)) for i in range(3)]
    assert [e for e, _ in s.read("dead", count=2)] == ids[:2]

    alive = TrajectoryStream(r, run_id, min_idle_ms=60_000)
    assert [e for e, _ in alive.read("alive", count=10)] == ids[2:]  # dead's entries are not idle yet
    # dead's entries idle for 61 s, as Redis counts it (XCLAIM ... IDLE sets the idle time without waiting for it)
    r.xclaim(s.key, s.group, "dead", 0, ids[:2], idle=61_000)
    reclaimed = alive.read("alive", count=10)
    assert [e for e, _ in reclaimed] == ids[:2]  # ... now they are; alive's own held entry is not re-claimed
    assert [t.trajectory_id for _, t in reclaimed] == ["traj-0", "traj-1"]
    assert alive.ack(ids) == 3
    assert alive.backlog() == 0 and pending(r, alive) == 0


def test_backpressure_raises_and_never_trims(
    r: redis.Redis, run_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = TrajectoryStream(r, run_id, max_backlog=3)
    added = [s.add(traj(i)) for i in range(3)]
    with pytest.raises(Backpressure, match="max_backlog 3"):
        s.add(traj(3))
    # block_s: the producer polls the backlog, waiting in between, until block_s has passed on its clock
    clock = FakeClock()
    monkeypatch.setattr("services.streams.time", clock)
    with pytest.raises(Backpressure, match="after waiting 0.2s"):
        s.add(traj(3), block_s=0.2)
    assert len(clock.sleeps) > 1 and sum(clock.sleeps) == pytest.approx(0.2)
    assert s.backlog() == 3

    # delivery frees room (the learner may hold delivered entries unacked until its checkpoint): a blocked add
    # goes through once the learner reads, which it does here while the producer waits
    got: list = []
    clock = FakeClock(on_sleep=lambda: got.extend(s.read("c", count=1)) if not got else None)
    monkeypatch.setattr("services.streams.time", clock)
    added.append(s.add(traj(3), block_s=5.0))
    assert len(got) == 1 and len(clock.sleeps) == 1  # it waited, and the read let it through at the next poll
    monkeypatch.undo()
    assert s.backlog() == 3 and pending(r, s) == 1
    s.ack([got[0][0]])

    # every added entry is readable: nothing was trimmed
    seen = [got[0][0]]
    for _ in range(10):
        batch = s.read("c", count=2)
        if not batch:
            break
        seen += [e for e, _ in batch]
        s.ack([e for e, _ in batch])
    assert seen == added
    assert s.backlog() == 0


def test_add_many_fills_up_to_the_bound_then_reports_what_was_added(r: redis.Redis, run_id: str) -> None:
    s = TrajectoryStream(r, run_id, max_backlog=4)
    first = s.add_many([traj(i) for i in range(3)])
    with pytest.raises(Backpressure) as e:
        s.add_many([traj(i) for i in range(3, 6)])
    assert len(e.value.added_ids) == 1 and s.backlog() == 4  # one fitted, nothing beyond the bound
    got = s.read("c", count=10)
    assert [e for e, _ in got] == first + e.value.added_ids
    assert [t.trajectory_id for _, t in got] == [f"traj-{i}" for i in range(4)]
    s.ack([e for e, _ in got])
    assert len(s.add_many([traj(i) for i in range(4, 6)], block_s=1.0)) == 2


def test_corrupt_entries_go_to_dead_letter(
    r: redis.Redis, run_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    s = TrajectoryStream(r, run_id)
    bad = r.xadd(s.key, {b"payload": b"\x00garbage", b"trajectory_id": b"bad"}).decode()
    good = s.add(traj(1))
    with caplog.at_level(logging.WARNING, logger="services.streams"):
        got = s.read("c", count=10)
    assert [e for e, _ in got] == [good]
    assert "dead-letter" in caplog.text or "undecodable" in caplog.text
    dead = r.xrange(s.dead_letter_key)
    assert len(dead) == 1
    fields = dead[0][1]
    assert fields[b"source_id"].decode() == bad and fields[b"payload"] == b"\x00garbage"
    assert b"CodecError" in fields[b"error"]
    assert s.backlog() == 0 and pending(r, s) == 1  # the bad entry is acked and deleted


def test_pending_entry_deleted_elsewhere_is_dropped(r: redis.Redis, run_id: str) -> None:
    s = TrajectoryStream(r, run_id)
    entry = s.add(traj(0))
    s.read("c", count=1)
    r.xdel(s.key, entry)  # data gone while still pending for "c"
    assert TrajectoryStream(r, run_id).read("c", count=5) == []
    assert pending(r, s) == 0


def test_stream_recovers_when_redis_loses_the_group(r: redis.Redis, run_id: str) -> None:
    s = TrajectoryStream(r, run_id)
    assert s.read("c", count=5) == []  # own pending drained: the next read starts with the reclaim scan
    r.delete(s.key)  # e.g. a Redis restart without persistence
    assert s.read("c", count=5) == []
    s.add(traj(0))
    assert len(s.read("c", count=5)) == 1
    r.delete(s.key)
    s.add(traj(1))  # XADD recreates the stream but not the group
    assert [t.trajectory_id for _, t in s.read("c", count=5)] == ["traj-1"]


def test_text_mode_client_is_refused() -> None:
    with pytest.raises(ValueError, match="decode_responses"):
        TrajectoryStream(redis.Redis(host="127.0.0.1", decode_responses=True), "x")


def test_deduplicator_bounded_and_saveable() -> None:
    d = Deduplicator(capacity=3)
    assert [d.seen(i) for i in ["a", "b", "a", "c", "d"]] == [False, False, True, False, False]
    assert d.to_list() == ["b", "c", "d"] and len(d) == 3  # "a" was the oldest: forgotten
    restored = Deduplicator.from_list(d.to_list(), capacity=3)
    assert restored.seen("c") and restored.seen("d") and not restored.seen("a")


# ---- weight channel -------------------------------------------------------------------------------------------


def lora_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "down_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 320, generator=g),
        "down_blocks.0.attn.to_q.lora_B.weight": torch.randn(320, 4, generator=g),
        "half": torch.randn(8, generator=g).half(),
    }


def assert_state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_publish_fetch_round_trip(r: redis.Redis, run_id: str) -> None:
    ch = WeightChannel(r, run_id)
    assert ch.latest_version() == -1 and ch.fetch() is None
    sd = lora_state(0)
    ch.publish(0, sd)
    assert ch.latest_version() == 0
    v, got = ch.fetch()
    assert v == 0
    assert_state_equal(got, sd)
    ch.publish(1, lora_state(1))
    assert ch.fetch(min_version=2) is None
    v, got = ch.fetch(min_version=1)
    assert v == 1
    assert_state_equal(got, lora_state(1))
    with pytest.raises(ValueError, match="newer"):
        ch.publish(0, sd)


def test_sha256_mismatch_is_detected(r: redis.Redis, run_id: str) -> None:
    ch = WeightChannel(r, run_id)
    ch.publish(3, lora_state(0))
    blob = bytearray(r.hget(ch.key, "blob"))
    blob[-1] ^= 0xFF  # flip bits in the tensor data
    r.hset(ch.key, "blob", bytes(blob))
    with pytest.raises(WeightIntegrityError, match="sha256"):
        ch.fetch()


def test_subscriber_sees_only_newer_versions(r: redis.Redis, run_id: str) -> None:
    ch = WeightChannel(r, run_id)
    sub = WeightSubscriber(ch)
    assert sub.poll() is None
    ch.publish(1, lora_state(1))
    v, sd = sub.poll()
    assert v == 1 and sub.version == 1
    assert_state_equal(sd, lora_state(1))
    assert sub.poll() is None
    ch.publish(2, lora_state(2))
    ch.publish(3, lora_state(3))
    v, sd = sub.poll()
    assert v == 3  # skips straight to the newest
    assert_state_equal(sd, lora_state(3))
    assert sub.poll() is None
    # a late joiner that already applied v3 (e.g. from a checkpoint) gets nothing
    late = WeightSubscriber(WeightChannel(r, run_id), version=3)
    assert late.poll() is None


def test_rollback_republish_replaces_newer_weights(r: redis.Redis, run_id: str) -> None:
    """A learner resumed from an older checkpoint republishes its version; subscribers must take it."""
    ch = WeightChannel(r, run_id)
    sub = WeightSubscriber(ch)
    for v in (1, 2, 3):
        ch.publish(v, lora_state(v))
    assert sub.poll()[0] == 3
    with pytest.raises(ValueError, match="is newer"):
        ch.publish(2, lora_state(2))
    ch.publish(2, lora_state(20), rollback=True)
    v, sd = sub.poll()
    assert v == 2 and ch.latest_version() == 2
    assert_state_equal(sd, lora_state(20))
    assert sub.poll() is None


class WaitingSubscriber:
    """Records what a subscriber's pubsub hands back while it waits, and says (`waiting`) once it is blocked waiting
    for a notification: at its second read, the first one having read the confirmation of its subscription."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.waiting = threading.Event()
        self.replies: list[dict | None] = []
        get_message = redis.client.PubSub.get_message

        def recording(pubsub: redis.client.PubSub, *args, **kwargs):
            if self.replies:
                self.waiting.set()
            reply = get_message(pubsub, *args, **kwargs)
            self.replies.append(reply)
            return reply

        monkeypatch.setattr(redis.client.PubSub, "get_message", recording)

    def notifications(self) -> list[bytes]:
        return [m["data"] for m in self.replies if m is not None and m["type"] == "message"]


def publish_when_waiting(waiter: WaitingSubscriber, publish: Callable[[], None]) -> threading.Thread:
    """A publisher thread that publishes once the subscriber is blocked waiting (an event, not a delay)."""

    def run() -> None:
        assert waiter.waiting.wait(30)
        publish()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_subscriber_wait_is_woken_by_the_notification(
    r: redis.Redis, run_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ch = WeightChannel(r, run_id)
    ch.publish(0, lora_state(0))
    sub = WeightSubscriber(ch, version=0)
    waiter = WaitingSubscriber(monkeypatch)
    publisher = publish_when_waiting(waiter, lambda: WeightChannel(r, run_id).publish(1, lora_state(1)))
    try:
        # poll_s as long as timeout_s: the version key is read again only when the notification arrives
        got = sub.wait(timeout_s=30.0, poll_s=30.0)
        assert got is not None and got[0] == 1
        assert_state_equal(got[1], lora_state(1))
        assert waiter.notifications() == [b"1"]  # what woke it
        assert sub.wait(timeout_s=0.1) is None  # nothing newer
    finally:
        publisher.join()
        sub.close()


def test_subscriber_wait_falls_back_to_polling_when_the_notification_is_missed(
    r: redis.Redis, run_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ch = WeightChannel(r, run_id)
    sub = WeightSubscriber(ch)
    waiter = WaitingSubscriber(monkeypatch)
    silent = redis.Redis(host="127.0.0.1", port=6379, socket_timeout=10)
    silent.publish = lambda channel, message: 0  # the weights are stored, the PUBLISH is lost
    publisher = publish_when_waiting(waiter, lambda: WeightChannel(silent, run_id).publish(2, lora_state(2)))
    try:
        got = sub.wait(timeout_s=30.0, poll_s=0.05)
        assert got is not None and got[0] == 2
        assert waiter.notifications() == []  # found by re-reading the version key, not by a notification
    finally:
        publisher.join()
        sub.close()
        silent.close()


def test_subscriber_wait_hands_out_what_is_already_there_at_once(r: redis.Redis, run_id: str) -> None:
    ch = WeightChannel(r, run_id)
    ch.publish(4, lora_state(4))
    sub = WeightSubscriber(ch)
    try:
        got = sub.wait(timeout_s=0.0)  # no time to wait at all: the publication is there already
        assert got is not None and got[0] == 4
        assert sub.wait(timeout_s=0.0) is None
    finally:
        sub.close()


def test_subscriber_survives_its_notification_connection_being_dropped(run_id: str) -> None:
    """Redis restarts or drops the subscription's connection (`ddpo chaos` does both): the next wait that finds it
    broken -- here the health check's PING, as the client's 30 s interval would send it -- subscribes again and
    still hands out the next publication."""
    client = redis_client("redis://127.0.0.1:6379/0")
    ch = WeightChannel(client, run_id)
    sub = WeightSubscriber(ch)
    try:
        ch.publish(0, lora_state(0))
        assert sub.wait(timeout_s=10.0)[0] == 0  # subscribed
        conn = sub._pubsub.connection
        addr = f"127.0.0.1:{conn._sock.getsockname()[1]}"
        victim = next(c for c in client.client_list() if c["addr"] == addr)
        client.client_kill_filter(_id=victim["id"])
        conn.send_command("PING", check_health=False)  # the first write after the drop still "succeeds"
        conn.next_health_check = 0  # due now: the health check's PING meets the broken pipe
        assert sub.wait(timeout_s=0.3, poll_s=0.05) is None  # nothing new, and no ConnectionError
        ch.publish(1, lora_state(1))
        got = sub.wait(timeout_s=10.0, poll_s=0.05)
        assert got is not None and got[0] == 1
    finally:
        sub.close()
        client.close()


# ---- benchmarks (smoke: they run and report; no timing is asserted) -----------------------------------------


def test_data_plane_bench_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import data_plane

    result = data_plane.main(["--preset", "tiny", "--n", "64", "--batch", "8", "--rounds", "2"])
    line = json.loads(capsys.readouterr().out.strip())
    assert line == result and line["config"]["preset"] == "tiny"
    assert line["ratio"] > 0 and line["trajectory_MBps"] > 0 and line["raw_MBps"] > 0


def test_weights_bench_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import weights

    assert sum(a * b for a, b in weights.sd15_lora_shapes(4).values()) == 797_184  # "~0.8 M parameters"
    result = weights.main(["--n", "3"])
    line = json.loads(capsys.readouterr().out.strip())
    assert line == result and line["config"]["params"] == 797_184
    assert 0 < line["p50_ms"] <= line["p99_ms"] <= line["max_ms"]
    # nothing of the benchmark's run stays in the (shared) Redis: the weights' seq key was once left behind
    run_id = line["config"]["run_id"]
    assert not list(redis.Redis(host="127.0.0.1", port=6379).scan_iter(match=f"ddpo:{run_id}:*"))
