"""Server settings: pydantic-settings models read from `DDPO_REWARD_*` environment variables and CLI flags.

Every field of a settings class is an environment variable (`port` -> `DDPO_REWARD_PORT`) and, except
`auth_token`, a flag of `ddpo serve KIND` (`max_batch_size` -> `--max-batch-size`). Flags override the environment.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    import torch

ENV_PREFIX = "DDPO_REWARD_"


class ServerSettings(BaseSettings):
    """What every reward server takes: where to listen, how to batch, what input to refuse."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    host: str = Field("127.0.0.1", description="interface to bind; 0.0.0.0 exposes the server to the network")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one)")
    max_batch_size: int = Field(32, ge=1, description="most items (images or text pairs) in one model batch")
    max_wait_ms: float = Field(
        10.0, ge=0, description="longest time the oldest queued item waits for a batch to fill, in ms"
    )
    max_queue: int = Field(
        1024, ge=1, description="most items waiting for the model; more -> 429 with Retry-After"
    )
    max_items: int = Field(64, ge=1, description="most images (or text pairs) in one request; more -> 413")
    max_body_bytes: int = Field(
        64 * 2**20, ge=1024, description="largest request body in bytes; larger -> 413"
    )
    max_pixels: int = Field(
        4096 * 4096,
        ge=1,
        description="largest image (width x height) accepted; larger -> 413 (decompression bombs)",
    )
    max_request_pixels: int = Field(
        64 * 1024 * 1024,
        ge=1,
        description="most pixels of all images of one request together (64 MPix = 192 MB decoded); more -> 413",
    )
    request_timeout_s: float = Field(
        120.0,
        gt=0,
        description="deadline of a request in seconds (a client may ask for less); past it -> 504",
    )
    auth_token: SecretStr | None = Field(
        None, description="bearer token required on /v1/* (environment only, never a flag); unset = no auth"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="log level"
    )

    @field_validator("auth_token", mode="before")
    @classmethod
    def _empty_token_is_unset(cls, value: object) -> object:
        """DDPO_REWARD_AUTH_TOKEN="" (as compose passes an unset variable) means no auth, explicitly."""
        return None if value == "" else value

    access_log: bool = Field(True, description="log one line per HTTP request")


class ModelSettings(ServerSettings):
    """Servers that load a neural network: which one, on which device, in which precision."""

    model: str = Field(..., description="hub id or local directory of the model")
    device: str = Field(
        "cpu", pattern=r"^(cpu|cuda(:\d+)?)$", description="torch device: cpu, cuda or cuda:N"
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="weights and activations precision; auto = float32 on cpu, float16 on cuda"
    )

    def torch_dtype(self) -> torch.dtype:
        """The torch dtype that `dtype` names (auto resolved against `device`)."""
        import torch  # lazily: settings are parsed before the model loads, and the jpeg server needs no torch

        if self.dtype == "auto":
            return torch.float32 if self.device == "cpu" else torch.float16
        return getattr(torch, self.dtype)
