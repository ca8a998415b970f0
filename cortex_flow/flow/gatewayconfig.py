"""The ``gateway:`` section of ``config.yaml``: HTTP and WebSocket for agents without Redis.

Off by default. It listens on loopback unless ``allow_public`` is set, and every request
but the index and the OpenAPI document needs an agent's token (``agents.X.token``).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, Field, WithJsonSchema, field_validator, model_validator

from cortex_flow.flow.hosts import (
    WILDCARDS,
    answered_hosts,
    host_name,
    host_port,
    is_loopback,
    listen_value,
)
from cortex_flow.flow.models import Model, field_error

MAX_BODY = 1024 * 1024


class GatewayTls(Model):
    """Serve HTTPS (and wss://) with this certificate and key (PEM files)."""

    cert: str = Field(min_length=1, description="PEM certificate chain, relative to this file.")
    key: str = Field(min_length=1, description="PEM private key, relative to this file.")


class GatewaySettings(Model):
    listen: Annotated[
        str | None,
        WithJsonSchema({"anyOf": [{"type": "string"}, {"const": False}, {"type": "null"}]}),
    ] = Field(
        default=None,
        description='host:port the gateway listens on (e.g. 127.0.0.1:8480); "off" (the '
        "default) disables it.",
    )
    allow_public: bool = Field(
        default=False,
        description="Allow a non-loopback `listen` (every endpoint still takes an agent's "
        "token); without `tls`, put a TLS-terminating proxy in front.",
    )
    allowed_hosts: list[Annotated[str, AfterValidator(host_name)]] = Field(
        default_factory=list,
        description="Host names the gateway answers to (the `Host:` header, port ignored), "
        'besides localhost, 127.0.0.1 and ::1. Empty: also the host of `listen`. "*": any.',
    )
    max_body: int = Field(
        default=MAX_BODY,
        ge=1024,
        le=64 * MAX_BODY,
        description="Largest request body in bytes (413 past it), and largest WebSocket frame.",
    )
    max_credit: int = Field(
        default=100,
        ge=1,
        le=10_000,
        description="Messages one inbox connection may hold unacknowledged at most, whatever "
        "credit its client gives: bounds the memory a slow client can take.",
    )
    idempotency_ttl: int = Field(
        default=86_400,
        ge=1,
        description="Seconds an `Idempotency-Key` is remembered: the same key within this "
        "time answers the first entry's ID without publishing again.",
    )
    max_request_timeout: float = Field(
        default=300.0,
        gt=0,
        le=3600,
        description="Longest `timeout` (seconds) a `POST /v1/requests/{stream}` or an A2A "
        "`message/send` may wait for its reply, holding its HTTP connection.",
    )
    tls: GatewayTls | None = None

    @field_validator("listen", mode="before")
    @classmethod
    def _off(cls, value: Any) -> Any:
        return listen_value(value, "127.0.0.1:8480")

    @model_validator(mode="after")
    def _loopback(self) -> GatewaySettings:
        where = self.host_port
        if where is None or is_loopback(where[0]):
            return self
        if not self.allow_public:
            raise field_error(
                "listen",
                f"gateway.listen {self.listen} is not a loopback address; set "
                "gateway.allow_public: true to let agents reach it from other machines "
                "(with gateway.tls, or behind a TLS proxy)",
            )
        if where[0] in WILDCARDS and not self.allowed_hosts:
            raise field_error(
                "listen",
                f"gateway.listen {self.listen} listens on every address, so the Host names "
                "clients use are unknown: list them in gateway.allowed_hosts (e.g. "
                '["10.0.0.5", "gateway.internal"]), or ["*"] to accept any Host header',
            )
        return self

    @property
    def host_port(self) -> tuple[str, int] | None:
        return host_port(self.listen)

    @property
    def hosts(self) -> frozenset[str]:
        """The ``Host:`` names answered (see :func:`cortex_flow.flow.hosts.answered_hosts`)."""
        return answered_hosts(self.listen, self.allowed_hosts)
