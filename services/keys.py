"""Every Redis key of one run, in one place: `ddpo:{run_id}:...`.

trajectories          stream of encoded ScoredTrajectory payloads (consumer group "learner")
trajectories:dead     dead-letter stream of entries that failed to decode or whose MAC did not verify
produced              list of every trajectory_id ever added (the ledger's "produced")
weights               hash {version, sha256, blob, seq, rollback, mac} of the newest policy weights
weights:version       the newest version (cheap GET)
weights:seq           publications so far (a resumed learner's rollback has a lower version, a higher seq)
weights:notify        pub/sub channel announcing each publication
weights:forged        publications the actors refused as forged (each actor adds one per forgery it saw)
quota:claimed         samples the actors have claimed (services.quota)
quota:limit:V         the claim limit of actors holding policy version V
stop                  set when the run is over: actors leave their loops
finish                set to end the run early: the learner finishes after its current epoch, checkpointed
pids                  hash actor id -> process id (operators, fault tests)
actor_time            hash actor id -> JSON {"busy_s", "wall_s"} (the learner's actor_idle_frac)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunKeys:
    run_id: str

    @property
    def prefix(self) -> str:
        return f"ddpo:{self.run_id}:"

    @property
    def pattern(self) -> str:
        """SCAN pattern of every key of the run."""
        return self.prefix + "*"

    @property
    def trajectories(self) -> str:
        return self.prefix + "trajectories"

    @property
    def dead_letters(self) -> str:
        return self.prefix + "trajectories:dead"

    @property
    def produced(self) -> str:
        return self.prefix + "produced"

    @property
    def weights(self) -> str:
        return self.prefix + "weights"

    @property
    def weights_version(self) -> str:
        return self.prefix + "weights:version"

    @property
    def weights_seq(self) -> str:
        return self.prefix + "weights:seq"

    @property
    def weights_notify(self) -> str:
        return self.prefix + "weights:notify"

    @property
    def weights_forged(self) -> str:
        return self.prefix + "weights:forged"

    @property
    def quota_claimed(self) -> str:
        return self.prefix + "quota:claimed"

    @property
    def quota_prefix(self) -> str:
        return self.prefix + "quota:"

    def quota_limit(self, version: int) -> str:
        return f"{self.prefix}quota:limit:{version}"

    @property
    def stop(self) -> str:
        return self.prefix + "stop"

    @property
    def finish(self) -> str:
        return self.prefix + "finish"

    @property
    def pids(self) -> str:
        return self.prefix + "pids"

    @property
    def actor_time(self) -> str:
        return self.prefix + "actor_time"
