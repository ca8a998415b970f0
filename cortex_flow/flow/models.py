"""Pydantic models of flow files (``flows/*.yaml``, ``version: 1``).

Field-level rules live here; rules that span files (references, duplicates,
loops) live in :mod:`cortex_flow.flow.checks`. Every model forbids unknown keys.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from cortex_flow.flow.durations import Duration, PositiveDuration
from cortex_flow.flow.hosts import token_text, valid_token
from cortex_flow.flow.modelerrors import FIELD_RULE, show
from cortex_flow.flow.rates import Rate

NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_.-]*$"
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
CALL_PATTERN = rf"^{_IDENT}(\.{_IDENT})*:{_IDENT}(\.{_IDENT})*$"
CallTarget = Annotated[str, Field(pattern=CALL_PATTERN)]
DEFAULT_PRIORITIES = ("critical", "high", "normal", "low")


def field_error(field: str, message: str) -> PydanticCustomError:
    """A model-level rule reported at one of the model's fields (see modelerrors).

    ``message`` must not contain ``{field}``: pydantic fills ``{name}`` from the context.
    """
    return PydanticCustomError(FIELD_RULE, message, {"field": field})


class Model(BaseModel):
    """Base of every flow and config model: strict keys, immutable values."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class RetentionSpec(Model):
    """How much of a stream is kept once every group on it has read and acknowledged it."""

    max_len: int | None = Field(
        default=None,
        ge=1,
        description="Keep at most this many entries per key; entries a group has not read "
        "or holds pending are never trimmed, so a lagging group can hold a key above it.",
    )
    max_age: PositiveDuration | None = Field(
        default=None,
        description="Trim entries older than this (by entry ID), once every group on the "
        "key has read and acknowledged them.",
    )


class StreamSpec(Model):
    """A Redis stream, or a family of streams when ``key`` is a template."""

    key: str = Field(
        min_length=1,
        description="Redis key; a jinja2 template. `{{ priority }}` expands over `priorities`, "
        "`{{ agent }}` over the declared agents; other variables must be given by `vars`.",
    )
    priorities: list[Name] | None = Field(
        default=None,
        min_length=1,
        description="Priority levels, highest first (needs `{{ priority }}`).",
    )
    maxlen: int | None = Field(
        default=None,
        ge=1,
        description="The old spelling of `retention.max_len` (same meaning: never trims "
        "unread or pending entries).",
    )
    retention: RetentionSpec | None = Field(
        default=None,
        description="Trim by length and age, never what a group has not read and acknowledged; "
        "done by one runner at a time, every `runner.retention_interval`.",
    )
    codec: Literal["raw", "json"] = Field(
        default="raw",
        description="raw: `msg` is the entry's fields; json: the entry holds one field `data` "
        "with a JSON object, and `msg` is that object.",
    )
    partitions: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="Spread the stream over this many keys, one hash tag each (the key's "
        "`{{ partition }}` renders as `{p0}` ... `{pN-1}`), so on a Redis Cluster one "
        "stream's work spreads over the masters while each partition keeps its priority "
        "levels in one slot. A group reads every partition; the runners split them, "
        "each partition read by one runner at a time.",
    )
    partition_key: str | None = Field(
        default=None,
        min_length=1,
        description="Template over the published message (`{{ msg.conversation }}`) that "
        "picks its partition: the same value, the same partition, so one conversation "
        "stays in order. Without it, producers take the partitions in turn.",
    )
    description: str | None = None

    @model_validator(mode="after")
    def _one_cap(self) -> StreamSpec:
        both = self.retention is not None and self.retention.max_len is not None
        if self.maxlen is not None and both:
            raise field_error(
                "maxlen",
                "maxlen is the old spelling of retention.max_len and both are given; "
                "keep retention.max_len and remove maxlen",
            )
        return self

    @property
    def max_len(self) -> int | None:
        """The length cap: ``retention.max_len``, else the old ``maxlen``."""
        if self.retention is not None and self.retention.max_len is not None:
            return self.retention.max_len
        return self.maxlen

    @property
    def max_age(self) -> float | None:
        """The age cap in seconds (``retention.max_age``)."""
        return self.retention.max_age if self.retention is not None else None

    @property
    def retained(self) -> bool:
        """Whether retention trims this stream at all."""
        return self.max_len is not None or self.max_age is not None

    @field_validator("priorities")
    @classmethod
    def _priorities_unique(cls, value: list[str] | None) -> list[str] | None:
        if value and len(set(value)) != len(value):
            dupes = sorted({p for p in value if value.count(p) > 1})
            listed = ", ".join(f'"{d}"' for d in dupes)
            raise ValueError(
                f"priorities must be unique, but {listed} "
                f"{'is' if len(dupes) == 1 else 'are'} listed more than once; remove the repeat"
            )
        return value


class HeartbeatPolicy(Model):
    """How often an agent beats, and how long silence means it is down."""

    interval: PositiveDuration = Field(description="How often the agent publishes a heartbeat.")
    timeout: PositiveDuration | None = Field(
        default=None, description="Silence after which the agent is down; defaults to 3 x interval."
    )

    @property
    def effective_timeout(self) -> float:
        return self.timeout if self.timeout is not None else 3 * self.interval


class EventTarget(Model):
    """Where agent up/down events are published."""

    to: Name = Field(description="Stream that receives `agent_down` / `agent_up` events.")
    vars: dict[Name, str] = Field(default_factory=dict)


class HeartbeatsSpec(Model):
    """The heartbeat stream the runner follows, and what happens on silence."""

    stream: Name = Field(description="Stream agents publish heartbeats to (field `agent`).")
    on_down: EventTarget | None = None


class BackoffPolicy(Model):
    """Exponential backoff between deliveries of a failed message."""

    initial: Duration = 1.0
    max: Duration = 60.0
    multiplier: float = Field(default=2.0, ge=1.0, le=100.0)


class RetryPolicy(Model):
    """How failures are retried and when a message is dead-lettered."""

    max_deliveries: int = Field(
        default=5, ge=1, le=1000, description="Deliveries (Redis' count) before dead-lettering."
    )
    backoff: BackoffPolicy = Field(default_factory=lambda: BackoffPolicy())
    claim_idle: PositiveDuration = Field(
        default=60.0, description="Pending entries idle this long in any consumer are claimed."
    )


class AgentInbox(Model):
    """Read by the agent's `cortex_flow.Client` as consumer <agent> of `group`, with a policy.

    The consumer group it reads is declared here, so ``run`` creates it and ``status`` and
    ``plan`` know it; retry, claim and dead-letter work as in a runner group.
    """

    stream: Name = Field(
        default="inbox", description="The stream whose key per agent (`{{ agent }}`) it reads."
    )
    group: Name | None = Field(
        default=None, description="The consumer group the client reads; default: the agent's name."
    )
    start: Literal["earliest", "latest"] = Field(
        default="earliest", description="Where the group starts when `run` creates it."
    )
    retry: RetryPolicy = Field(default_factory=lambda: RetryPolicy())
    dead_letter: Name | None = Field(
        default=None,
        description="Stream for messages whose handling failed max_deliveries times; without "
        "one they stay pending (logged).",
    )


class A2ASkill(Model):
    """One skill of an A2A agent, as its agent card lists it."""

    id: Name = Field(description="The skill's ID, unique in the agent.")
    name: str = Field(min_length=1, description="Its name, for people.")
    description: str = Field(min_length=1, description="What it does.")
    tags: list[str] = Field(default_factory=list, description="Keywords.")
    examples: list[str] = Field(default_factory=list, description="Example prompts.")


class A2ASpec(Model):
    """Publish the agent as an A2A agent at the gateway: its agent card at
    `/a2a/<agent>/.well-known/agent-card.json`, JSON-RPC at `/a2a/<agent>`."""

    description: str = Field(min_length=1, description="What the agent does, for its card.")
    skills: list[A2ASkill] = Field(min_length=1, description="What it can do, for its card.")
    stream: Name = Field(
        description="The stream an A2A message is published to as a request; a group of the "
        "flows answers it."
    )
    priority: str | None = Field(
        default=None, description="The priority level of `stream`, when it is a priority stream."
    )
    version: str = Field(default="1.0.0", min_length=1, description="The card's `version`.")

    @field_validator("skills", mode="after")
    @classmethod
    def _unique(cls, value: list[A2ASkill]) -> list[A2ASkill]:
        seen: set[str] = set()
        for skill in value:
            if skill.id in seen:
                raise ValueError(f"skill id {skill.id!r} is given twice; skill ids are unique")
            seen.add(skill.id)
        return value


class AgentSpec(Model):
    """An agent of the system: gets an inbox per inbox-style stream and may beat."""

    heartbeat: HeartbeatPolicy | None = None
    inbox: AgentInbox | None = Field(
        default=None,
        description="Read by the agent's own process (`cortex_flow.Client.inbox`), not by a "
        "runner group: its consumer group and retry/dead-letter policy.",
    )
    description: str | None = None
    token: str | None = Field(
        default=None,
        repr=False,
        description="Bearer token this agent uses at the gateway (`gateway:` in config.yaml). "
        "Only from the environment: `${AGENT_TOKEN}`; at least 16 characters.",
    )
    may_send: list[Name] = Field(
        default_factory=list,
        description="Streams this agent may publish to through the gateway "
        "(e.g. [tasks, inbox]); none by default.",
    )
    a2a: A2ASpec | None = Field(
        default=None,
        description="Publish this agent as an A2A agent at the gateway (agent card, "
        "JSON-RPC `message/send`, `message/stream`, `tasks/get`, `tasks/cancel`).",
    )

    @field_validator("token", mode="before")
    @classmethod
    def _token_text(cls, value: Any) -> Any:
        return token_text(value, "AGENT_TOKEN")

    @field_validator("token", mode="after")
    @classmethod
    def _token(cls, value: str | None) -> str | None:
        return valid_token(value)


def _call_shorthand(value: Any) -> Any:
    if isinstance(value, str):
        return {"function": value}
    if value is None or isinstance(value, dict):
        return value
    raise ValueError(
        "call must be module.path:function, or a mapping with function: (and timeout:, "
        f"inline:), got {show(value)}"
    )


class CallAction(Model):
    """A Python callable: ``module.path:function``, sync or async; raising means failure."""

    function: str = Field(pattern=CALL_PATTERN, description="`module.path:function`.")
    timeout: PositiveDuration = Field(
        default=30.0, description="Longest a call may take before it fails."
    )
    inline: bool = Field(
        default=False,
        description="Run a sync function on the event loop instead of a thread: "
        "for fast, non-blocking functions only.",
    )


class HttpAction(Model):
    """POST the message as JSON to an endpoint (the legacy A2A bridge); non-2xx fails."""

    url: str = Field(
        pattern=r"^https?://",
        description="http:// or https:// URL. Scheme, host and port are fixed text; templates "
        "fill only the path and query, percent-encoded.",
    )
    timeout: PositiveDuration = 10.0
    method: Literal["POST", "PUT"] = "POST"
    headers: dict[str, str] = Field(
        default_factory=dict, description="Extra headers; use ${VAR} for secrets."
    )


class A2ACallAction(Model):
    """Send the message to an external A2A agent (JSON-RPC `message/send`, A2A protocol
    0.3) and take the reply (its task's artifacts) as the route's result; a task that
    ends failed, canceled or rejected, or a JSON-RPC error, fails the message."""

    url: str = Field(
        pattern=r"^https?://",
        description="The agent's JSON-RPC endpoint (the `url` of its agent card). Scheme, "
        "host and port are fixed text; templates fill only the path and query.",
    )
    timeout: PositiveDuration = Field(default=30.0, description="Longest the call may take.")
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="Extra headers, e.g. `Authorization: Bearer ${AGENT_TOKEN}`; use ${VAR} "
        "for secrets.",
    )


ACTIONS = ("to", "call", "http", "a2a", "drop")


class Route(Model):
    """One rule of a group's route table: first match wins unless `continue: true`."""

    name: str | None = Field(default=None, description="Shown in logs, metrics and graph.")
    when: str | None = Field(
        default=None, description="jinja2 expression over `msg`; no `when` matches everything."
    )
    to: Name | None = Field(default=None, description="Publish to this stream.")
    vars: dict[Name, str] = Field(
        default_factory=dict, description="Templates for the target key's variables."
    )
    set: dict[str, str] | None = Field(
        default=None, description="Build a new message from these templated fields (with `to`)."
    )
    call: Annotated[
        CallAction | None,
        BeforeValidator(_call_shorthand, json_schema_input_type=CallTarget | CallAction | None),
        Field(description="`module.path:function`, or a mapping with function and timeout."),
    ] = None
    http: HttpAction | None = None
    a2a: A2ACallAction | None = None
    drop: Literal[True] | None = Field(default=None, description="Acknowledge and discard.")
    continue_: bool = Field(
        default=False,
        alias="continue",
        description="Go on to the next matching route after this one.",
    )

    @model_validator(mode="after")
    def _one_action(self) -> Route:
        actions = [n for n in ACTIONS if getattr(self, n) is not None]
        if not actions:
            raise ValueError(
                "a route needs exactly one action (to, call, http, a2a or drop: true) but has "
                "none; add one"
            )
        if len(actions) > 1:
            raise ValueError(
                "a route needs exactly one action (to, call, http, a2a or drop: true) but has "
                f"{' and '.join(actions)}; split it into routes with continue: true, "
                "or remove all but one"
            )
        if self.to is None:
            for field in ("vars", "set"):
                if getattr(self, field):
                    raise field_error(
                        field,
                        f"{field} only applies to a route that publishes with to; "
                        f"this route uses {actions[0]}, so remove {field}",
                    )
        return self

    @property
    def action(self) -> Literal["to", "call", "http", "a2a", "drop"]:
        if self.to is not None:
            return "to"
        if self.call is not None:
            return "call"
        if self.a2a is not None:
            return "a2a"
        return "http" if self.http is not None else "drop"

    @property
    def outbound(self) -> HttpAction | A2ACallAction | None:
        """The action that sends to a URL (``http`` or ``a2a``), if it is one."""
        return self.http or self.a2a


class RateLimit(Model):
    """A rate every runner serving the group shares: a token bucket in Redis."""

    rate: Rate = Field(
        description="How many messages start per unit of time (`/s`, `/m`, `/h`): `60/m`, `20/s`."
    )
    burst: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="How many may start at once after a quiet spell; default one second's worth.",
    )
    key: str | None = Field(
        default=None,
        description='A template giving each value its own bucket, e.g. `"{{ msg.tenant }}"`.',
    )


class DedupPolicy(Model):
    """Messages whose key was handled within the window are acknowledged unhandled."""

    key: str = Field(description='A template naming the message, e.g. `"{{ msg.id }}"`.')
    window: PositiveDuration = Field(description="How long a handled key is remembered.")


class GroupSpec(Model):
    """A Redis consumer group and the routes its messages take."""

    stream: Name = Field(description="The stream (or stream family) the group reads.")
    start: Literal["earliest", "latest"] = Field(
        default="earliest", description="Where a group that does not exist yet starts reading."
    )
    concurrency: int = Field(
        default=64,
        ge=1,
        le=10_000,
        description=(
            "Handlers running at once per runner (as many again may wait, read ahead). "
            "The default suits I/O-bound agents: 64 model or API calls in flight per group, "
            "a 64-thread pool at most for a plain `def`."
        ),
    )
    batch: int = Field(default=100, ge=1, le=10_000, description="XREADGROUP COUNT.")
    max_stuck_calls: int | None = Field(
        default=None,
        ge=1,
        le=10_000,
        description=(
            "Sync calls of this group that may run on past their timeout (each holds a "
            "thread: Python cannot stop it) before the group starts no new message until "
            "one returns; stuck calls never take threads other groups need. Default: the "
            "group's concurrency."
        ),
    )
    priority: Literal["strict", "weighted"] = "strict"
    weights: dict[Name, Annotated[int, Field(ge=1)]] | None = Field(
        default=None,
        description="Share per priority when `priority: weighted`; default halves per level.",
    )
    retry: RetryPolicy = Field(default_factory=lambda: RetryPolicy())
    dead_letter: Name | None = Field(
        default=None, description="Stream for messages that exhaust retries or cannot be decoded."
    )
    vars: dict[Name, str] = Field(
        default_factory=dict, description="Bind the stream key's variables (e.g. agent)."
    )
    routes: list[Route] = Field(min_length=1)
    ttl: PositiveDuration | None = Field(
        default=None,
        description="Deadline of messages that carry none, counted from when they were "
        "published; one read later is not handled (dead-lettered with `dlq_error` "
        "`expired: ...`, or acknowledged and counted without a dead_letter).",
    )
    track: bool = Field(
        default=False,
        description="Keep a task state (completed, failed, expired, canceled) for every "
        "message, not only for requests; see `cortex-flow task`.",
    )
    keep_tasks: PositiveDuration = Field(
        default=3600.0, description="How long a settled task state is kept before it expires."
    )
    max_reply_bytes: int = Field(
        default=1_048_576,
        ge=1,
        description="A reply (a call's return value as JSON) larger than this fails the "
        "message with that reason.",
    )
    rate_limit: RateLimit | None = Field(
        default=None, description="A rate shared by every runner serving the group."
    )
    max_in_flight: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="Handlers running at once across all runners (leases, released on death).",
    )
    dedup: DedupPolicy | None = Field(
        default=None, description="Acknowledge, unhandled, a message whose key was handled."
    )
    description: str | None = None

    @model_validator(mode="after")
    def _weights(self) -> GroupSpec:
        if self.weights is not None and self.priority != "weighted":
            raise field_error(
                "weights",
                "weights only apply with priority: weighted; add priority: weighted "
                "or remove weights",
            )
        return self


class FlowFile(Model):
    """One flow file; all files of the folder together form the topology."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        populate_by_name=True,
        json_schema_extra={"title": "cortex-flow flow file"},
    )

    version: Literal[1] = Field(description="Format version; always 1.")
    streams: dict[Name, StreamSpec] = Field(default_factory=dict)
    agents: dict[Name, AgentSpec | None] = Field(default_factory=dict)
    heartbeats: HeartbeatsSpec | None = None
    groups: dict[Name, GroupSpec] = Field(default_factory=dict)
