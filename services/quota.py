"""How far sampling may run ahead of the learner: a claim limit per policy version, so nothing is sampled that the
learner cannot use within `cluster.max_policy_lag` versions.

The learner takes N = samples_per_epoch trajectories per epoch, in stream order. Before it publishes version V it
has consumed C(V) trajectories (used or dropped), so the epochs V .. V + L that may still use a sample of version V
consume the next (L + 1) N. An actor holding version V may therefore claim a batch only while

    claimed + batch_size <= limit(V) = C(V) + (L + 1) N

(one atomic check-and-add in Redis). With L = 0 this is the paper's synchronous DDPO: exactly one epoch's samples
per version. With one actor nothing is ever stale; several actors can reorder a few batches in the stream. A
refused actor waits for the next version. The learner raises a version's limit by what it had to drop, or by what a
crashed actor claimed and never delivered (`extend`), so it is never starved.

Keys (`services.keys.RunKeys`): quota:claimed (samples claimed so far), quota:limit:V (the limit of version V).
"""

from __future__ import annotations

import math

import redis

from services.keys import RunKeys

# KEYS[1] claimed, KEYS[2] limit of the claimer's version; ARGV[1] batch size. 1 = claimed, 0 = refused.
_CLAIM = """
local limit = redis.call('GET', KEYS[2])
if not limit then return 0 end
local claimed = tonumber(redis.call('GET', KEYS[1]) or '0')
if claimed + tonumber(ARGV[1]) > tonumber(limit) then return 0 end
redis.call('INCRBY', KEYS[1], ARGV[1])
return 1
"""


class SamplingQuota:
    """The claim limit shared by the sampling actors (`claim`) and the learner (`open`, `extend`, `reset`)."""

    def __init__(
        self, client: redis.Redis, run_id: str, samples_per_epoch: int, batch_size: int, max_policy_lag: int
    ) -> None:
        self._r = client
        self.keys = RunKeys(run_id)
        self.claimed_key = self.keys.quota_claimed
        self.samples_per_epoch = samples_per_epoch
        self.batch_size = batch_size
        self.max_policy_lag = max_policy_lag
        self._claim = client.register_script(_CLAIM)

    def limit_key(self, version: int) -> str:
        return self.keys.quota_limit(version)

    # ---- actors ---------------------------------------------------------------------------------------------------
    def claim(self, version: int) -> bool:
        """Reserve one batch for an actor holding `version`; False when the learner could not use it in time."""
        return bool(self._claim(keys=[self.claimed_key, self.limit_key(version)], args=[self.batch_size]))

    # ---- learner --------------------------------------------------------------------------------------------------
    def open(self, version: int, consumed: int, epochs_left: int | None = None) -> int:
        """Before publishing `version`, having consumed `consumed` trajectories: set and return its limit. With
        `epochs_left` (epochs the learner will still train), nothing is sampled for epochs that never come."""
        epochs = self.max_policy_lag + 1 if epochs_left is None else min(self.max_policy_lag + 1, epochs_left)
        limit = consumed + max(0, epochs) * self.samples_per_epoch
        self._r.set(self.limit_key(version), limit)
        return limit

    def set_limit(self, version: int, limit: int) -> None:
        """Set a version's limit directly (a sampler driven without a learner, e.g. by a benchmark)."""
        self._r.set(self.limit_key(version), limit)

    def extend(self, version: int, samples: int) -> None:
        """Let actors of `version` claim `samples` more (rounded up to whole batches): replacements for dropped or
        lost trajectories."""
        if samples > 0:
            self._r.incrby(self.limit_key(version), math.ceil(samples / self.batch_size) * self.batch_size)

    def reset(self, claimed: int) -> None:
        """At the learner's start: `claimed` = trajectories consumed before its checkpoint + those in the stream."""
        self._r.set(self.claimed_key, claimed)

    def claimed(self) -> int:
        return int(self._r.get(self.claimed_key) or 0)

    def delete(self) -> None:
        keys = list(self._r.scan_iter(match=self.keys.quota_prefix + "*"))
        if keys:
            self._r.delete(*keys)
