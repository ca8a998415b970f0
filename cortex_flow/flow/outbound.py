"""Where ``http`` routes may send: the flow file fixes the address, a message only the path.

- The scheme, host and port of a URL are fixed text in the flow file: a template may fill
  the path and the query only, after the first ``/`` (or ``?``) that follows the host.
  What a ``{{ }}`` puts in a URL is percent-encoded (``/`` kept), so a message's
  ``@other-host/x`` stays a path.
- Link-local and cloud metadata addresses (``169.254.0.0/16``, ``fe80::/10``,
  ``fd00:ec2::254``, ``100.100.100.200``, ``metadata.google.internal``, ...) are refused
  unless ``http.allow`` in config.yaml lists the host or a network that holds it. The
  runner checks the address a host name resolves to as well, before it connects.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from jinja2 import nodes
from jinja2.visitor import NodeTransformer

from cortex_flow.errors import Problem
from cortex_flow.flow.declared import Topology

__all__ = [
    "METADATA_HOSTS",
    "REFUSED_NETWORKS",
    "OutboundPolicy",
    "check_http_routes",
    "fixed_origin",
    "quote_outputs",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

REFUSED_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "169.254.0.0/16",  # IPv4 link-local: AWS, GCP, Azure, OpenStack... metadata at .169.254
        "fe80::/10",  # IPv6 link-local
        "fd00:ec2::254/128",  # AWS metadata over IPv6
        "100.100.100.200/32",  # Alibaba Cloud metadata
    )
)
METADATA_HOSTS = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
        "metadata.azure.internal",
        "metadata.tencentyun.com",
    }
)

_ORIGIN = re.compile(r"^(https?)://([^/?#{}\s]*)", re.IGNORECASE)  # scheme://authority


@dataclass(frozen=True)
class FixedOrigin:
    """The fixed part of a URL: scheme, host (brackets stripped) and port."""

    scheme: str
    host: str
    port: int | None


def fixed_origin(url: str) -> FixedOrigin | str:
    """The URL's scheme, host and port when they are fixed text; else why not (a str)."""
    match = _ORIGIN.match(url)
    if match is None:
        return "the URL must start with http:// or https:// followed by a host"
    scheme, authority = match.groups()
    rest = url[match.end(2) :]
    if not authority or (rest and rest[0] not in "/?#"):
        example = f"{scheme}://{authority or 'api.example.com'}/{{{{ msg.path }}}}"
        return (
            "the scheme, host and port of an http URL must be fixed text in the flow file, "
            "not filled in from a message; end the host with / and template only the path "
            f'and query, e.g. "{example}"'
        )
    host_port = authority.rpartition("@")[2]
    if host_port.startswith("["):
        host, _, port_text = host_port[1:].partition("]")
        port_text = port_text.removeprefix(":")
    else:
        host, _, port_text = host_port.partition(":")
    if port_text and not port_text.isdigit():
        return f'the port "{port_text}" of the URL is not a number'
    return FixedOrigin(scheme.lower(), host.lower(), int(port_text) if port_text else None)


@dataclass(frozen=True)
class OutboundPolicy:
    """Which hosts and networks ``http.allow`` lets through the refusals."""

    allow: Sequence[str] = ()
    hosts: frozenset[str] = field(init=False)
    networks: tuple[IPNetwork, ...] = field(init=False)

    def __post_init__(self) -> None:
        hosts, networks = set(), []
        for entry in self.allow:
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                hosts.add(entry.lower().rstrip("."))
        object.__setattr__(self, "hosts", frozenset(hosts))
        object.__setattr__(self, "networks", tuple(networks))

    def refused_host(self, host: str) -> str | None:
        """Why ``host`` (a name or an address literal) is refused, or None."""
        name = host.lower().strip("[]").rstrip(".")
        if name in self.hosts:
            return None
        address = _address(name)
        if address is not None:
            return self.refused_address(address)
        if name in METADATA_HOSTS:
            return f"{host} is a cloud metadata host"
        return None

    def refused_address(self, address: IPAddress | str, host: str | None = None) -> str | None:
        """Why connecting to ``address`` (that ``host`` resolved to) is refused, or None."""
        if host is not None and host.lower().rstrip(".") in self.hosts:
            return None
        ip = _address(address) if isinstance(address, str) else address
        if ip is None:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in n for n in self.networks):
            return None
        for network in REFUSED_NETWORKS:
            if ip in network:
                kind = "a link-local" if network.prefixlen <= 16 else "a cloud metadata"
                where = f"{host} resolves to {ip}, " if host and host != str(ip) else f"{ip} is "
                return f"{where}{kind} address ({network})"
        return None


def _address(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def refusal_hint(reason: str) -> str:
    return f"{reason}; requests there are refused unless http.allow in config.yaml lists it"


def check_http_routes(topo: Topology, allow: Sequence[str]) -> list[Problem]:
    """A fixed scheme, host and port in every ``http`` URL, and none refused by policy."""
    policy = OutboundPolicy(tuple(allow))
    problems = []
    for name, group in topo.groups.items():
        for index, route in enumerate(group.routes):
            if route.outbound is None:
                continue
            origin = fixed_origin(route.outbound.url)
            sub = ("routes", index, route.action, "url")
            if isinstance(origin, str):
                problems.append(topo.origin("groups", name).problem(sub, origin))
                continue
            reason = policy.refused_host(origin.host)
            if reason is not None:
                problems.append(topo.origin("groups", name).problem(sub, refusal_hint(reason)))
    return problems


class _Quote(NodeTransformer):
    """Every ``{{ value }}`` of a URL template through ``urlencode`` (percent-encoding)."""

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        node.nodes = [
            n
            if isinstance(n, nodes.TemplateData)
            else nodes.Filter(n, "urlencode", [], [], None, None, lineno=n.lineno)
            for n in node.nodes
        ]
        return node


def quote_outputs(ast: nodes.Template) -> nodes.Template:
    """``ast`` with what each ``{{ }}`` prints percent-encoded (for URL templates)."""
    result = _Quote().visit(ast)
    assert isinstance(result, nodes.Template)
    return result


_policy = OutboundPolicy()


def current_policy() -> OutboundPolicy:
    """The policy requests are checked against (``http.allow`` of the running config)."""
    return _policy


def set_policy(policy: OutboundPolicy) -> None:
    """Check requests against ``policy`` from now on (the runner, at start and reload)."""
    global _policy
    _policy = policy


def check_request(url: str, fixed: FixedOrigin) -> str | None:
    """Why a rendered URL may not be requested, or None: it must keep the flow file's
    scheme, host and port, and its host must not be refused."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    host = (parts.hostname or "").lower()
    if (parts.scheme.lower(), host, port) != (fixed.scheme, fixed.host, fixed.port):
        return (
            f"the rendered URL {url[:200]!r} does not go to {fixed.scheme}://{fixed.host}"
            f"{'' if fixed.port is None else f':{fixed.port}'} as the flow file says"
        )
    reason = _policy.refused_host(host)
    return None if reason is None else refusal_hint(reason)
