"""Rules that span files: references, template names, key variables, loops, limits.

Pure functions over a merged :class:`Topology`; each returns problems, never raises.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

from cortex_flow.errors import Problem
from cortex_flow.flow.callables import check_imports, resolve_callable
from cortex_flow.flow.declared import Origin, Topology
from cortex_flow.flow.durations import format_duration as dur
from cortex_flow.flow.flowcontrol import check_flow_control
from cortex_flow.flow.limits import TemplateLimits, current_limits
from cortex_flow.flow.modelerrors import did_you_mean
from cortex_flow.flow.models import DEFAULT_PRIORITIES, GroupSpec, Route, StreamSpec
from cortex_flow.flow.policies import check_inbox, check_retry
from cortex_flow.flow.references import Sub, single_key, stream_ref
from cortex_flow.flow.slots import PARTITION, hash_tag, partition_tag
from cortex_flow.flow.templates import (
    RUNTIME_NAMES,
    Expression,
    Template,
    TemplateLimitError,
    TemplateSyntaxError,
    builtin_names,
)
from cortex_flow.flow.topology import EXPANDABLE, expand, key_template, key_variables

__all__ = ["check_imports", "check_topology", "resolve_callable"]


def _syntax_message(exc: TemplateSyntaxError, source: str) -> str:
    text = (exc.message or "invalid syntax").rstrip(".")
    text = text[:1].lower() + text[1:]
    return f"{text} (line {exc.lineno} of the text)" if "\n" in source.strip() else text


def _compile(source: str, expression: bool) -> Template | Expression | str:
    """Compile once per distinct source; a string result says what is wrong with it."""
    return _compile_under(source, expression, current_limits())  # constants fold under them


@lru_cache(maxsize=8192)
def _compile_under(
    source: str, expression: bool, limits: TemplateLimits
) -> Template | Expression | str:
    try:
        return Expression(source) if expression else key_template(source)
    except TemplateSyntaxError as exc:
        return "has a syntax error: " + _syntax_message(exc, source)
    except TemplateLimitError as exc:  # a constant part already over a bound
        where = f" (line {exc.lineno} of the text)" if "\n" in source.strip() else ""
        return f"cannot run: {exc.message}{where}; compute less in the template"


def _short(source: str) -> str:
    text = " ".join(source.split())
    return text if len(text) <= 60 else text[:57] + "..."


def _template(
    origin: Origin,
    sub: Sub,
    source: str,
    names: Iterable[str],
    problems: list[Problem],
    expression: bool = False,
) -> frozenset[str]:
    compiled = _compile(source, expression)
    kind = "expression" if expression else "template"
    if isinstance(compiled, str):
        problems.append(origin.problem(sub, f'{kind} "{_short(source)}" {compiled}'))
        return frozenset()
    allowed = sorted(set(names))
    for name in sorted(compiled.variables - set(names) - builtin_names()):
        hint = did_you_mean(name, allowed) or f"; the names available are {', '.join(allowed)}"
        problems.append(origin.problem(sub, f'{kind} uses unknown name "{name}"{hint}'))
    return compiled.variables


def check_topology(topo: Topology) -> list[Problem]:
    """Every cross-file rule; all problems at once."""
    problems: list[Problem] = []
    for name, spec in topo.streams.items():
        _check_stream(topo, name, spec, problems)
    agents = sorted(topo.agents)
    for name, group in topo.groups.items():
        _check_group(topo, name, group, agents, problems)
    for name, agent in topo.agents.items():
        if agent.inbox is not None:
            check_inbox(topo, name, agent.inbox, problems)
        for i, stream in enumerate(agent.may_send):
            origin = topo.origin("agents", name)
            stream_ref(topo, origin, ("may_send", i), stream, "stream", problems)
        if agent.a2a is not None:
            origin = topo.origin("agents", name)
            stream_ref(topo, origin, ("a2a", "stream"), agent.a2a.stream, "stream", problems)
        hb = agent.heartbeat
        if hb and hb.timeout is not None and hb.timeout <= hb.interval:
            problems.append(
                topo.origin("agents", name).problem(
                    ("heartbeat", "timeout"),
                    f"timeout ({dur(hb.timeout)}) must be longer than interval "
                    f"({dur(hb.interval)}), or the agent is marked down between two beats; "
                    "raise it, or remove it for the default of 3 x interval",
                )
            )
    if topo.heartbeats is not None:
        origin = topo.origin("heartbeats")
        single_key(topo, origin, ("stream",), topo.heartbeats.stream, "heartbeat stream", problems)
        on_down = topo.heartbeats.on_down
        if on_down is not None:
            target = stream_ref(
                topo, origin, ("on_down", "to"), on_down.to, "event stream", problems
            )
            if target is not None:
                _check_publish_vars(
                    origin, ("on_down",), target, on_down.to, set(on_down.vars), {"agent"}, problems
                )
    problems.extend(_key_collisions(topo))
    return problems


def _check_stream(topo: Topology, name: str, spec: StreamSpec, problems: list[Problem]) -> None:
    origin = topo.origin("streams", name)
    compiled = _compile(spec.key, False)
    if isinstance(compiled, str):
        problems.append(origin.problem(("key",), f'key "{_short(spec.key)}" {compiled}'))
        return
    variables = compiled.variables
    if spec.priorities and "priority" not in variables:
        problems.append(
            origin.problem(
                ("key",),
                f'the stream declares priorities but its key "{spec.key}" has no '
                "{{ priority }}, so every level would share one Redis key; add {{ priority }} "
                f'to the key, e.g. "{spec.key}:{{{{ priority }}}}"',
            )
        )
    if "priority" in variables and not spec.priorities:
        problems.append(
            origin.problem(
                ("key",),
                "the key uses {{ priority }} but the stream declares no priorities; add "
                f"priorities: [{', '.join(DEFAULT_PRIORITIES)}] (highest first)",
            )
        )
    bound_by_messages = sorted(variables - set(EXPANDABLE))
    if spec.retained and bound_by_messages:
        field = ("maxlen",) if spec.maxlen is not None else ("retention",)
        problems.append(
            origin.problem(
                field,
                f'the key "{_short(spec.key)}" has variables only a message binds '
                f"({', '.join(bound_by_messages)}), so the retention pass cannot list its keys "
                "to trim; cap a stream whose keys expand over priority and agent only, or "
                "trim these keys yourself",
            )
        )
    for bad in sorted(variables & (RUNTIME_NAMES - set(EXPANDABLE))):
        problems.append(
            origin.problem(
                ("key",),
                f'the key uses "{bad}", which only exists while a message is handled; '
                "name a key variable instead (e.g. {{ tenant }}) and bind it with vars",
            )
        )
    _check_partitions(origin, spec, variables, problems)


def _check_partitions(
    origin: Origin, spec: StreamSpec, variables: frozenset[str], problems: list[Problem]
) -> None:
    """``partitions`` needs ``{{ partition }}`` in the key, as its first hash tag."""
    if spec.partitions is None:
        if PARTITION in variables:
            problems.append(
                origin.problem(
                    ("key",),
                    "the key uses {{ partition }} but the stream declares no partitions; "
                    "add partitions: N (e.g. partitions: 6)",
                )
            )
        if spec.partition_key is not None:
            problems.append(
                origin.problem(
                    ("partition_key",),
                    "partition_key picks a partition, but the stream declares no "
                    "partitions; add partitions: N, or remove partition_key",
                )
            )
        return
    if PARTITION not in variables:
        head = spec.key.split("{{", 1)[0].rstrip(":") or "stream"
        problems.append(
            origin.problem(
                ("key",),
                f'a stream with partitions needs {{{{ partition }}}} in its key "{spec.key}" '
                "(it becomes the hash tag {p0}, {p1}, ...); e.g. "
                f'"{head}:{{{{ partition }}}}'
                + (':{{ priority }}"' if "priority" in variables else '"'),
            )
        )
    else:
        values = {v: "x" for v in variables} | {PARTITION: partition_tag(0)}
        rendered = key_template(spec.key).render_values(values)
        if hash_tag(rendered) != "p0":
            problems.append(
                origin.problem(
                    ("key",),
                    f'the key "{spec.key}" has another {{...}} before {{{{ partition }}}}, so '
                    "that one is the hash tag and every partition lands in the same cluster "
                    "slot; remove the other braces",
                )
            )
    if spec.partition_key is not None:
        _template(origin, ("partition_key",), spec.partition_key, {"msg"}, problems)


def _check_group(
    topo: Topology, name: str, group: GroupSpec, agents: list[str], problems: list[Problem]
) -> None:
    origin = topo.origin("groups", name)
    spec = stream_ref(topo, origin, ("stream",), group.stream, "stream", problems)
    if group.dead_letter is not None:
        if group.dead_letter == group.stream:
            problems.append(
                origin.problem(
                    ("dead_letter",),
                    f'dead_letter "{group.dead_letter}" is the stream this group reads, so '
                    "failed messages would be read again forever; use a separate stream "
                    "such as dlq",
                )
            )
        else:
            single_key(topo, origin, ("dead_letter",), group.dead_letter, "dead_letter", problems)
    check_retry(origin, group.retry, problems)
    if spec is None:
        return
    variables = key_variables(spec)
    check_flow_control(
        origin, group, set(group.vars) | variables, problems, partitioned=bool(spec.partitions)
    )
    for var in sorted(set(group.vars) - variables):
        problems.append(
            origin.problem(
                ("vars", var),
                f'"{var}" is not a variable of the key of stream "{group.stream}" '
                f'("{spec.key}"); remove it from vars',
                at_key=True,
            )
        )
    if PARTITION in group.vars:
        problems.append(
            origin.problem(
                ("vars", PARTITION),
                "a group reads every partition of its stream (the partition is picked per "
                "message); remove partition from vars",
                at_key=True,
            )
        )
    for var, value in group.vars.items():
        if "{{" in value or "{%" in value:
            problems.append(
                origin.problem(
                    ("vars", var),
                    f'group vars are fixed values, not templates, got "{value}"; '
                    "a group reads known keys before any message arrives",
                )
            )
    _, dynamic = expand(spec, group.stream, agents, group.vars)
    if dynamic:
        missing = sorted(variables - set(group.vars) - set(EXPANDABLE))
        problems.append(
            origin.problem(
                ("stream",),
                f'stream "{group.stream}" has a key variable the group must fix '
                f'("{spec.key}"); add vars: {{' + ", ".join(f"{m}: <value>" for m in missing) + "}",
            )
        )
    elif "agent" in variables - set(group.vars) and not topo.agents:
        problems.append(
            origin.problem(
                ("stream",),
                f'stream "{group.stream}" has one key per agent but no agents are '
                "declared; declare agents, or read one agent's stream with vars: {agent: <name>}",
            )
        )
    _check_weights(origin, group, spec, problems)
    context = set(RUNTIME_NAMES) | set(group.vars) | variables
    for index, route in enumerate(group.routes):
        _check_route(topo, origin, ("routes", index), route, group, spec, context, problems)


def _check_weights(
    origin: Origin, group: GroupSpec, spec: StreamSpec, problems: list[Problem]
) -> None:
    if group.priority != "weighted":
        return
    if not spec.priorities or "priority" in group.vars:
        why = "has none" if not spec.priorities else "is fixed to one level by vars.priority"
        problems.append(
            origin.problem(
                ("priority",),
                f'priority: weighted needs a stream with priorities, but stream "{group.stream}" '
                f"{why}; use priority: strict",
            )
        )
        return
    if group.weights is None:
        return
    levels = ", ".join(spec.priorities)
    for level in sorted(set(group.weights) - set(spec.priorities)):
        problems.append(
            origin.problem(
                ("weights", level),
                f'"{level}" is not a priority of stream "{group.stream}" ({levels}); '
                "remove it or fix the spelling",
                at_key=True,
            )
        )
    for level in [p for p in spec.priorities if p not in group.weights]:
        problems.append(
            origin.problem(
                ("weights",),
                f'no weight given for priority "{level}"; give every level of stream '
                f'"{group.stream}" ({levels}) a weight, or remove weights for the default',
            )
        )


def _check_route(
    topo: Topology,
    origin: Origin,
    sub: tuple[str | int, ...],
    route: Route,
    group: GroupSpec,
    source: StreamSpec,
    context: set[str],
    problems: list[Problem],
) -> None:
    if route.when is not None:
        _template(origin, (*sub, "when"), route.when, context, problems, expression=True)
    for field, value in (route.set or {}).items():
        _template(origin, (*sub, "set", field), value, context, problems)
    for var, value in route.vars.items():
        _template(origin, (*sub, "vars", var), value, context, problems)
    if route.outbound is not None:
        _template(origin, (*sub, route.action, "url"), route.outbound.url, context, problems)
    if route.to is None:
        return
    target = stream_ref(topo, origin, (*sub, "to"), route.to, "route target", problems)
    if target is None:
        return
    source_vars = key_variables(source)
    inherited = {v for v in EXPANDABLE if v in source_vars or v in group.vars}
    inherited.add(PARTITION)  # picked per message (partition_key, or in turn)
    if PARTITION in route.vars and PARTITION in key_variables(target):
        problems.append(
            origin.problem(
                (*sub, "vars", PARTITION),
                "the partition is picked per message by the target stream's partition_key "
                "(or in turn); remove partition from vars and set partition_key on the "
                f'stream "{route.to}"',
                at_key=True,
            )
        )
    _check_publish_vars(origin, sub, target, route.to, set(route.vars), inherited, problems)
    if target.priorities and "priority" in inherited and "priority" not in route.vars:
        missing = [p for p in source.priorities or [] if p not in target.priorities]
        if missing:
            problems.append(
                origin.problem(
                    (*sub, "to"),
                    f'stream "{route.to}" has no level {", ".join(missing)} that messages '
                    'would keep from their source; add vars: {priority: "<level>"}',
                )
            )
    same_vars = all(group.vars.get(k) == v for k, v in route.vars.items())
    if route.when is None and route.to == group.stream and same_vars and route.set is None:
        problems.append(
            origin.problem(
                (*sub, "to"),
                f'the route sends every message back to "{group.stream}", the stream this '
                "group reads: an endless loop; add a when, or publish to another stream",
            )
        )


def _check_publish_vars(
    origin: Origin,
    sub: Sub,
    target: StreamSpec,
    name: str,
    given: set[str],
    inherited: set[str],
    problems: list[Problem],
) -> None:
    variables = key_variables(target)
    for var in sorted(given - variables):
        problems.append(
            origin.problem(
                (*sub, "vars", var),
                f'"{var}" is not a variable of the key of stream "{name}" ("{target.key}"); '
                "remove it from vars",
                at_key=True,
            )
        )
    for var in sorted(variables - given - inherited):
        example = "{{ msg." + ("to" if var == "agent" else var) + " }}"
        problems.append(
            origin.problem(
                (*sub, "to"),
                f'publishing to "{name}" needs a value for "{var}" in its key '
                f'"{target.key}"; add vars: {{{var}: "{example}"}}',
            )
        )


def _key_collisions(topo: Topology) -> list[Problem]:
    seen: dict[str, str] = {}
    problems = []
    agents = sorted(topo.agents)
    for name, spec in topo.streams.items():
        if isinstance(_compile(spec.key, False), str):
            continue  # reported by _check_stream
        keys, _ = expand(spec, name, agents, {})
        for key in sorted({k.key for k in keys}):
            first = seen.setdefault(key, name)
            if first != name:
                problems.append(
                    topo.origin("streams", name).problem(
                        ("key",),
                        f'key "{key}" is also a key of stream "{first}" '
                        f"({topo.origin('streams', first)}); two streams must not share a "
                        "Redis key, so change one of the keys",
                    )
                )
    return problems
