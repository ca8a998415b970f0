"""The runner's settings (``config.yaml``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from cortex_flow.durations import Duration
from cortex_flow.models import Model


class RedisSettings(Model):
    url: str = Field(
        "embedded",
        description="redis://, rediss://, unix://, redis+sentinel://, redis+cluster://, "
        "or `embedded` (a private server under .cortex/).",
    )

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        schemes = ("redis://", "rediss://", "unix://", "redis+sentinel://", "redis+cluster://")
        if value != "embedded" and not value.startswith(schemes):
            raise ValueError(
                f"{value!r} is not a Redis URL; use redis://host:port, rediss://, unix://path, "
                "redis+sentinel://host:port/service, redis+cluster://host:port or embedded"
            )
        return value


class RunnerSettings(Model):
    name: str = Field(
        "cortex",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$",
        description="Consumer names derive from it: keep it stable and unique per runner.",
    )
    shutdown_grace: Duration = Field(30.0, description="Time to finish in-flight work on stop.")
    heartbeat_interval: Duration = Field(10.0, description="How often the runner itself beats.")


class ReloadSettings(Model):
    watch: bool = True
    debounce: Duration = 0.2


class AdminSettings(Model):
    listen: str | None = Field(
        "127.0.0.1:8477", description='host:port for /healthz, /readyz, /metrics; "off" disables.'
    )

    @field_validator("listen", mode="before")
    @classmethod
    def _off(cls, value: Any) -> Any:
        if value is False or value is None or (isinstance(value, str) and value.lower() == "off"):
            return None
        if isinstance(value, str) and value.rpartition(":")[2].isdigit():
            return value
        raise ValueError(f'must be host:port (e.g. 127.0.0.1:8477) or "off", got {value!r}')

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

    redis: RedisSettings = Field(default_factory=RedisSettings)
    flows: str = Field("flows/", description="Flows folder, relative to this file.")
    runner: RunnerSettings = Field(default_factory=RunnerSettings)
    reload: ReloadSettings = Field(default_factory=ReloadSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    log: LogSettings = Field(default_factory=LogSettings)
