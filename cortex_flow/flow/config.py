"""The runner's settings (``config.yaml``)."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from cortex_flow.flow.durations import Duration, PositiveDuration
from cortex_flow.flow.modelerrors import show
from cortex_flow.flow.models import Model, field_error

URL_FORMS = (
    "use redis://host:port, rediss://host:port, unix:///path/to/socket, "
    "redis+sentinel://host:port/service, redis+cluster://host:port (rediss+sentinel:// and "
    "rediss+cluster:// for TLS), or embedded for a private server"
)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (``localhost``, ``127.0.0.0/8``, ``::1``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to anything


class RedisSettings(Model):
    url: str = Field(
        default="embedded",
        description="redis://, rediss://, unix://, redis+sentinel://, redis+cluster://, "
        "rediss+sentinel://, rediss+cluster://, or `embedded` (a private server under .cortex/).",
    )

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if value == "embedded":
            return value
        # imported here: it loads redis-py, which `validate` needs for no other reason
        from cortex_flow.flow.urls import describe_url, validate_url

        try:
            return validate_url(value)
        except ValueError as exc:
            masked = describe_url(value)  # never the password
            if "is not a supported Redis URL" in str(exc):
                raise ValueError(f"{show(masked)} is not a Redis URL; {URL_FORMS}") from None
            text = str(exc).replace(repr(masked), show(masked), 1)
            if ";" not in text:
                text += "; write it as scheme://host:port, e.g. redis://127.0.0.1:6379"
            raise ValueError(text) from None


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
        default=2.0,
        description="How often the runner itself beats; silent for 3 x this, it is taken for "
        "down and other runners claim its pending messages.",
    )
    duty_lease: PositiveDuration = Field(
        default=5.0,
        description="How long a runner holds a duty (agent events, retention, clean-up) "
        "without renewing it; another runner takes the duty over after that.",
    )
    retention_interval: PositiveDuration = Field(
        default=10.0, description="How often streams with retention are trimmed."
    )
    dead_consumer_idle: PositiveDuration = Field(
        default=3600.0,
        description="A consumer whose runner no longer beats, idle this long, is deleted "
        "from its group once nothing is pending for it (its entries are claimed first).",
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
    allow_public: bool = Field(
        default=False,
        description="Allow a non-loopback `listen`: /metrics and POST /reload have no "
        "authentication, so anyone who can reach the port can read and reload.",
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

    @model_validator(mode="after")
    def _loopback(self) -> AdminSettings:
        where = self.host_port
        if where is not None and not self.allow_public and not is_loopback(where[0]):
            raise field_error(
                "listen",
                f"admin.listen {self.listen} is not a loopback address; set admin.allow_public: "
                "true to expose /metrics and POST /reload beyond this machine",
            )
        return self

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
