"""Safe YAML reading: plain Python data plus the line and column of every node.

The file is read as bytes within :data:`MAX_BYTES`, decoded as UTF-8, ``${VAR}``
references are interpolated (:mod:`cortex_flow.flow.envvars`), then the YAML *event* stream is
turned into plain values by an explicit stack rather than PyYAML's recursive composer and
constructor. That is what makes the limits cheap and safe: nesting deeper than
:data:`MAX_DEPTH` and alias expansion past :data:`MAX_NODES` are refused as they are met,
before any deep recursion or large allocation, and positions cost one dict entry per node.

Data model (YAML 1.1 scalars, as ``yaml.safe_load``, with these differences):

- mapping keys are strings: the scalar *as written* (``200: x`` gives ``"200"``,
  ``on: x`` gives ``"on"``); a collection as a key is a problem;
- timestamps stay strings (``2024-01-01``); tags other than ``!!str``, ``!!int``,
  ``!!float``, ``!!bool``, ``!!null``, ``!!map``, ``!!seq`` are problems;
- merge keys (``<<``), duplicate keys and several documents in one file are problems;
- an alias is a deep copy of its anchor's value, so the data holds no shared objects.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cortex_flow.errors import Problem, ValidationFailed
from cortex_flow.flow.envvars import interpolate

__all__ = [
    "MAX_BYTES",
    "MAX_DEPTH",
    "MAX_NODES",
    "Document",
    "format_path",
    "load_yaml",
    "load_yaml_partial",
]

MAX_BYTES = 10 * 1024 * 1024
MAX_NODES = 100_000
MAX_DEPTH = 64

NodePath = tuple[str | int, ...]
Position = tuple[int, int]

# libyaml when present (about 10x faster); messages of syntax errors still come from the
# pure-Python parser so that they read the same on every install (see _syntax_problem)
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_REPARSE_LIMIT = 64 * 1024
# YAML scanners read a whole run of nested flow openers ahead before the first event (any
# `[` may start a key), in quadratic time for the Python one: so long runs are refused
# from a bracket count first. Generous, as the count does not skip quoted text; the exact
# MAX_DEPTH is enforced on the events.
_PRESCAN_DEPTH = 4 * MAX_DEPTH
_BRACKETS = re.compile(r"[\[\]{}]")
_CORE = "tag:yaml.org,2002:"


@dataclass(frozen=True)
class Document:
    """A parsed YAML file: its display name, its plain data, and where each node is."""

    file: str
    data: Any
    values: Mapping[NodePath, Position] = field(default_factory=dict, repr=False, compare=False)
    keys: Mapping[NodePath, Position] = field(default_factory=dict, repr=False, compare=False)

    def locate(self, path: Sequence[str | int]) -> Position:
        """1-based (line, col) of the value at ``path``, or of its nearest existing parent.

        A path into a missing key points at the mapping that lacks it; the empty path,
        or one with no existing prefix, is ``(1, 1)``.
        """
        key = tuple(path)
        for end in range(len(key), 0, -1):
            found = self.values.get(key[:end])
            if found is not None:
                return found
        return (1, 1)

    def key_position(self, path: Sequence[str | int]) -> Position:
        """1-based (line, col) of the key of the mapping entry at ``path``, else :meth:`locate`."""
        return self.keys.get(tuple(path)) or self.locate(path)


def format_path(path: Sequence[str | int]) -> str:
    """``("groups", "agents", "routes", 0, "to")`` as ``groups.agents.routes[0].to``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def load_yaml(
    path: str | Path,
    *,
    display: str | None = None,
    env: Mapping[str, str] | None = None,
    text: str | None = None,
) -> Document:
    """Read, interpolate and parse one YAML file; raise :class:`ValidationFailed` if it is bad.

    ``display`` is the name used in problems (default: ``path`` as given); ``env`` the
    variables for ``${VAR}`` (default: ``os.environ``); ``text``, when given, is used instead
    of reading ``path``. An empty file, or one of comments only, gives ``data=None``.
    """
    document, problems = load_yaml_partial(path, display=display, env=env, text=text)
    if problems or document is None:
        raise ValidationFailed(problems)
    return document


def load_yaml_partial(
    path: str | Path,
    *,
    display: str | None = None,
    env: Mapping[str, str] | None = None,
    text: str | None = None,
) -> tuple[Document | None, list[Problem]]:
    """:func:`load_yaml` that returns the problems, and the document when it could be read.

    A file with a duplicate key still gives its document (see ``_Builder.build_partial``);
    one that cannot be read or parsed gives ``None``.
    """
    file = display if display is not None else str(path)
    try:
        if text is None:
            text = _read(Path(path), file)
        else:
            _check_text(text, file)
        text = text.removeprefix("\ufeff")
        text = interpolate(text, os.environ if env is None else env, file=file)
        _check_flow_nesting(text, file)
    except ValidationFailed as exc:
        return None, exc.problems
    return _Builder(file).build_partial(text)


def _fail(file: str, line: int, col: int, message: str) -> ValidationFailed:
    return ValidationFailed([Problem(file, line, col, "", message)])


def _read(path: Path, file: str) -> str:
    try:
        with path.open("rb") as stream:
            size = os.fstat(stream.fileno()).st_size
            if size <= MAX_BYTES:  # read at most one byte more than allowed (pipes, growing files)
                data = stream.read(MAX_BYTES + 1)
                size = len(data)
    except OSError as exc:
        raise _fail(file, 1, 1, f"cannot read file: {exc.strerror or exc}") from None
    if size > MAX_BYTES:
        raise _fail(file, 1, 1, f"file is {size / 1e6:.1f} MB; flow files are limited to 10 MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, col = _byte_place(data, exc.start)
        message = f"file is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        raise _fail(file, line, col, message) from None
    nul = data.find(b"\0")
    if nul >= 0:
        line, col = _byte_place(data, nul)
        raise _fail(file, line, col, f"file is binary, not text (byte 0x00 at offset {nul})")
    return text


def _check_text(text: str, file: str) -> None:
    if len(text) > MAX_BYTES // 4 and len(text.encode("utf-8", "replace")) > MAX_BYTES:
        size = len(text.encode("utf-8", "replace"))
        raise _fail(file, 1, 1, f"file is {size / 1e6:.1f} MB; flow files are limited to 10 MiB")
    nul = text.find("\0")
    if nul >= 0:
        line, col = _char_place(text, nul)
        raise _fail(file, line, col, f"file is binary, not text (byte 0x00 at offset {nul})")


def _check_flow_nesting(text: str, file: str) -> None:
    if text.count("[") + text.count("{") <= _PRESCAN_DEPTH:
        return
    openers: list[int] = []
    for bracket in _BRACKETS.finditer(text):
        if bracket.group() in "[{":
            openers.append(bracket.start())
            if len(openers) > _PRESCAN_DEPTH:
                line, col = _char_place(text, openers[MAX_DEPTH])
                raise _fail(file, line, col, f"document nests deeper than {MAX_DEPTH} levels")
        elif openers:
            openers.pop()


def _byte_place(data: bytes, offset: int) -> Position:
    start = data.rfind(b"\n", 0, offset) + 1
    col = len(data[start:offset].decode("utf-8", "replace")) + 1
    return data.count(b"\n", 0, offset) + 1, col


def _char_place(text: str, offset: int) -> Position:
    return text.count("\n", 0, offset) + 1, offset - (text.rfind("\n", 0, offset) + 1) + 1


class _Stop(Exception):
    """A limit was hit: stop parsing at once."""


_NEED_KEY: Any = object()  # the mapping on top waits for a key
_BAD_KEY: Any = object()  # the pending key was rejected: drop the value that follows
_MISSING: Any = object()
# plain scalar text -> value: flow files repeat the same few words, and resolving one
# costs a few regex matches; the values are immutable, so one cache serves every file
_PLAIN_CACHE: dict[str, Any] = {}
_PLAIN_CACHE_SIZE = 10_000


class _Frame:
    """An open mapping or sequence."""

    __slots__ = ("anchor", "height", "key", "path", "place", "size", "value")

    def __init__(
        self, value: Any, path: NodePath | None, place: Position, anchor: str | None
    ) -> None:
        self.value = value
        self.path = path  # None inside a rejected key: no positions recorded there
        self.place = place
        self.anchor = anchor
        self.size = 1  # nodes in this subtree, aliases expanded
        self.height = 1
        # for a mapping: _NEED_KEY, the pending key, or _BAD_KEY; None for a sequence
        self.key: Any = _NEED_KEY if isinstance(value, dict) else None


class _Anchor:
    __slots__ = ("height", "size", "text", "value")

    def __init__(self, value: Any, size: int, height: int, text: str | None) -> None:
        self.value, self.size, self.height, self.text = value, size, height, text


class _Builder:
    """Plain data and positions from YAML events, with the nesting and expansion limits."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.values: dict[NodePath, Position] = {}
        self.keys: dict[NodePath, Position] = {}
        self.anchors: dict[str, _Anchor] = {}
        self.stack: list[_Frame] = []
        self.problems: list[Problem] = []
        self.nodes = 0
        self.documents = 0
        self.root: Any = None
        self.loader: Any = None

    def build(self, text: str) -> Document:
        document, problems = self.build_partial(text)
        if problems or document is None:
            raise ValidationFailed(problems)
        return document

    def build_partial(self, text: str) -> tuple[Document | None, list[Problem]]:
        """The document and its problems; a document only when the whole file was read.

        A duplicate key, a merge key or an unsupported tag is a problem, but the rest of
        the file is still read (the first of two duplicate keys is kept), so the file's
        other problems can be found in the same run.
        """
        try:
            self.loader = _Loader(text)  # the pure-Python reader checks characters here
            self._consume()
        except _Stop:
            return None, self.problems
        except yaml.YAMLError as exc:
            return None, [_syntax_problem(exc, text, self.file)]
        finally:
            if self.loader is not None:
                self.loader.dispose()
        return Document(self.file, self.root, self.values, self.keys), self.problems

    def _consume(self) -> None:
        get_event = self.loader.get_event
        stack = self.stack
        while True:
            event = get_event()
            kind = type(event)
            if kind is yaml.ScalarEvent:
                self._scalar(event)
            elif kind is yaml.MappingEndEvent or kind is yaml.SequenceEndEvent:
                frame = stack.pop()
                if frame.anchor is not None:
                    anchor = _Anchor(frame.value, frame.size, frame.height, None)
                    self.anchors[frame.anchor] = anchor
                parent = stack[-1] if stack else None
                value, size, height = frame.value, frame.size, frame.height
                self._attach(parent, value, size, height, None, frame.path, frame.place)
            elif kind is yaml.MappingStartEvent or kind is yaml.SequenceStartEvent:
                self._start(event, kind is yaml.MappingStartEvent)
            elif kind is yaml.AliasEvent:
                self._alias(event)
            elif kind is yaml.DocumentStartEvent:
                self.documents += 1
                if self.documents > 1:
                    self._stop(event, "file holds more than one YAML document; keep one per file")
            elif event is None or kind is yaml.StreamEndEvent:
                return

    def _scalar(self, event: Any) -> None:
        self._count(event, 1, 0)
        place = (event.start_mark.line + 1, event.start_mark.column + 1)
        top = self.stack[-1] if self.stack else None
        if top is not None and top.key is _NEED_KEY:  # keys are the text as written
            if event.anchor is not None:
                self.anchors[event.anchor] = _Anchor(event.value, 1, 0, event.value)
            top.size += 1
            if event.tag is not None and event.tag != "!":
                kind = event.tag.removeprefix(_CORE)
                if kind not in ("str", "null", "bool", "int", "float"):
                    self._problem(place, top.path, _unsupported_tag(event.tag))
            if event.value == "<<" and event.tag is None and event.implicit[0]:
                self._problem(place, (), "merge keys (<<) are not supported; write the keys out")
                top.key = _BAD_KEY
            else:
                self._take_key(top, event.value, place)
            return
        path = self._child_path(top)
        value = self._construct(event, path, place)
        if event.anchor is not None:
            self.anchors[event.anchor] = _Anchor(value, 1, 0, event.value)
        self._attach(top, value, 1, 0, event.value, path, place)

    def _start(self, event: Any, mapping: bool) -> None:
        self._count(event, 1, 1)
        path = self._child_path(self.stack[-1] if self.stack else None)
        place = (event.start_mark.line + 1, event.start_mark.column + 1)
        if event.tag not in (None, "!", _CORE + ("map" if mapping else "seq")):
            self._problem(place, path, _unsupported_tag(event.tag))
        self.stack.append(_Frame({} if mapping else [], path, place, event.anchor))

    def _alias(self, event: Any) -> None:
        place = (event.start_mark.line + 1, event.start_mark.column + 1)
        anchor = self.anchors.get(event.anchor)
        if anchor is None:
            opened = any(frame.anchor == event.anchor for frame in self.stack)
            why = "its own enclosing node" if opened else "no anchor defined before it"
            self._problem(place, (), f"alias *{event.anchor} refers to {why}")
            anchor = _Anchor(None, 1, 0, None)
        self._count(event, anchor.size, anchor.height)
        top = self.stack[-1] if self.stack else None
        path = self._child_path(top)
        # a copy, so that no two places of the data share a mutable object; the cost is
        # bounded by MAX_NODES, checked just above
        value = copy.deepcopy(anchor.value) if anchor.height else anchor.value
        self._attach(top, value, anchor.size, anchor.height, anchor.text, path, place)

    def _count(self, event: Any, nodes: int, height: int) -> None:
        self.nodes += nodes
        if self.nodes > MAX_NODES:
            self._stop(event, f"document expands to more than {MAX_NODES} nodes (YAML aliases?)")
        if height and len(self.stack) + height > MAX_DEPTH:
            self._stop(event, f"document nests deeper than {MAX_DEPTH} levels")

    @staticmethod
    def _child_path(parent: _Frame | None) -> NodePath | None:
        """Path of the value that starts now; None for a key or inside a rejected one."""
        if parent is None:
            return ()
        if parent.path is None:
            return None
        if parent.key is None:
            return (*parent.path, len(parent.value))
        if parent.key is _NEED_KEY or parent.key is _BAD_KEY:
            return None
        return (*parent.path, parent.key)

    def _attach(
        self,
        parent: _Frame | None,
        value: Any,
        size: int,
        height: int,
        text: str | None,
        path: NodePath | None,
        place: Position,
    ) -> None:
        """Add a finished node to its parent; ``text`` is its source text if a scalar."""
        if path is not None:
            self.values[path] = place
        if parent is None:
            self.root = value
            return
        parent.size += size
        if height >= parent.height:
            parent.height = height + 1
        if parent.key is None:
            parent.value.append(value)
        elif parent.key is _NEED_KEY:
            self._take_key(parent, text, place)
        else:
            if parent.key is not _BAD_KEY:
                parent.value[parent.key] = value
            parent.key = _NEED_KEY

    def _take_key(self, parent: _Frame, text: str | None, place: Position) -> None:
        if text is None:
            message = "mapping keys must be plain text, not a mapping or a list"
            self._problem(place, parent.path, message)
            parent.key = _BAD_KEY
        elif text in parent.value:
            message = f'duplicate key "{text}"'
            first = self.keys.get((*parent.path, text)) if parent.path is not None else None
            if first is not None:
                message += f" (first defined at line {first[0]})"
            self._problem(place, None if parent.path is None else (*parent.path, text), message)
            parent.key = _BAD_KEY
        else:
            parent.key = text
            if parent.path is not None:
                self.keys[(*parent.path, text)] = place

    def _problem(self, place: Position, path: NodePath | None, message: str) -> None:
        where = format_path(path) if path else ""
        self.problems.append(Problem(self.file, place[0], place[1], where, message))

    def _stop(self, event: Any, message: str) -> None:
        place = (event.start_mark.line + 1, event.start_mark.column + 1)
        self._problem(place, (), message)
        raise _Stop

    def _construct(self, event: Any, path: NodePath | None, place: Position) -> Any:
        tag, text = event.tag, event.value
        if tag is None or tag == "!":
            if not event.implicit[0]:  # quoted, or the non-specific tag "!"
                return text
            value = _PLAIN_CACHE.get(text, _MISSING)
            if value is _MISSING:
                tag = self.loader.resolve(yaml.ScalarNode, text, (True, False))
                # YAML 1.1 timestamps stay text: flow files have no use for datetime objects
                value = text if tag == _CORE + "timestamp" else self._convert(tag, text)
                if len(_PLAIN_CACHE) < _PLAIN_CACHE_SIZE:
                    _PLAIN_CACHE[text] = value
            return value
        kind = tag.removeprefix(_CORE) if tag.startswith(_CORE) else ""
        if kind not in ("str", "null", "bool", "int", "float"):
            self._problem(place, path, _unsupported_tag(tag))
            return text
        try:
            return self._convert(tag, text)
        except (ValueError, KeyError, yaml.YAMLError):
            self._problem(place, path, f'"{text}" is not a valid !!{kind}')
            return text

    def _convert(self, tag: str, text: str) -> Any:
        kind = tag.removeprefix(_CORE)
        if kind not in ("null", "bool", "int", "float"):
            return text  # str, and the merge / value tags of plain `<<` and `=` values
        return getattr(self.loader, f"construct_yaml_{kind}")(yaml.ScalarNode(tag, text))


def _unsupported_tag(tag: str) -> str:
    shown = "!!" + tag.removeprefix(_CORE) if tag.startswith(_CORE) else tag
    return (
        f"unsupported YAML tag {shown}; use plain mappings, lists and scalars "
        "(!!str, !!int, !!float, !!bool and !!null are allowed)"
    )


def _syntax_problem(exc: yaml.YAMLError, text: str, file: str) -> Problem:
    """One problem for a YAML syntax error, worded by the pure-Python parser when possible."""
    if _Loader is not yaml.SafeLoader and len(text) <= _REPARSE_LIMIT:
        try:
            for _ in yaml.parse(text, Loader=yaml.SafeLoader):
                pass
        except yaml.YAMLError as python_exc:
            exc = python_exc
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        message = f"could not parse YAML: {exc.problem}"
        if exc.context and exc.context_mark is not None:
            context = exc.context_mark
            message += f" ({exc.context} at line {context.line + 1}, column {context.column + 1})"
        return Problem(file, mark.line + 1, mark.column + 1, "", message)
    if isinstance(exc, yaml.reader.ReaderError):
        line, col = _char_place(text, exc.position)
        char = exc.character if isinstance(exc.character, int) else ord(exc.character[:1] or "\0")
        message = f"could not parse YAML: unacceptable character #x{char:04x}: {exc.reason}"
        return Problem(file, line, col, "", message)
    return Problem(file, 1, 1, "", f"could not parse YAML: {exc}")
