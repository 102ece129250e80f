"""The sampling quota on the real Redis: actors never sample what the learner cannot use within max_policy_lag."""

from __future__ import annotations

import uuid

import pytest
import redis

from services.quota import SamplingQuota

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def quota_factory():
    client = redis.Redis.from_url(REDIS_URL)
    made: list[SamplingQuota] = []

    def make(samples_per_epoch: int = 8, batch_size: int = 4, max_policy_lag: int = 1) -> SamplingQuota:
        q = SamplingQuota(
            client, f"test-{uuid.uuid4().hex[:8]}", samples_per_epoch, batch_size, max_policy_lag
        )
        made.append(q)
        return q

    yield make
    for q in made:
        q.delete()


def test_claims_stop_at_the_limit_of_the_claimers_version(quota_factory):
    q = quota_factory(samples_per_epoch=8, batch_size=4, max_policy_lag=1)
    assert not q.claim(0)  # no limit yet: the learner has not opened version 0
    assert q.open(0, consumed=0) == 16  # epochs 0 and 1 may use version-0 samples: (1 + 1) x 8
    assert [q.claim(0) for _ in range(5)] == [True, True, True, True, False]
    assert q.claimed() == 16
    q.open(1, consumed=8)  # the learner used epoch 0's 8 samples: version 1 may add epoch 2's
    assert not q.claim(0)  # an actor still on version 0 must fetch version 1 first
    assert [q.claim(1) for _ in range(3)] == [True, True, False]


def test_extend_replaces_dropped_samples_in_whole_batches_and_the_last_epochs_are_capped(quota_factory):
    q = quota_factory(samples_per_epoch=8, batch_size=4, max_policy_lag=0)
    q.open(0, consumed=0)
    assert [q.claim(0) for _ in range(3)] == [True, True, False]
    q.extend(0, 1)  # one sample dropped: one more batch may be claimed
    assert [q.claim(0) for _ in range(2)] == [True, False]
    lagged = quota_factory(samples_per_epoch=8, batch_size=4, max_policy_lag=2)
    assert lagged.open(5, consumed=40, epochs_left=1) == 48  # only one epoch left: not three epochs' worth
    assert lagged.open(6, consumed=48, epochs_left=0) == 48


def test_one_actor_under_the_quota_never_produces_a_stale_sample(quota_factory):
    """Simulate the stream: the actor samples as far ahead as it may (on its old version first, then the newest),
    the learner takes N per epoch in stream order; no sample is older than the lag, and the learner never starves."""
    n, b = 8, 4
    for lag in (0, 1, 2):
        q = quota_factory(samples_per_epoch=n, batch_size=b, max_policy_lag=lag)
        stream: list[int] = []  # the version each queued sample was drawn with, in stream order
        actor_version = consumed = 0
        q.reset(0)
        q.open(0, consumed=0)
        for published in range(6):
            while True:  # the actor, until refused on the newest version
                if q.claim(actor_version):
                    stream += [actor_version] * b
                elif actor_version < published:
                    actor_version = published
                else:
                    break
            assert len(stream) >= n, f"lag {lag}: the learner starves at version {published}"
            assert len(stream) <= (lag + 1) * n  # never more ahead than the lag allows
            batch, stream = stream[:n], stream[n:]
            assert all(published - v <= lag for v in batch), (lag, published, batch)
            consumed += n
            q.open(published + 1, consumed)
