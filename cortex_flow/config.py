"""The runner's settings (``config.yaml``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, WithJsonSchema, field_validator

from cortex_flow.durations import Duration, PositiveDuration
from cortex_flow.modelerrors import show
from cortex_flow.models import Model

REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://", "redis+cluster://")


class RedisSettings(Model):
    url: str = Field(
        default="embedded",
        description="redis://, rediss://, unix://, redis+sentinel://, redis+cluster://, "
        "or `embedded` (a private server under .cortex/).",
    )

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if value != "embedded" and not value.startswith(REDIS_SCHEMES):
            raise ValueError(
                f"{show(value)} is not a Redis URL; use redis://host:port, rediss://host:port, "
                "unix:///path/to/socket, redis+sentinel://host:port/service, "
                "redis+cluster://host:port, or embedded for a private server"
            )
        return value


class RunnerSettings(Model):
    name: str = Field(
        default="cortex",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$",
        description="Consumer names derive from it: keep it stable and unique per runner.",
    )
    shutdown_grace: Duration = Field(
        default=30.0, description="Time to finish in-flight work on stop."
    )
    heartbeat_interval: PositiveDuration = Field(
        default=10.0, description="How often the runner itself beats."
    )


class ReloadSettings(Model):
    watch: bool = True
    debounce: Duration = 0.2


class AdminSettings(Model):
    listen: Annotated[
        str | None,
        WithJsonSchema({"anyOf": [{"type": "string"}, {"const": False}, {"type": "null"}]}),
    ] = Field(
        default="127.0.0.1:8477",
        description='host:port for /healthz, /readyz, /metrics; "off" (or false) disables.',
    )

    @field_validator("listen", mode="before")
    @classmethod
    def _off(cls, value: Any) -> Any:
        if value is False or value is None or (isinstance(value, str) and value.lower() == "off"):
            return None
        if isinstance(value, str):
            port = value.rpartition(":")[2]
            if port.isdigit() and int(port) <= 65535:
                return value
        raise ValueError(
            f'must be host:port (e.g. 127.0.0.1:8477) or "off" to disable, got {show(value)}'
        )

    @property
    def host_port(self) -> tuple[str, int] | None:
        if self.listen is None:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]") or "127.0.0.1", int(port)


class LogSettings(Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class Config(Model):
    """Everything in ``config.yaml``; every section is optional."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        populate_by_name=True,
        json_schema_extra={"title": "cortex-flow config file"},
    )

    redis: RedisSettings = Field(default_factory=lambda: RedisSettings())
    flows: str = Field(default="flows/", description="Flows folder, relative to this file.")
    runner: RunnerSettings = Field(default_factory=lambda: RunnerSettings())
    reload: ReloadSettings = Field(default_factory=lambda: ReloadSettings())
    admin: AdminSettings = Field(default_factory=lambda: AdminSettings())
    log: LogSettings = Field(default_factory=lambda: LogSettings())
