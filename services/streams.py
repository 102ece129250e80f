"""Redis data plane: the trajectory stream (actors -> learner) and the weight channel (learner -> actors).

Keys: `services.keys.RunKeys` (trajectories, trajectories:dead, produced, weights, weights:version, weights:seq,
weights:notify, weights:forged). Clients must be binary-safe (``decode_responses=False``): payloads are bytes. The
stream's entries are XDEL'ed when acknowledged, so XLEN = undelivered + delivered-but-unacked; the backlog that
producers respect is the undelivered part.

Delivery is at-least-once: a consumer first re-reads its own pending entries (after a crash), then claims entries
that other (dead) consumers left idle for ``min_idle_ms``, then reads new ones. The learner de-duplicates with
``Deduplicator``. Producers refuse to add beyond ``max_backlog``; unread data is never trimmed.

Signing (`services.signing`): with a ``RunSigner``, each stream entry carries a ``mac`` field next to its payload and
the consumer drops entries whose MAC does not verify (``TrajectoryStream.forged`` counts them); each weight version
carries a ``mac`` and ``WeightSubscriber`` refuses versions whose MAC does not verify (counted in weights:forged).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import redis
import torch
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.retry import Retry

from services.credentials import redis_url_with_password
from services.keys import RunKeys
from services.signing import RunSigner
from services.trajectory import (
    ScoredTrajectory,
    decode_tensors,
    decode_trajectory,
    encode_tensors,
    encode_trajectory,
)

logger = logging.getLogger(__name__)

PAYLOAD_FIELD = b"payload"
TRAJECTORY_ID_FIELD = b"trajectory_id"
MAC_FIELD = b"mac"  # HMAC of trajectory_id and payload under the run secret (services.signing), when signing

_PIPELINE_BYTES = 1 << 20
T = TypeVar("T")

Entry = tuple[str, ScoredTrajectory]
_RawEntry = tuple[bytes, dict[bytes, bytes] | None]


class Backpressure(RuntimeError):
    """The trajectory backlog is at ``max_backlog``: the learner is behind, the producer must wait."""

    def __init__(self, message: str, added_ids: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.added_ids = list(added_ids)  # entries of the same call that were added before the bound was hit


class WeightIntegrityError(RuntimeError):
    """A fetched weight blob does not match its recorded sha256 (or its recorded version)."""


class ForgedWeightsError(WeightIntegrityError):
    """A weight publication whose signature does not verify under the run secret (or whose blob does not match its
    signed sha256): not the learner's. ``publication`` identifies it (raw seq, version and mac fields)."""

    def __init__(self, message: str, publication: tuple) -> None:
        super().__init__(message)
        self.publication = publication


REDIS_RETRIES = 12
"""Attempts after a connection error or timeout, backing off 0.1 s doubling to at most 5 s with jitter: about 40 s in
all, so a Redis restart (it reloads its append-only file) or a dropped connection is ridden out, not fatal."""


class _OutageRetry(Retry):
    """Retries what an outage causes (connection errors, timeouts) and gives up at once on what waiting cannot mend:
    a refused password or ACL permission, a server certificate that does not verify."""

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        def retryable(err: Exception) -> bool:
            if isinstance(err, redis.exceptions.AuthenticationError | redis.exceptions.AuthorizationError):
                return False
            if "certificate verify failed" in str(err):
                return False
            return is_retryable(err) if is_retryable is not None else True

        return super().call_with_retry(do, fail, retryable, with_failure_count)


def no_retry() -> Retry:
    """For clients that must not retry at all (redis-py retries by default, with backoff): one that observes Redis,
    where an unanswered command is the answer, or one whose command closes the connection (SHUTDOWN)."""
    return Retry(NoBackoff(), 0)


def delete_run_keys(client: redis.Redis, run_id: str) -> int:
    """Delete every key of a run (RunKeys(run_id).pattern): the machine's Redis may be shared. Returns how many."""
    doomed = list(client.scan_iter(match=RunKeys(run_id).pattern, count=1000))
    return client.delete(*doomed) if doomed else 0


def redis_client(url: str) -> redis.Redis:
    """A binary-safe client (payloads are bytes) with health checks, for redis://, rediss:// (TLS) and unix:// URLs;
    a URL without a password takes DDPO_REDIS_PASSWORD's (`services.credentials`). Commands are retried through a
    Redis outage (`REDIS_RETRIES`); a retried XADD may add an entry twice, which the learner's deduplication
    absorbs."""
    return redis.Redis.from_url(
        redis_url_with_password(url),
        decode_responses=False,
        socket_timeout=30,
        health_check_interval=30,
        retry=_OutageRetry(ExponentialWithJitterBackoff(base=0.1, cap=5.0), REDIS_RETRIES),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


def _as_str(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


def _is_int(raw: bytes) -> bool:
    try:
        int(raw)
    except ValueError:
        return False
    return True


def _check_binary_client(client: redis.Redis) -> None:
    kwargs = client.get_connection_kwargs() if hasattr(client, "get_connection_kwargs") else {}
    if kwargs.get("decode_responses"):
        raise ValueError("the Redis client must use decode_responses=False: payloads are binary")


def _stream_entries(resp: Any) -> list[_RawEntry]:
    """XREADGROUP reply (RESP2 list or RESP3 dict) for one stream -> [(id, fields | None)]."""
    if not resp:
        return []
    if isinstance(resp, dict):  # RESP3: {key: [[id, fields], ...]}
        streams = list(resp.values())
        return [(e[0], e[1]) for e in streams[0]] if streams else []
    return [(e[0], e[1]) for e in resp[0][1]]


class TrajectoryStream:
    """One Redis stream of scored trajectories per run, consumed by one consumer group.

    Producer: ``add``. Consumer: ``read`` then ``ack`` once the update that used the entries is applied.
    """

    def __init__(
        self,
        redis_client: redis.Redis,
        run_id: str,
        group: str = "learner",
        max_backlog: int = 1024,
        min_idle_ms: int = 60_000,
        latent_dtype: torch.dtype = torch.bfloat16,
        dead_letter_maxlen: int = 1000,
        record_produced: bool = False,
        signer: RunSigner | None = None,
    ) -> None:
        if max_backlog < 1:
            raise ValueError(f"max_backlog must be >= 1, got {max_backlog}")
        _check_binary_client(redis_client)
        self._r = redis_client
        self.run_id = run_id
        keys = RunKeys(run_id)
        self.key = keys.trajectories
        self.dead_letter_key = keys.dead_letters
        self.group = group
        self.max_backlog = max_backlog
        self.min_idle_ms = min_idle_ms
        self.latent_dtype = latent_dtype
        self.dead_letter_maxlen = dead_letter_maxlen
        # the ledger of every trajectory_id ever added, written atomically with its XADD (for audits and tests)
        self.produced_key = keys.produced if record_produced else None
        # producers sign each entry, the consumer drops entries whose MAC does not verify (None: signing off)
        self.signer = signer
        self.forged = 0  # entries dropped as forged by this consumer so far
        # consumer -> id of the last own-pending entry re-read after a restart (dropped once drained)
        self._own_cursor: dict[str, bytes] = {}
        self._own_drained: set[str] = set()
        self.ensure_group()

    # ---- group and counters -------------------------------------------------------------------------------
    def ensure_group(self) -> None:
        """Create the stream and consumer group if missing (idempotent; id 0 so earlier entries are delivered)."""
        try:
            self._r.xgroup_create(self.key, self.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def backlog(self) -> int:
        """Entries not yet delivered to the learner (XLEN minus pending: acknowledged entries are deleted).

        Delivered-but-unacknowledged entries do not count: the learner holds those until its next checkpoint, and
        counting them would stall producers whenever save_every x samples_per_epoch exceeds the bound.
        """

        def counts() -> list:
            pipe = self._r.pipeline(transaction=True)
            pipe.xlen(self.key)
            pipe.xpending(self.key, self.group)
            return pipe.execute()

        length, pending = self._with_group(counts)
        return int(length) - int(pending["pending"])

    def length(self) -> int:
        """Entries in the stream: undelivered plus delivered-but-unacknowledged (acknowledged ones are deleted)."""
        return int(self._r.xlen(self.key))

    # ---- producer -------------------------------------------------------------------------------------------
    def add(self, traj: ScoredTrajectory, block_s: float | None = None) -> str:
        """Append one trajectory; returns its entry id. Backpressure as in ``add_many``."""
        return self.add_many([traj], block_s)[0]

    def add_many(self, trajs: Sequence[ScoredTrajectory], block_s: float | None = None) -> list[str]:
        """Append trajectories in order (pipelined); returns their entry ids.

        Adds only while the backlog is below ``max_backlog``. When it is full: with ``block_s=None`` raise
        ``Backpressure`` at once, otherwise wait up to ``block_s`` seconds (polling) for the learner to ack, then
        raise; ``Backpressure.added_ids`` holds what was added before. Check and add are separate commands, so
        P concurrent producers can overshoot the bound by at most (P - 1) x their batch size. Nothing is trimmed.
        """
        ids: list[str] = []
        deadline = time.monotonic() + (block_s or 0.0)
        pause = 0.005
        while len(ids) < len(trajs):
            backlog = self.backlog()
            room = self.max_backlog - backlog
            if room > 0:
                ids += self._xadd_pipelined(trajs[len(ids) : len(ids) + room])
                continue
            remaining = deadline - time.monotonic()
            if block_s is None or remaining <= 0:
                waited = f" after waiting {block_s:.1f}s" if block_s else ""
                raise Backpressure(
                    f"trajectory backlog {backlog} >= max_backlog {self.max_backlog} on {self.key}{waited}",
                    ids,
                )
            time.sleep(min(pause, remaining))
            pause = min(pause * 2, 0.1)
        return ids

    def _xadd_pipelined(self, trajs: Sequence[ScoredTrajectory]) -> list[str]:
        """XADD each trajectory, one round trip per ~1 MiB: small payloads share a round trip, and large ones
        are freed right after sending (a batch of live SD 1.5 payloads costs fresh, page-faulting memory)."""
        ids: list[str] = []
        # MULTI/EXEC when ids are recorded: an entry and its ledger line exist together or not at all
        pipe = self._r.pipeline(transaction=self.produced_key is not None)
        queued = 0
        for i, t in enumerate(trajs):
            payload = encode_trajectory(t, self.latent_dtype)
            fields = {PAYLOAD_FIELD: payload, TRAJECTORY_ID_FIELD: t.trajectory_id.encode()}
            if self.signer is not None:
                fields[MAC_FIELD] = self.signer.trajectory_mac(fields[TRAJECTORY_ID_FIELD], payload)
            pipe.xadd(self.key, fields)
            if self.produced_key is not None:
                pipe.rpush(self.produced_key, t.trajectory_id)
            queued += len(payload)
            if queued >= _PIPELINE_BYTES or i == len(trajs) - 1:
                replies = pipe.execute()
                step = 1 if self.produced_key is None else 2
                ids += [_as_str(entry_id) for entry_id in replies[::step]]
                queued = 0
        return ids

    def remaining_ids(self) -> list[str]:
        """trajectory_ids of the entries still in the stream (never acknowledged), oldest first; forged entries
        are not among them (they were never produced)."""
        ids = []
        for _, fields in self._r.xrange(self.key):
            if self._genuine(fields):
                ids.append(_as_str(fields[TRAJECTORY_ID_FIELD]))
        return ids

    def _genuine(self, fields: dict[bytes, bytes]) -> bool:
        """The entry's MAC verifies (always true with signing off)."""
        if self.signer is None:
            return True
        payload, trajectory_id = fields.get(PAYLOAD_FIELD), fields.get(TRAJECTORY_ID_FIELD)
        if payload is None or trajectory_id is None:
            return False
        return self.signer.verify_trajectory(trajectory_id, payload, fields.get(MAC_FIELD))

    def delete(self) -> None:
        """Remove the stream, its group and the dead-letter stream (the end of a run)."""
        self._r.delete(self.key, self.dead_letter_key)

    def produced_ids(self) -> list[str]:
        """Every trajectory_id added so far (requires record_produced=True)."""
        if self.produced_key is None:
            raise ValueError("this TrajectoryStream was created with record_produced=False")
        return [_as_str(x) for x in self._r.lrange(self.produced_key, 0, -1)]

    # ---- consumer -------------------------------------------------------------------------------------------
    def read(self, consumer: str, count: int = 16, block_ms: int | None = None) -> list[Entry]:
        """Up to ``count`` trajectories for ``consumer``: its own pending ones first (once, after a restart),
        then entries reclaimed from consumers idle longer than ``min_idle_ms``, then new entries (waiting up to
        ``block_ms`` only when nothing else is available). Undecodable entries and, with a signer, forged ones (MAC
        missing or wrong; counted in ``forged``) go to the dead-letter stream: acknowledged, never returned.
        """
        raw: list[_RawEntry] = []
        if consumer not in self._own_drained:
            raw += self._read_own_pending(consumer, count)
        if len(raw) < count:
            raw += self._reclaim(consumer, count - len(raw))
        if len(raw) < count:
            raw += self._xreadgroup(consumer, b">", count - len(raw), None if raw else block_ms)
        return self._decode(raw)

    def ack(self, entry_ids: Iterable[str | bytes]) -> int:
        """Acknowledge and delete entries (the update that used them is applied); returns how many were acked."""
        ids = list(entry_ids)
        if not ids:
            return 0
        pipe = self._r.pipeline(transaction=True)
        pipe.xack(self.key, self.group, *ids)
        pipe.xdel(self.key, *ids)
        acked, _ = pipe.execute()
        return int(acked)

    def _with_group(self, command: Callable[[], T]) -> T:
        """Run a group command; if the stream vanished (e.g. Redis restarted without persistence), recreate the
        group once and retry."""
        try:
            return command()
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e) and "no such key" not in str(e):
                raise
            logger.warning("consumer group %s on %s vanished; recreating it", self.group, self.key)
            self.ensure_group()
            return command()

    def _xreadgroup(self, consumer: str, start: bytes, count: int, block_ms: int | None) -> list[_RawEntry]:
        resp = self._with_group(
            lambda: self._r.xreadgroup(self.group, consumer, {self.key: start}, count=count, block=block_ms)
        )
        return _stream_entries(resp)

    def _read_own_pending(self, consumer: str, count: int) -> list[_RawEntry]:
        """Entries delivered to ``consumer`` before and never acked, in id order, each returned once."""
        raw = self._xreadgroup(consumer, self._own_cursor.get(consumer, b"0"), count, None)
        if raw:
            self._own_cursor[consumer] = raw[-1][0]
        else:
            self._own_drained.add(consumer)
            self._own_cursor.pop(consumer, None)
        return raw

    def _reclaim(self, consumer: str, count: int) -> list[_RawEntry]:
        """Claim entries that other consumers left idle >= ``min_idle_ms`` (XPENDING IDLE + XCLAIM).

        Unlike XAUTOCLAIM this skips our own pending entries: the learner legitimately holds them unacked for a
        whole epoch, and re-claiming them would re-deliver (and re-decode) them on every read.
        """
        out: list[_RawEntry] = []
        for info in self._with_group(lambda: self._r.xinfo_consumers(self.key, self.group)):
            name = _as_str(info["name"])
            if name == consumer or int(info["pending"]) == 0:
                continue
            idle = self._r.xpending_range(
                self.key, self.group, "-", "+", count - len(out), consumername=name, idle=self.min_idle_ms
            )
            if not idle:
                continue
            ids = [p["message_id"] for p in idle]
            claimed = self._r.xclaim(self.key, self.group, consumer, self.min_idle_ms, ids)
            if claimed:
                logger.warning(
                    "reclaimed %d idle entries from consumer %s for %s", len(claimed), name, consumer
                )
            out += [(e[0], e[1]) for e in claimed]
            if len(out) >= count:
                break
        return out

    def _decode(self, raw: Sequence[_RawEntry]) -> list[Entry]:
        out: list[Entry] = []
        for entry_id, fields in raw:
            if not fields:  # deleted while pending (already acked elsewhere): drop it from the PEL
                self.ack([entry_id])
                continue
            if not self._genuine(fields):  # checked before decoding: a forger's bytes are never parsed
                self.forged += 1
                error = ForgedEntryError("its MAC does not verify under the run secret")
                self._dead_letter(entry_id, fields, error, what="forged")
                continue
            try:
                out.append((_as_str(entry_id), decode_trajectory(fields[PAYLOAD_FIELD], copy=False)))
            except Exception as e:  # a bad entry must not crash the learner
                self._dead_letter(entry_id, fields, e)
        return out

    def _dead_letter(
        self, entry_id: bytes, fields: dict[bytes, bytes], error: Exception, what: str = "undecodable"
    ) -> None:
        logger.warning(
            "moving %s entry %s of %s to %s: %s", what, entry_id, self.key, self.dead_letter_key, error
        )
        dead = {
            PAYLOAD_FIELD: fields.get(PAYLOAD_FIELD, b""),
            b"source_id": entry_id,
            b"error": f"{type(error).__name__}: {error}"[:1000].encode(),
        }
        pipe = self._r.pipeline(transaction=True)
        pipe.xadd(self.dead_letter_key, dead, maxlen=self.dead_letter_maxlen, approximate=True)
        pipe.xack(self.key, self.group, entry_id)
        pipe.xdel(self.key, entry_id)
        pipe.execute()


class ForgedEntryError(ValueError):
    """A stream entry whose MAC does not verify under the run secret (recorded as the dead letter's error)."""


class Deduplicator:
    """Bounded memory of seen ``trajectory_id``s (oldest forgotten first); its state saves/loads as a list."""

    def __init__(self, capacity: int = 100_000, ids: Iterable[str] = ()) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()
        for i in ids:
            self.seen(i)

    def seen(self, trajectory_id: str) -> bool:
        """True if the id was seen before; otherwise remember it and return False."""
        if trajectory_id in self._ids:
            return True
        self._ids[trajectory_id] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return False

    def __len__(self) -> int:
        return len(self._ids)

    def to_list(self) -> list[str]:
        """Remembered ids, oldest first (JSON-serialisable checkpoint state)."""
        return list(self._ids)

    @classmethod
    def from_list(cls, ids: Iterable[str], capacity: int = 100_000) -> Deduplicator:
        return cls(capacity=capacity, ids=ids)


class WeightChannel:
    """Versioned LoRA weights in Redis: the blob with version and sha256 (and, with a signer, the learner's MAC over
    seq, version, rollback flag and sha256), then a notification."""

    def __init__(self, redis_client: redis.Redis, run_id: str, signer: RunSigner | None = None) -> None:
        _check_binary_client(redis_client)
        self._r = redis_client
        self.run_id = run_id
        keys = RunKeys(run_id)
        self.key = keys.weights
        self.version_key = keys.weights_version
        self.seq_key = (
            keys.weights_seq
        )  # counts publications: a rollback has a lower version but a higher seq
        self.notify_channel = keys.weights_notify
        self.forged_key = keys.weights_forged
        self.signer = signer  # the learner signs what it publishes, actors verify what they fetch

    def publish(self, version: int, state_dict: dict[str, torch.Tensor], rollback: bool = False) -> None:
        """Store ``state_dict`` as ``version`` (>= the current one) atomically, then announce it.

        ``rollback=True`` allows a lower version: a learner resumed from a checkpoint republishes its weights, and
        subscribers must replace versions published after that checkpoint (they follow ``seq``, not ``version``).
        """
        blob = encode_tensors(state_dict, {"version": int(version)})
        sha = hashlib.sha256(blob).hexdigest()

        def write(pipe: redis.client.Pipeline) -> None:
            current = self._stored_version(pipe)
            if current is not None and version < int(current) and not rollback:
                raise ValueError(f"cannot publish weights version {version}: version {int(current)} is newer")
            seq = int(pipe.get(self.seq_key) or 0) + 1
            fields = {"version": str(version), "sha256": sha, "blob": blob, "seq": str(seq),
                      "rollback": "1" if rollback else "0"}  # fmt: skip
            if self.signer is not None:
                fields["mac"] = self.signer.weights_mac(seq, version, rollback, sha)
            pipe.multi()
            pipe.delete(self.key)  # no field of an earlier publication (an old mac) survives
            pipe.hset(self.key, mapping=fields)
            pipe.set(self.version_key, str(version))
            pipe.set(self.seq_key, str(seq))

        self._r.transaction(write, self.version_key, self.seq_key, self.key)
        self._r.publish(self.notify_channel, str(version))
        logger.debug("published weights v%d (%d bytes) on %s", version, len(blob), self.key)

    def _stored_version(self, pipe: redis.client.Pipeline) -> int | None:
        """The version a new publication must not go below: weights:version, or with a signer the stored
        publication's version only if its signature verifies (a forger must not stop the learner publishing)."""
        if self.signer is None:
            current = pipe.get(self.version_key)
            return None if current is None else int(current)
        seq, version, sha, rollback, mac = pipe.hmget(
            self.key, ["seq", "version", "sha256", "rollback", "mac"]
        )
        if version is None or sha is None:
            return None
        if (
            not _is_int(version)
            or not _is_int(seq or b"0")
            or not self.signer.verify_weights(
                int(seq or 0), int(version), rollback == b"1", _as_str(sha), mac
            )
        ):
            logger.warning(
                "weights on %s: the stored v%s is forged; publishing over it", self.key, _as_str(version)
            )
            return None
        return int(version)

    def latest_version(self) -> int:
        """Newest published version, -1 if none."""
        v = self._r.get(self.version_key)
        return -1 if v is None else int(v)

    def latest_seq(self) -> int:
        """Number of publications so far (0 if none)."""
        return int(self._r.get(self.seq_key) or 0)

    def fetch(self, min_version: int | None = None) -> tuple[int, dict[str, torch.Tensor]] | None:
        """(version, state dict) of the newest weights, or None if none (or none >= ``min_version``).

        Raises ``WeightIntegrityError`` if the blob does not match its sha256 or version, ``ForgedWeightsError`` (a
        subclass) if, with a signer, its signature does not verify.
        """
        if min_version is not None and self.latest_version() < min_version:
            return None  # cheap check before pulling megabytes
        got = self._read()
        if got is None or (min_version is not None and got[1] < min_version):
            return None
        return got[1], got[2]

    def fetch_newer(self, seq: int) -> tuple[int, int, dict[str, torch.Tensor]] | None:
        """(seq, version, state dict) of the newest publication if its seq is > ``seq``, else None."""
        if self.latest_seq() <= seq:
            return None
        got = self._read()
        if got is None or got[0] <= seq:
            return None
        return got

    def publication(self) -> tuple:
        """The stored publication's raw (seq, version, mac) fields: a cheap identity (no blob)."""
        return tuple(self._r.hmget(self.key, ["seq", "version", "mac"]))

    def _read(self) -> tuple[int, int, dict[str, torch.Tensor]] | None:
        """(seq, version, state dict) of the stored publication, checked (one HMGET: the fields are consistent)."""
        seq, version, sha, rollback, mac, blob = self._r.hmget(
            self.key, ["seq", "version", "sha256", "rollback", "mac", "blob"]
        )
        if blob is None or version is None or sha is None:
            return None
        if not _is_int(version) or not _is_int(seq or b"0"):
            message = f"weights on {self.key}: seq {seq!r} or version {version!r} is no number"
            if self.signer is not None:
                raise ForgedWeightsError(message, (seq, version, mac))
            raise WeightIntegrityError(message)
        v, s, sha = int(version), int(seq or 0), _as_str(sha)
        if self.signer is not None and not self.signer.verify_weights(s, v, rollback == b"1", sha, mac):
            raise ForgedWeightsError(
                f"weights v{v} (publication {s}) on {self.key}: the signature does not verify",
                (seq, version, mac),
            )
        if hashlib.sha256(blob).hexdigest() != sha:
            message = f"weights v{v} on {self.key}: sha256 mismatch (corrupt or partial blob)"
            if self.signer is not None:  # the signed sha256 is the learner's: this blob is not
                raise ForgedWeightsError(message + ", under a valid signature", (seq, version, mac))
            raise WeightIntegrityError(message)
        tensors, meta = decode_tensors(blob, copy=False)  # the blob is ours: no second copy
        if meta.get("version") != v:
            raise WeightIntegrityError(
                f"weights on {self.key}: hash says v{v}, blob says v{meta.get('version')}"
            )
        return s, v, tensors

    def count_forged(self) -> int:
        """An actor refused a forged publication: add one to the run's weights:forged counter (returns it)."""
        return int(self._r.incr(self.forged_key))

    def forged_count(self) -> int:
        """Refusals of forged publications so far, summed over the actors (each refuses each forgery once)."""
        return int(self._r.get(self.forged_key) or 0)

    def _wait(
        self,
        pubsub: redis.client.PubSub,
        version: int,
        timeout_s: float,
        poll_s: float,
        seq: int | None = None,
    ) -> bool:
        """Wait for version >= ``version`` (or, if ``seq`` is given, for a publication newer than ``seq``)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if (self.latest_seq() > seq) if seq is not None else (self.latest_version() >= version):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            pubsub.get_message(timeout=min(poll_s, remaining))


class WeightSubscriber:
    """An actor's view of the weight channel: hands out each newer publication once, for applying between batches.

    It follows the publication counter, so a learner that resumed from a checkpoint and republished an older
    version still replaces weights published after that checkpoint. With a signer on its channel it refuses a
    publication whose signature does not verify: logged once, counted (``forged`` here and weights:forged in
    Redis), and the caller keeps the weights it has.
    """

    _REFUSED_KEPT = 256  # identities of refused publications remembered (so each is fetched and counted once)

    def __init__(self, channel: WeightChannel, version: int = -1) -> None:
        self.channel = channel
        self.version = version  # version of the newest publication handed out (= applied by the caller)
        self.seq = 0  # its publication number
        self.forged = 0  # publications refused as forged
        self._refused: dict[tuple, None] = {}
        self._idle_seq = 0  # weights:seq when the last poll found nothing to hand out (wait() blocks past it)
        self._pubsub: redis.client.PubSub | None = None

    def poll(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        """(version, state dict) if something was published since the last hand-out, else None (one GET).

        A subscriber created with the version it already holds (e.g. restored from a checkpoint) is not handed
        that same version again. A forged publication is refused (None) and never fetched again.
        """
        latest = self.channel.latest_seq()
        if latest <= self.seq:
            return None
        if self.channel.signer is not None and self.channel.publication() in self._refused:
            self._idle_seq = latest
            return None
        try:
            got = self.channel.fetch_newer(self.seq)
        except ForgedWeightsError as err:
            self._refuse(err)
            self._idle_seq = latest
            return None
        if got is None:
            self._idle_seq = latest
            return None
        first = self.seq == 0
        self.seq, version, state = got
        if first and version == self.version:
            return None
        self.version = version
        return version, state

    def _refuse(self, err: ForgedWeightsError) -> None:
        self._refused[err.publication] = None
        if len(self._refused) > self._REFUSED_KEPT:
            del self._refused[next(iter(self._refused))]
        self.forged += 1
        self.channel.count_forged()
        logger.warning("refusing a weights publication: %s; keeping version %d", err, self.version)

    def wait(self, timeout_s: float, poll_s: float = 0.5) -> tuple[int, dict[str, torch.Tensor]] | None:
        """Like ``poll`` but block up to ``timeout_s`` for a new publication (kept subscription, low latency)."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            seen = max(self.seq, self._idle_seq)  # past a refused (or stale) publication: wait for the next
            if not self._wait_newer(seen, max(remaining, 0.0), poll_s):
                return None
            got = self.poll()
            if got is not None or deadline - time.monotonic() <= 0:
                return got

    def _wait_newer(self, seen: int, timeout_s: float, poll_s: float) -> bool:
        """Wait for a publication newer than `seen` on the kept subscription. A subscription whose connection broke
        (Redis restarted, the connection was dropped) is closed and made again on the next call: the publication
        counter, which the wait polls, catches what it missed meanwhile."""
        try:
            if self._pubsub is None:
                self._pubsub = self.channel._r.pubsub(ignore_subscribe_messages=True)
                self._pubsub.subscribe(self.channel.notify_channel)
            return self.channel._wait(self._pubsub, self.version + 1, timeout_s, poll_s, seq=seen)
        except (redis.ConnectionError, redis.TimeoutError) as err:
            logger.info("weights notifications: connection lost (%s); subscribing again", err)
            self.close()
            return self.channel.latest_seq() > seen

    def close(self) -> None:
        if self._pubsub is not None:
            pubsub, self._pubsub = self._pubsub, None
            with contextlib.suppress(
                redis.RedisError, OSError
            ):  # a broken connection has nothing left to close
                pubsub.close()
