"""Who may write the data plane: HMAC-SHA256 under a per-run secret, so only the learner publishes weights and only
the sampling actors produce trajectories.

Anyone who can write to the run's Redis could otherwise append trajectories with forged rewards (the learner trains
on them) or publish a LoRA that every actor loads; the sha256 next to a weight version detects corruption, not
forgery. With a run secret:

- a trajectory stream entry carries ``mac`` = HMAC(secret, "ddpo.trajectory", run_id, trajectory_id, payload) next to
  its payload (the encoded ``ScoredTrajectory``); the learner drops an entry whose MAC does not verify;
- a weight version carries ``mac`` = HMAC(secret, "ddpo.weights", run_id, seq, version, rollback, sha256 of the
  blob); an actor refuses a version whose MAC does not verify and keeps its weights. The publication counter ``seq``
  is signed too, so an old genuine version written back cannot replace a newer one.

The secret reaches a run's processes through the environment (``DDPO_RUN_SECRET``, hex or any string): a cluster job
sets it for the driver and every Ray node; a local run without it has the driver generate one (``new_run_secret``)
and hand it to the actors it creates. It is never written to config.yaml, logs or metrics. Without a secret (unit
tests that build streams directly, ``cluster.in_process``) nothing is signed or checked.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

RUN_SECRET_ENV = "DDPO_RUN_SECRET"

_TRAJECTORY = b"ddpo.trajectory"
_WEIGHTS = b"ddpo.weights"


def new_run_secret() -> str:
    """A fresh random run secret (256 bits, hex)."""
    return secrets.token_hex(32)


def run_secret_from_env() -> str | None:
    """DDPO_RUN_SECRET, or None when it is unset or empty."""
    return os.environ.get(RUN_SECRET_ENV) or None


def _frame(*parts: bytes) -> bytes:
    """Length-prefixed parts: no two different part lists give the same message."""
    return b"".join(len(p).to_bytes(8, "big") + p for p in parts)


class RunSigner:
    """MACs of one run's trajectories and weight versions under its secret."""

    def __init__(self, secret: str | bytes, run_id: str) -> None:
        key = secret.encode() if isinstance(secret, str) else bytes(secret)
        if not key:
            raise ValueError("the run secret is empty")
        self._key = key
        self._run_id = run_id.encode()

    @classmethod
    def for_run(cls, run_id: str, secret: str | bytes | None = None) -> RunSigner | None:
        """A signer from `secret`, else from DDPO_RUN_SECRET; None when neither is set (signing off)."""
        secret = secret or run_secret_from_env()
        return cls(secret, run_id) if secret else None

    def _mac(self, *parts: bytes) -> bytes:
        return hmac.new(self._key, _frame(self._run_id, *parts), hashlib.sha256).hexdigest().encode()

    # ---- trajectories (producer: a sampling actor; verifier: the learner) -------------------------------------------
    def trajectory_mac(self, trajectory_id: bytes, payload: bytes) -> bytes:
        """The MAC (hex bytes) of one stream entry: its trajectory_id field and its encoded payload."""
        return self._mac(_TRAJECTORY, trajectory_id, payload)

    def verify_trajectory(self, trajectory_id: bytes, payload: bytes, mac: bytes | None) -> bool:
        return mac is not None and hmac.compare_digest(self.trajectory_mac(trajectory_id, payload), mac)

    # ---- weights (producer: the learner; verifier: every sampling actor) --------------------------------------------
    def weights_mac(self, seq: int, version: int, rollback: bool, sha256_hex: str) -> bytes:
        """The MAC (hex bytes) of one weight publication (the blob enters through its sha256)."""
        return self._mac(_WEIGHTS, str(seq).encode(), str(version).encode(), b"1" if rollback else b"0",
                         sha256_hex.encode())  # fmt: skip

    def verify_weights(
        self, seq: int, version: int, rollback: bool, sha256_hex: str, mac: bytes | None
    ) -> bool:
        return mac is not None and hmac.compare_digest(
            self.weights_mac(seq, version, rollback, sha256_hex), mac
        )
