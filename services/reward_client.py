"""The HTTP client of the reward servers: replicas, balancing, retries with backoff; and `Scorer`, the one way
samplers and evaluation score images, in this process or through the servers.

`RewardClient.call(kind, request)` posts a `services.reward_api` request model to a replica of that reward-server
kind and returns the reply parsed with the same contract's response model; `score(name, ...)` runs a reward of the
registry (`services.rewards.REWARDS`) over those calls.

Failure policy per request: connection errors, timeouts, 429 and 5xx put the replica on a short cooldown and are
retried -- on another replica at once if one is untried and healthy, else after exponential backoff with jitter
(or the server's ``Retry-After``). Other 4xx are the caller's fault and raise ``RewardRequestError`` at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import itertools
import logging
import os
import random
import threading
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from services.config import RewardConfig
from services.reward_api import SERVER_APIS
from services.rewards import TERM_PREFIX, Images, Metadata, RewardFn, Scores, get_reward

logger = logging.getLogger(__name__)

T = TypeVar("T")
_backoff_sleep = asyncio.sleep  # the wait between attempts (tests record it instead of waiting)
_now = time.monotonic  # the clock of replica cooldowns (tests move it instead of waiting)


class RewardRequestError(RuntimeError):
    """A reward request that failed for good: a 4xx, a malformed reply, or retries exhausted."""

    def __init__(
        self, message: str, *, url: str, status: int | None = None, server_message: str = ""
    ) -> None:
        super().__init__(message)
        self.url = url
        self.status = status  # None for connection errors and timeouts
        self.server_message = server_message


@dataclass
class _Replica:
    url: str
    in_flight: int = 0
    cooldown_until: float = 0.0  # _now() before which the replica is avoided
    calls: int = 0

    def healthy(self, now: float) -> bool:
        return now >= self.cooldown_until


def _server_message(resp: httpx.Response) -> str:
    """The server's error text: FastAPI's ``detail`` when JSON, else the start of the body."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:500]
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:500]
    return str(body)[:500]


def _retry_after_s(resp: httpx.Response) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP date), None if absent or unparsable."""
    value = resp.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class RewardClient:
    """Calls the reward servers over HTTP. Use inside one event loop; ``async with`` or ``await aclose()``."""

    def __init__(
        self,
        replicas: dict[str, list[str]],
        timeout_s: float = 60.0,
        max_retries: int = 4,
        backoff_base_s: float = 0.25,
        backoff_max_s: float = 8.0,
        auth_token: str | None = None,
        max_in_flight: int = 32,
        cooldown_s: float = 5.0,
        retry_after_max_s: float = 60.0,
        max_batch: int = 32,
    ) -> None:
        """
        Args:
            replicas: reward-server kind (``jpeg``, ``aesthetic``, ``llava``, ``bertscore``) -> base URLs.
            timeout_s: per-HTTP-call timeout (connect, read, write, pool), seconds.
            max_retries: retries after the first attempt (so at most ``max_retries + 1`` calls per request).
            backoff_base_s, backoff_max_s: backoff before retry k is ``min(max, base * 2**k)``, jittered in [1/2, 1].
            auth_token: sent as ``Authorization: Bearer <token>`` when set.
            max_in_flight: requests (including their retries and backoff) outstanding at once.
            cooldown_s: how long a failed replica is avoided while others are healthy.
            retry_after_max_s: cap on a server's ``Retry-After``.
            max_batch: images (or text pairs) per HTTP request; larger calls are split and sent concurrently.
        """
        if not replicas or any(not urls for urls in replicas.values()):
            raise ValueError(f"every reward-server kind needs at least one URL, got {replicas}")
        if max_retries < 0 or max_in_flight < 1 or max_batch < 1:
            raise ValueError("max_retries must be >= 0, max_in_flight and max_batch >= 1")
        self._replicas = {kind: [_Replica(u.rstrip("/")) for u in urls] for kind, urls in replicas.items()}
        self._rr = {kind: itertools.count() for kind in replicas}  # round-robin tie-break between equals
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.cooldown_s = cooldown_s
        self.retry_after_max_s = retry_after_max_s
        self.max_batch = max_batch
        self._headers = {"Authorization": f"Bearer {auth_token}"} if auth_token else {}
        self._max_in_flight = max_in_flight
        self._slots = asyncio.Semaphore(max_in_flight)
        self._http: httpx.AsyncClient | None = None

    async def __aenter__(self) -> RewardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def calls(self, kind: str) -> dict[str, int]:
        """HTTP calls made so far per replica URL of ``kind`` (for metrics and tests)."""
        return {r.url: r.calls for r in self._replicas[kind]}

    # ---- transport: balancing, retries, backoff ------------------------------------------------------------
    def _client(self) -> httpx.AsyncClient:
        if self._http is None:  # created lazily, inside the event loop that uses it
            self._http = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout_s),
                limits=httpx.Limits(
                    max_connections=self._max_in_flight, max_keepalive_connections=self._max_in_flight
                ),
                headers=self._headers,
            )
        return self._http

    def _choose(self, kind: str, tried: set[str]) -> _Replica:
        """Least in-flight replica, preferring untried and healthy ones; round-robin among equals."""
        replicas, now = self._replicas[kind], _now()
        pool = [r for r in replicas if r.url not in tried and r.healthy(now)] or [
            r for r in replicas if r.healthy(now)
        ]
        if not pool:  # everyone is cooling down: take the one that recovers first
            return min(replicas, key=lambda r: r.cooldown_until)
        start = next(self._rr[kind]) % len(pool)
        rotated = pool[start:] + pool[:start]
        return min(rotated, key=lambda r: r.in_flight)

    def _backoff_s(self, attempt: int) -> float:
        cap = min(self.backoff_max_s, self.backoff_base_s * 2**attempt)
        return cap * (0.5 + 0.5 * random.random())

    async def _post(self, kind: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to one replica of ``kind``, retrying per the failure policy; returns the JSON object."""
        if kind not in self._replicas:
            raise ValueError(
                f"no replicas configured for reward server {kind!r}; have {sorted(self._replicas)}"
            )
        tried: set[str] = set()
        last = ""
        async with self._slots:
            for attempt in range(self.max_retries + 1):
                replica = self._choose(kind, tried)
                tried.add(replica.url)
                url = replica.url + path
                replica.in_flight += 1
                replica.calls += 1
                retry_after: float | None = None
                try:
                    resp = await self._client().post(url, json=body)
                except httpx.TransportError as e:  # connection refused/reset, timeouts, protocol errors
                    last = f"{url}: {type(e).__name__}: {e}"
                    status: int | None = None
                else:
                    status = resp.status_code
                    if status < 400:
                        replica.cooldown_until = 0.0
                        return self._json(resp, url)
                    message = _server_message(resp)
                    if status != 429 and status < 500:
                        raise RewardRequestError(
                            f"{url} answered {status}: {message}",
                            url=url,
                            status=status,
                            server_message=message,
                        )
                    last = f"{url} answered {status}: {message}"
                    retry_after = _retry_after_s(resp)
                finally:
                    replica.in_flight -= 1
                if retry_after is not None:
                    retry_after = min(retry_after, self.retry_after_max_s)
                replica.cooldown_until = _now() + max(self.cooldown_s, retry_after or 0.0)
                if attempt == self.max_retries:
                    break
                now = _now()
                failover = any(r.url not in tried and r.healthy(now) for r in self._replicas[kind])
                delay = (
                    0.0
                    if failover
                    else (retry_after if retry_after is not None else self._backoff_s(attempt))
                )
                logger.warning(
                    "reward call failed (%s); retry %d/%d in %.2fs",
                    last,
                    attempt + 1,
                    self.max_retries,
                    delay,
                )
                await _backoff_sleep(delay)
        raise RewardRequestError(
            f"{kind} request failed after {self.max_retries + 1} attempts; last: {last}",
            url=url,
            status=status,
            server_message=last,
        )

    @staticmethod
    def _json(resp: httpx.Response, url: str) -> dict[str, Any]:
        try:
            body = resp.json()
        except ValueError as e:
            raise RewardRequestError(
                f"{url} returned non-JSON: {resp.text[:200]!r}", url=url, status=200
            ) from e
        if not isinstance(body, dict):
            raise RewardRequestError(
                f"{url} returned {type(body).__name__}, expected an object", url=url, status=200
            )
        return body

    # ---- the HTTP contract: one typed call, split along its lists ------------------------------------------------
    async def call(self, kind: str, request: BaseModel) -> BaseModel:
        """POST `request` (the kind's request model in `services.reward_api.SERVER_APIS`) and return the reply parsed
        with its response model. More than `max_batch` inputs are split into requests sent concurrently and the
        replies put back together, in order."""
        api = SERVER_APIS.get(kind)
        if api is None:
            raise ValueError(f"unknown reward-server kind {kind!r}; known: {', '.join(SERVER_APIS)}")
        if not isinstance(request, api.request):
            raise TypeError(f"a {kind} request must be {api.request.__name__}, not {type(request).__name__}")
        body = request.model_dump()
        lists = [k for k, v in body.items() if isinstance(v, list)]
        n = len(body[lists[0]]) if lists else 0
        chunks = _chunks(n, self.max_batch) or [slice(0, 0)]
        parts = [{k: (v[c] if k in lists else v) for k, v in body.items()} for c in chunks]
        replies = await asyncio.gather(*(self._post(kind, api.path, part) for part in parts))
        merged: dict[str, list[Any]] = {}
        for c, reply in zip(chunks, replies, strict=True):
            for field, values in reply.items():
                if isinstance(values, list):
                    if len(values) != c.stop - c.start:
                        raise RewardRequestError(
                            f"{kind} reply field {field!r} should be a list of {c.stop - c.start}, got {values!r:.200}",
                            url=kind,
                            status=200,
                        )
                    merged.setdefault(field, []).extend(values)
        try:
            return api.response.model_validate(merged)
        except ValidationError as err:
            raise RewardRequestError(
                f"{kind} reply does not match {api.response.__name__}: {err}", url=kind, status=200
            ) from None

    # ---- rewards: (images, prompts, metadata) -> (scores, info) ------------------------------------------------
    async def score(self, name: str, images: Images, prompts: Sequence[str], metadata: Metadata) -> Scores:
        """Reward `name` of the registry, through the servers: (one score per image, info of per-sample lists)."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        reward = get_reward(name)
        if reward.remote is None:
            raise ValueError(
                f"reward {name!r} runs only in process (reward.mode=local), not through the servers"
            )
        return await reward.remote(self, images, prompts, metadata)


class SyncRewardClient:
    """A ``RewardClient`` on a private event-loop thread, for non-async code such as a sampling actor.

    ``submit`` returns a ``concurrent.futures.Future`` at once, so the caller keeps sampling while the reward
    requests are in flight; ``score`` is the blocking form.
    """

    def __init__(self, replicas: dict[str, list[str]], **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="reward-client", daemon=True)
        self._thread.start()
        self.client = RewardClient(replicas, **kwargs)

    def _run(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def submit(
        self, name: str, images: Images, prompts: Sequence[str], metadata: Metadata
    ) -> concurrent.futures.Future[Scores]:
        """Start scoring; the future resolves to (scores, info) or raises ``RewardRequestError``."""
        return self._run(self.client.score(name, list(images), list(prompts), list(metadata)))

    def score(
        self,
        name: str,
        images: Images,
        prompts: Sequence[str],
        metadata: Metadata,
        timeout_s: float | None = None,
    ) -> Scores:
        """Blocking ``RewardClient.score``."""
        return self.submit(name, images, prompts, metadata).result(timeout=timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        """Close HTTP connections and stop the loop thread (idempotent)."""
        if not self._loop.is_running():
            return
        try:
            self._run(self.client.aclose()).result(timeout=timeout_s)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=timeout_s)
            self._loop.close()

    @classmethod
    def from_config(cls, reward: RewardConfig, replicas: dict[str, list[str]]) -> SyncRewardClient:
        """A client with the run's reward settings: timeout, retries, and the bearer token from the environment
        variable `reward.auth_token_env` (unset or empty: no token)."""
        return cls(
            replicas,
            timeout_s=reward.timeout_s,
            max_retries=reward.max_retries,
            auth_token=os.environ.get(reward.auth_token_env) or None,
        )

    def __enter__(self) -> SyncRewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Scorer:
    """The one scoring path of samplers: the run's reward of a batch, each reward term in this process (mode local,
    on a worker thread) or through the reward servers (http). `submit` returns a future at once, so that the caller
    keeps sampling while the batch is scored; `score` waits for it.

    With several terms (`reward.terms`) the score is the weighted sum of the terms' raw scores, and the info holds
    each term's scores under "reward/<name>" (the learner normalises each term on its own) next to the terms' own
    info."""

    def __init__(self, reward: RewardConfig, replicas: dict[str, list[str]] | None = None) -> None:
        self.terms = reward.resolved_terms
        self.name = self.terms[0].name if len(self.terms) == 1 else "+".join(t.name for t in self.terms)
        self._client: SyncRewardClient | None = None
        self._locals: dict[str, RewardFn] = {}
        for term in self.terms:
            spec = get_reward(term.name)
            if reward.term_mode(term) == "local":
                if spec.local is None:
                    raise ValueError(
                        f"reward {term.name!r} has no local implementation; use reward.mode=http"
                    )
                self._locals[term.name] = spec.local
            elif self._client is None:
                self._client = SyncRewardClient.from_config(reward, replicas or {})
        # one thread per local term, one to combine several terms
        workers = len(self._locals) + (len(self.terms) > 1)
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, workers), thread_name_prefix="reward")

    def _submit_term(self, name: str, images: Images, prompts: Sequence[str], metadata: Metadata):
        if name in self._locals:
            return self._pool.submit(self._locals[name], list(images), list(prompts), list(metadata))
        return self._client.submit(name, images, prompts, metadata)

    def submit(
        self, images: Images, prompts: Sequence[str], metadata: Metadata
    ) -> concurrent.futures.Future[Scores]:
        futures = [self._submit_term(t.name, images, prompts, metadata) for t in self.terms]
        if len(self.terms) == 1:
            return futures[0]
        return self._pool.submit(self._combine, futures)

    def _combine(self, futures: list[concurrent.futures.Future[Scores]]) -> Scores:
        total: list[float] | None = None
        info: dict[str, list[Any]] = {}
        for term, future in zip(self.terms, futures, strict=True):
            scores, term_info = future.result()
            info.update(term_info)
            info[TERM_PREFIX + term.name] = [float(x) for x in scores]
            weighted = [term.weight * float(x) for x in scores]
            total = weighted if total is None else [a + b for a, b in zip(total, weighted, strict=True)]
        return total or [], info

    def score(self, images: Images, prompts: Sequence[str], metadata: Metadata) -> Scores:
        return self.submit(images, prompts, metadata).result()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        self._pool.shutdown(wait=False)
