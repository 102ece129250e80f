"""Passwords in URLs: never shown, and taken from the environment where a URL has none.

A Redis URL may carry its password (`redis://:PASSWORD@host:6379/0`, `rediss://USER:PASSWORD@host:6380/0`,
`unix://:PASSWORD@/path/redis.sock`, or `?password=PASSWORD`). Whatever logs or saves a URL (a run's config.yaml, W&B
config, benchmark lines) writes `redact_url(url)`, with the password replaced by `***`.

A Redis URL without a password takes DDPO_REDIS_PASSWORD from the environment. That is how deployments hand the
password to jobs: from `.env` (docker compose) or a Secret (Kubernetes) into the Ray nodes' environment, which job
drivers and actors inherit, never on a job's command line (`ray job list` shows it). A config.yaml read back for
`--resume` has the redacted URL, which also takes the password from the environment.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import SplitResult, parse_qsl, quote, unquote, urlencode, urlsplit

REDIS_PASSWORD_ENV = "DDPO_REDIS_PASSWORD"
REDACTED = "***"


def _split_userinfo(netloc: str) -> tuple[str | None, str | None, str]:
    """'user:pw@host:6379' -> ('user', 'pw', 'host:6379'); no '@' -> (None, None, netloc). Still percent-encoded."""
    userinfo, at, hostport = netloc.rpartition("@")
    if not at:
        return None, None, netloc
    user, colon, password = userinfo.partition(":")
    return user, (password if colon else None), hostport


def _join(parts: SplitResult, netloc: str, query: list[tuple[str, str]] | None = None) -> str:
    """urlunsplit that keeps `//` before an empty netloc (`unix:///path`); `query` replaces the URL's own."""
    url = f"{parts.scheme}://{netloc}{parts.path}"
    query_string = parts.query if query is None else urlencode(query, safe="*/:")
    url += f"?{query_string}" if query_string else ""
    return url + (f"#{parts.fragment}" if parts.fragment else "")


def redact_url(url: str) -> str:
    """`url` with its password (in the user info or a `password=` query parameter) replaced by ***; the user name,
    host and everything else stay as they are."""
    parts = urlsplit(url)
    user, password, hostport = _split_userinfo(parts.netloc)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if password is None and all(key != "password" for key, _ in query):
        return url
    netloc = parts.netloc if password is None else f"{user}:{REDACTED}@{hostport}"
    if all(key != "password" for key, _ in query):
        return _join(parts, netloc)
    return _join(parts, netloc, [(key, REDACTED if key == "password" else value) for key, value in query])


def redact_urls(tree: Any) -> Any:
    """A copy of a JSON-like tree (a config dump) with every string that is a URL with a password redacted."""
    if isinstance(tree, dict):
        return {key: redact_urls(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [redact_urls(value) for value in tree]
    if isinstance(tree, str) and "://" in tree:
        return redact_url(tree)
    return tree


def redis_url_with_password(url: str) -> str:
    """The URL a Redis client connects with: `url` itself when it carries a password, else `url` with
    DDPO_REDIS_PASSWORD (when that is set) put in. A password redacted to *** (a config.yaml read back) needs the
    environment's; without it, a ValueError that says so."""
    parts = urlsplit(url)
    user, password, hostport = _split_userinfo(parts.netloc)
    query_password = dict(parse_qsl(parts.query)).get("password")
    own = password if password is not None else query_password
    if own is not None and unquote(own) not in ("", REDACTED):
        return url
    from_env = os.environ.get(REDIS_PASSWORD_ENV)
    if not from_env:
        if own is not None and unquote(own) == REDACTED:
            raise ValueError(
                f"{url}: the Redis password was redacted (a run's config.yaml); set {REDIS_PASSWORD_ENV}, or pass "
                "the URL with --set cluster.redis_url=..."
            )
        return url
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "password"]
    netloc = f"{quote(unquote(user or ''), safe='')}:{quote(from_env, safe='')}@{hostport}"
    return _join(parts, netloc, query)
