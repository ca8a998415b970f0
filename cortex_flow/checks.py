"""Rules that span files: references, template names, key variables, loops, limits.

Pure functions over a merged :class:`Topology`; each returns problems, never raises.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from functools import lru_cache

from cortex_flow.errors import Problem
from cortex_flow.loader import Origin, Topology
from cortex_flow.modelerrors import did_you_mean
from cortex_flow.models import DEFAULT_PRIORITIES, GroupSpec, Route, StreamSpec
from cortex_flow.templates import (
    RUNTIME_NAMES,
    Expression,
    Template,
    TemplateSyntaxError,
)
from cortex_flow.topology import expand, key_variables

Sub = Sequence[str | int]


@lru_cache(maxsize=8192)
def _compile(source: str, expression: bool) -> Template | Expression | str:
    """Compile once per distinct source; a string result is the syntax error."""
    try:
        return Expression(source) if expression else Template(source)
    except TemplateSyntaxError as exc:
        return f"line {exc.lineno}: {exc.message}" if "\n" in source else str(exc.message)


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
        problems.append(origin.problem(sub, f"{kind} syntax error: {compiled}"))
        return frozenset()
    allowed = sorted(set(names))
    for name in sorted(compiled.variables - set(names)):
        hint = did_you_mean(name, allowed) or f"; available names: {', '.join(allowed)}"
        problems.append(origin.problem(sub, f'{kind} uses unknown name "{name}"{hint}'))
    return compiled.variables


def _ref(
    topo: Topology, origin: Origin, sub: Sub, name: str, what: str, problems: list[Problem]
) -> StreamSpec | None:
    spec = topo.streams.get(name)
    if spec is None:
        known = sorted(topo.streams)
        hint = did_you_mean(name, known) or (
            f"; declared streams: {', '.join(known)}" if known else "; no streams are declared"
        )
        problems.append(origin.problem(sub, f'{what} "{name}" is not a declared stream{hint}'))
    return spec


def _single_key(
    topo: Topology, origin: Origin, sub: Sub, name: str, what: str, problems: list[Problem]
) -> None:
    spec = _ref(topo, origin, sub, name, what, problems)
    if spec is not None and key_variables(spec):
        problems.append(
            origin.problem(
                sub,
                f'{what} "{name}" must be a single stream, but its key "{spec.key}" has variables',
            )
        )


def check_topology(topo: Topology) -> list[Problem]:
    """Every cross-file rule; all problems at once."""
    problems: list[Problem] = []
    for name, spec in topo.streams.items():
        _check_stream(topo, name, spec, problems)
    for name, group in topo.groups.items():
        _check_group(topo, name, group, problems)
    for name, agent in topo.agents.items():
        hb = agent.heartbeat
        if hb and hb.timeout is not None and hb.timeout <= hb.interval:
            problems.append(
                topo.origin("agents", name).problem(
                    ("heartbeat", "timeout"),
                    f"timeout ({hb.timeout:g}s) must be longer than interval ({hb.interval:g}s), "
                    "or the agent is marked down between two beats",
                )
            )
    if topo.heartbeats is not None:
        origin = topo.origin("heartbeats")
        _single_key(topo, origin, ("stream",), topo.heartbeats.stream, "heartbeat stream", problems)
        on_down = topo.heartbeats.on_down
        if on_down is not None:
            spec = _ref(topo, origin, ("on_down", "to"), on_down.to, "event stream", problems)
            if spec is not None:
                _check_publish_vars(
                    origin, ("on_down",), spec, on_down.to, set(on_down.vars), {"agent"}, problems
                )
    problems.extend(_key_collisions(topo))
    return problems


def _check_stream(topo: Topology, name: str, spec: StreamSpec, problems: list[Problem]) -> None:
    origin = topo.origin("streams", name)
    compiled = _compile(spec.key, False)
    if isinstance(compiled, str):
        problems.append(origin.problem(("key",), f"template syntax error: {compiled}"))
        return
    variables = compiled.variables
    if spec.priorities and "priority" not in variables:
        problems.append(
            origin.problem(
                ("key",),
                'priorities need "{{ priority }}" in the key, or each level would share it',
            )
        )
    if "priority" in variables and not spec.priorities:
        problems.append(
            origin.problem(
                ("key",),
                "the key uses {{ priority }} but the stream declares no priorities; add "
                f"priorities: [{', '.join(DEFAULT_PRIORITIES)}]",
            )
        )
    for bad in sorted(variables & (RUNTIME_NAMES - {"priority", "agent"})):
        problems.append(
            origin.problem(("key",), f'"{bad}" cannot be a key variable; it is a message-time name')
        )


def _check_group(topo: Topology, name: str, group: GroupSpec, problems: list[Problem]) -> None:
    origin = topo.origin("groups", name)
    spec = _ref(topo, origin, ("stream",), group.stream, "stream", problems)
    if group.dead_letter is not None:
        _single_key(topo, origin, ("dead_letter",), group.dead_letter, "dead_letter", problems)
        if group.dead_letter == group.stream:
            problems.append(
                origin.problem(
                    ("dead_letter",),
                    "dead_letter is the stream the group reads; failed messages "
                    "would be read again forever. Use a separate stream such as dlq",
                )
            )
    retry = group.retry
    if retry.backoff.initial > retry.backoff.max:
        problems.append(
            origin.problem(
                ("retry", "backoff", "initial"),
                f"initial backoff ({retry.backoff.initial:g}s) is longer than max "
                f"({retry.backoff.max:g}s)",
            )
        )
    if retry.claim_idle < retry.backoff.initial:
        problems.append(
            origin.problem(
                ("retry", "claim_idle"),
                f"claim_idle ({retry.claim_idle:g}s) is shorter than the first backoff "
                f"({retry.backoff.initial:g}s): other consumers would claim failed messages "
                "before their retry is due",
            )
        )
    if spec is None:
        return
    variables = key_variables(spec)
    for var in sorted(set(group.vars) - variables):
        problems.append(
            origin.problem(
                ("vars", var), f'stream "{group.stream}" key "{spec.key}" does not use "{var}"'
            )
        )
    for var, value in group.vars.items():
        if "{{" in value or "{%" in value:
            problems.append(
                origin.problem(("vars", var), "group vars are fixed values, not templates")
            )
    _, dynamic = expand(spec, group.stream, sorted(topo.agents), group.vars)
    if dynamic:
        missing = sorted(variables - set(group.vars) - {"priority", "agent"})
        problems.append(
            origin.problem(
                ("vars",),
                f'stream "{group.stream}" key needs {", ".join(missing)}; give '
                + ", ".join(f"{m}: <value>" for m in missing)
                + " in vars",
            )
        )
    elif "agent" in variables - set(group.vars) and not topo.agents:
        problems.append(
            origin.problem(
                ("stream",),
                f'stream "{group.stream}" has one key per agent but no agents are '
                "declared; declare agents or set vars.agent",
            )
        )
    if group.priority == "weighted":
        if not spec.priorities or "priority" in group.vars:
            problems.append(
                origin.problem(
                    ("priority",),
                    f'weighted priority needs a stream with priorities; "{group.stream}" '
                    "reads a single level",
                )
            )
        elif group.weights is not None:
            for level in sorted(set(group.weights) - set(spec.priorities)):
                problems.append(
                    origin.problem(
                        ("weights", level),
                        f'"{level}" is not a priority of stream '
                        f'"{group.stream}" ({", ".join(spec.priorities)})',
                    )
                )
            for level in [p for p in spec.priorities if p not in group.weights]:
                problems.append(origin.problem(("weights",), f'no weight given for "{level}"'))
    context = set(RUNTIME_NAMES) | set(group.vars) | variables
    for index, route in enumerate(group.routes):
        _check_route(topo, origin, ("routes", index), route, group, spec, context, problems)


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
    if route.http is not None:
        _template(origin, (*sub, "http", "url"), route.http.url, context, problems)
    if route.to is None:
        return
    target = _ref(topo, origin, (*sub, "to"), route.to, "route target", problems)
    if target is None:
        return
    inherited = {v for v in ("priority", "agent") if v in key_variables(source) or v in group.vars}
    _check_publish_vars(origin, sub, target, route.to, set(route.vars), inherited, problems)
    if target.priorities and "priority" in inherited and "priority" not in route.vars:
        missing = [p for p in source.priorities or [] if p not in target.priorities]
        if missing:
            problems.append(
                origin.problem(
                    (*sub, "to"),
                    f'stream "{route.to}" has no level {", ".join(missing)} that '
                    "messages would keep; set vars.priority",
                )
            )
    same_vars = all(group.vars.get(k) == v for k, v in route.vars.items())
    if route.when is None and route.to == group.stream and same_vars and route.set is None:
        problems.append(
            origin.problem(
                (*sub, "to"),
                f'the route sends every message back to "{group.stream}", the stream '
                "this group reads: an endless loop. Add a when, or publish to another stream",
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
                (*sub, "vars", var), f'stream "{name}" key "{target.key}" does not use "{var}"'
            )
        )
    for var in sorted(variables - given - inherited):
        example = '"{{ msg.to }}"' if var == "agent" else '"{{ msg.%s }}"' % var
        problems.append(
            origin.problem(
                (*sub, "to"),
                f'publishing to "{name}" needs a value for "{var}" in its key '
                f'"{target.key}"; add vars: {{{var}: {example}}}',
            )
        )


def _key_collisions(topo: Topology) -> list[Problem]:
    seen: dict[str, str] = {}
    problems = []
    agents = sorted(topo.agents)
    for name, spec in topo.streams.items():
        keys, _ = expand(spec, name, agents, {})
        for key in {k.key for k in keys} or ({spec.key} if not key_variables(spec) else set()):
            if key in seen and seen[key] != name:
                first = topo.origin("streams", seen[key])
                problems.append(
                    topo.origin("streams", name).problem(
                        ("key",),
                        f'key "{key}" is also a key of stream "{seen[key]}" ({first}); '
                        "two streams must not share a Redis key",
                    )
                )
            seen.setdefault(key, name)
    return problems


def check_imports(topo: Topology) -> list[Problem]:
    """Import every ``call`` target (``--check-imports``); report what fails."""
    problems = []
    for name, group in topo.groups.items():
        for index, route in enumerate(group.routes):
            if route.call is None:
                continue
            try:
                resolve_callable(route.call.function)
            except (ImportError, AttributeError, TypeError) as exc:
                problems.append(
                    topo.origin("groups", name).problem(
                        ("routes", index, "call"), f"cannot import {route.call.function}: {exc}"
                    )
                )
    return problems


def resolve_callable(target: str) -> object:
    """Import ``module.path:function`` and return the callable."""
    module_name, _, attr = target.partition(":")
    obj: object = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{target} is not callable")
    return obj
