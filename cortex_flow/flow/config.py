"""The runner's settings (``config.yaml``)."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from cortex_flow.flow.durations import Duration, PositiveDuration
from cortex_flow.flow.gatewayconfig import GatewaySettings
from cortex_flow.flow.hosts import LOOPBACK_NAMES as LOOPBACK_NAMES
from cortex_flow.flow.hosts import (
    MIN_TOKEN,
    WILDCARDS,
    answered_hosts,
    host_name,
    host_port,
    listen_value,
    token_text,
    valid_token,
)
from cortex_flow.flow.hosts import is_loopback as is_loopback
from cortex_flow.flow.limits import TemplateLimits
from cortex_flow.flow.modelerrors import show
from cortex_flow.flow.models import Model, field_error

URL_FORMS = (
    "use redis://host:port, rediss://host:port, unix:///path/to/socket, "
    "redis+sentinel://host:port/service, redis+cluster://host:port (rediss+sentinel:// and "
    "rediss+cluster:// for TLS), or embedded for a private server"
)


class RedisSettings(Model):
    url: str = Field(
        default="embedded",
        description="redis://, rediss://, unix://, redis+sentinel://, redis+cluster://, "
        "rediss+sentinel://, rediss+cluster://, or `embedded` (a private Valkey/Redis server "
        "under .cortex/).",
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
        description="Allow a non-loopback `listen`: /metrics is then readable by anyone who "
        "can reach the port (POST /reload still needs `admin.token`, required off loopback).",
    )
    allowed_hosts: list[Annotated[str, AfterValidator(host_name)]] = Field(
        default_factory=list,
        description="Host names the admin endpoint answers to (the `Host:` header, port "
        "ignored), against DNS rebinding, besides localhost, 127.0.0.1 and ::1 (always "
        'answered). Empty: also the host of `listen`. `"*"` accepts any.',
    )
    token: str | None = Field(
        default=None,
        repr=False,
        description="Bearer token that POST /reload (and every endpoint but /, /healthz, "
        "/readyz, /metrics) requires. Only from the environment: `${CORTEX_ADMIN_TOKEN}`. "
        f"At least {MIN_TOKEN} characters; required when `listen` is not loopback.",
    )

    @field_validator("listen", mode="before")
    @classmethod
    def _off(cls, value: Any) -> Any:
        return listen_value(value, "127.0.0.1:8477")

    @field_validator("token", mode="before")
    @classmethod
    def _token_text(cls, value: Any) -> Any:
        return token_text(value, "CORTEX_ADMIN_TOKEN")

    @field_validator("token", mode="after")
    @classmethod
    def _token(cls, value: str | None) -> str | None:
        return valid_token(value)

    @model_validator(mode="after")
    def _loopback(self) -> AdminSettings:
        where = self.host_port
        if where is None or is_loopback(where[0]):
            return self
        if not self.allow_public:
            raise field_error(
                "listen",
                f"admin.listen {self.listen} is not a loopback address; set admin.allow_public: "
                "true to expose /metrics and POST /reload beyond this machine",
            )
        if self.token is None:
            raise field_error(
                "listen",
                f"admin.listen {self.listen} is not a loopback address, so POST /reload needs "
                "a token: set admin.token: ${CORTEX_ADMIN_TOKEN} and export CORTEX_ADMIN_TOKEN "
                "(e.g. from `openssl rand -hex 32`)",
            )
        if where[0] in WILDCARDS and not self.allowed_hosts:
            raise field_error(
                "listen",
                f"admin.listen {self.listen} listens on every address, so the Host names "
                "clients use are unknown: list them in admin.allowed_hosts (e.g. "
                '["10.0.0.5", "runner-1.internal"]), or ["*"] to accept any Host header',
            )
        return self

    @property
    def host_port(self) -> tuple[str, int] | None:
        return host_port(self.listen)

    @property
    def hosts(self) -> frozenset[str]:
        """The ``Host:`` names answered: loopback names (a page elsewhere cannot send
        them), and ``allowed_hosts``, else the host of ``listen``."""
        return answered_hosts(self.listen, self.allowed_hosts)


class LogSettings(Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = Field(
        default="text",
        description="`json`: one JSON object per line (`ts`, `level`, `logger`, `msg`), "
        "with `message_id`, `group`, `stream` and `trace_id` where the line is about one.",
    )


class TemplateSettings(Model):
    """Bounds on one render of a template or ``when`` expression: a render over one fails
    that message only (dead-lettered with ``template exceeded its ...``); constant parts
    over them are validation errors. Settings of the process, applied at start and reload."""

    max_steps: int = Field(
        default=1_000_000, ge=1, description="Loop iterations and calls one render may make."
    )
    max_output: int = Field(
        default=10_000_000,
        ge=1,
        description="Characters (or list items) of one value or output a render may build; "
        "all values of one render together: 10 times this.",
    )
    timeout: PositiveDuration = Field(
        default=1.0, description="Longest one render may run (it runs on the event loop)."
    )

    def limits(self) -> TemplateLimits:
        return TemplateLimits(self.max_steps, self.max_output, self.timeout)


class HttpSettings(Model):
    """Where ``http`` and ``a2a`` routes may send. Link-local and cloud metadata addresses
    are refused, at validation for a literal host and at run time for what a host name
    resolves to."""

    allow: list[str] = Field(
        default_factory=list,
        description="Hosts and networks (CIDR) `http` and `a2a` routes may reach although "
        "link-local or cloud metadata addresses (169.254.0.0/16, fe80::/10, "
        "metadata.google.internal...).",
    )

    @field_validator("allow")
    @classmethod
    def _entries(cls, value: list[str]) -> list[str]:
        for entry in value:
            if not entry or (any(c in entry for c in " /:") and not _is_network(entry)):
                raise ValueError(
                    f"{show(entry)} is neither a host name nor an address or network "
                    "(e.g. metadata.google.internal, 169.254.169.254, 169.254.0.0/16)"
                )
        return value


def _is_network(entry: str) -> bool:
    try:
        ipaddress.ip_network(entry.strip("[]"), strict=False)
    except ValueError:
        return False
    return True


class CallSettings(Model):
    """Which modules ``call`` may target. Modules that run processes, evaluate or load code,
    touch files or the network, or change the interpreter (os, subprocess, builtins,
    shutil, pty, importlib, runpy, code, ctypes, multiprocessing, sys, socket, pickle,
    marshal, ...: the list is in docs/operating.md) are refused at validation, start and
    reload unless allowed here."""

    allow: list[
        Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")]
    ] = Field(
        default_factory=list,
        description="Module prefixes `call` may target although refused by default "
        "(os, subprocess, builtins, ...): `subprocess` allows subprocess and its submodules.",
    )


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
    templates: TemplateSettings = Field(default_factory=lambda: TemplateSettings())
    http: HttpSettings = Field(default_factory=lambda: HttpSettings())
    calls: CallSettings = Field(default_factory=lambda: CallSettings())
    gateway: GatewaySettings = Field(default_factory=lambda: GatewaySettings())
