"""`cortex-flow validate` on hostile flow files: template bombs, URL injection, metadata
addresses and dangerous ``call`` targets are errors with file:line:col, and config can
allow what is meant."""

from __future__ import annotations

import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cortex_flow.cli import cli

FLOWS = """\
version: 1
streams:
  in: {key: t:in}
  out: {key: t:out}
groups:
  g:
    stream: in
    routes:
"""


class Project:
    def __init__(self, root: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.root = root
        self.capsys = capsys
        self.config("")

    def config(self, extra: str) -> None:
        (self.root / "config.yaml").write_text("flows: flows/\n" + textwrap.dedent(extra))

    def routes(self, routes: str) -> None:
        (self.root / "flows").mkdir(exist_ok=True)
        text = FLOWS + textwrap.indent(textwrap.dedent(routes), "      ")
        (self.root / "flows" / "main.yaml").write_text(text)

    def validate(self, *args: str) -> tuple[int, list[str]]:
        code = cli("validate", *args)
        out, err = self.capsys.readouterr()
        return code, (out + err).splitlines()


@pytest.fixture
def project(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Project:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CORTEX_REDIS_URL", raising=False)
    return Project(tmp_path, capsys)


# --- templates ------------------------------------------------------------------------


def test_validate_on_a_constant_memory_bomb_ends_quickly_with_a_clear_error(
    tmp_path: Path,
) -> None:
    """``{{ 'a' * 10**9 }}`` is an error naming file:line:col, not 13 s and 3 GB."""
    (tmp_path / "config.yaml").write_text("flows: flows/\n")
    (tmp_path / "flows").mkdir()
    routes = "- to: out\n  set: {x: \"{{ 'a' * 10**9 }}\"}\n"
    text = FLOWS + textwrap.indent(routes, "      ")
    (tmp_path / "flows" / "main.yaml").write_text(text)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "cortex_flow", "validate"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    took = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.splitlines()[0] == (
        "flows/main.yaml:10:18: groups.g.routes[0].set.x: template \"{{ 'a' * 10**9 }}\" "
        "cannot run: template exceeded its size limit: 'a' * 1000000000 would be "
        "1,000,000,000 characters or items, over templates.max_output (10,000,000; set in "
        "config.yaml); compute less in the template"
    )
    # generous bounds, only to catch the bomb going off (it took 13 s and 3 GB)
    assert took < 60
    assert after.ru_utime - before.ru_utime < 10
    assert after.ru_maxrss < 1_000_000  # KiB: the largest child so far stayed under 1 GB


def test_a_constant_under_a_raised_max_output_is_accepted(project: Project) -> None:
    """``templates.max_output`` in config.yaml is the bound validation folds under."""
    project.routes("- to: out\n  set: {x: \"{{ 'a' * 2000 }}\"}\n")
    project.config("templates: {max_output: 1000}\n")
    code, lines = project.validate()
    assert code == 1 and "over templates.max_output (1,000;" in lines[0]
    project.config("templates: {max_output: 5000}\n")
    assert project.validate()[0] == 0


# --- http URLs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:18997{{ msg.path }}",
        "http://{{ msg.host }}/x",
        "https://api.example.com{% if msg.x %}.evil{% endif %}/x",
        "{{ msg.url }}",
    ],
)
def test_a_url_whose_host_a_message_fills_is_refused(project: Project, url: str) -> None:
    """Scheme, host and port are fixed text in the flow file; a template fills only the path."""
    project.routes(f'- http: {{url: "{url}"}}\n')
    code, lines = project.validate()
    assert code == 1
    assert lines[0].startswith("flows/main.yaml:9:21: groups.g.routes[0].http.url: ")
    if url.startswith("http"):
        assert "must be fixed text in the flow file, not filled in from a message" in lines[0]


def test_a_url_with_a_templated_path_and_query_is_accepted(project: Project) -> None:
    """``http://host:port/{{ ... }}?q={{ ... }}`` is the allowed form."""
    project.routes('- http: {url: "http://127.0.0.1:18997/{{ msg.path }}?q={{ msg.q }}"}\n')
    assert project.validate()[0] == 0


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
        ("http://[fd00:ec2::254]/latest", "fd00:ec2::254 is a cloud metadata address"),
        ("http://[fe80::1]:8080/x", "fe80::1 is a link-local address"),
        ("http://metadata.google.internal/computeMetadata/v1/", "is a cloud metadata host"),
        ("http://100.100.100.200/latest", "100.100.100.200 is a cloud metadata address"),
    ],
)
def test_metadata_and_link_local_addresses_are_refused_unless_allowed(
    project: Project, url: str, reason: str
) -> None:
    """Link-local and metadata hosts are refused; ``http.allow`` lists the ones meant."""
    project.routes(f'- http: {{url: "{url}"}}\n')
    code, lines = project.validate()
    assert code == 1
    assert lines[0].startswith("flows/main.yaml:9:21: groups.g.routes[0].http.url: ")
    assert reason in lines[0]
    assert "unless http.allow in config.yaml lists it" in lines[0]
    host = url.split("//")[1].split("/")[0].rsplit(":", 1)[0] if "[" not in url else ""
    allow = host if host else "fd00::/8, fe80::/10"
    project.config(f"http: {{allow: [{allow}]}}\n")
    assert project.validate()[0] == 0


def test_http_allow_takes_networks(project: Project) -> None:
    """A CIDR in ``http.allow`` lets every address in it through."""
    project.routes('- http: {url: "http://169.254.10.20:8080/x"}\n')
    assert project.validate()[0] == 1
    project.config("http: {allow: [169.254.0.0/16]}\n")
    assert project.validate()[0] == 0
    project.config("http: {allow: ['not a host']}\n")
    code, lines = project.validate()
    assert code == 1 and "is neither a host name nor an address or network" in lines[0]


# --- call targets ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("subprocess:run", "module subprocess runs processes or signals"),
        ("os:system", "module os runs processes or signals"),
        ("builtins:eval", "module builtins evaluates or loads code"),
        ("shutil:rmtree", "module shutil reads or writes files"),
        ("importlib:import_module", "module importlib evaluates or loads code"),
        ("os.path:join", "module os.path runs processes or signals"),
        ("logging.config:dictConfig", "module logging.config evaluates or loads code"),
    ],
)
@pytest.mark.parametrize("check_imports", [False, True])
def test_process_eval_and_file_call_targets_are_refused(
    project: Project, target: str, why: str, check_imports: bool
) -> None:
    """``validate`` (with or without --check-imports) refuses dangerous targets by name."""
    project.routes(f"- call: {target}\n")
    code, lines = project.validate(*(["--check-imports"] if check_imports else []))
    assert code == 1
    top = target.split(":")[0].split(".")[0]
    assert lines[0] == (
        f'flows/main.yaml:9:15: groups.g.routes[0].call: call target "{target}" is refused: '
        f"{why}, so a message could make the runner do anything; call a function of your "
        f"own, or if this is intended allow it in config.yaml: calls: {{allow: [{top}]}}"
    )


def test_a_call_target_allowed_by_config_passes(project: Project) -> None:
    """``calls.allow: [subprocess]`` lets subprocess (and its submodules) through."""
    project.routes("- call: subprocess:run\n")
    project.config("calls: {allow: [subprocess]}\n")
    code, lines = project.validate("--check-imports")
    assert code == 0, lines
    assert lines[:2] == [
        "call targets:",
        "  flows/main.yaml:9:15: subprocess:run: module subprocess, standard library",
    ]


def test_check_imports_refuses_a_re_exported_dangerous_function(project: Project) -> None:
    """``mymod:run`` where mymod imported subprocess.run is refused by what it is."""
    (project.root / "cf_reexport.py").write_text(
        "from subprocess import run\nfrom os import system\n"
    )
    project.routes("- call: cf_reexport:run\n- call: cf_reexport:system\n")
    assert project.validate()[0] == 0  # by name alone it looks like the user's module
    code, lines = project.validate("--check-imports")
    assert code == 1
    problems = [line for line in lines if line.startswith("flows/")]
    assert problems == [
        'flows/main.yaml:9:15: groups.g.routes[0].call: call target "cf_reexport:run" is '
        "refused: it is subprocess.run: module subprocess runs processes or signals, so a "
        "message could make the runner do anything; call a function of your own, or if this "
        "is intended allow it in config.yaml: calls: {allow: [subprocess]}",
        'flows/main.yaml:10:15: groups.g.routes[1].call: call target "cf_reexport:system" is '
        "refused: it is posix.system: module posix runs processes or signals, so a message "
        "could make the runner do anything; call a function of your own, or if this is "
        "intended allow it in config.yaml: calls: {allow: [posix]}",
    ]


def test_check_imports_says_where_each_target_comes_from(project: Project) -> None:
    """A target's origin: the module's file, an installed package, or the standard library."""
    (project.root / "cf_mine.py").write_text("def handle(msg):\n    return None\n")
    project.routes("- call: cf_mine:handle\n- call: json:dumps\n- call: yaml:safe_dump\n")
    code, lines = project.validate("--check-imports")
    assert code == 0, lines
    mine = (project.root / "cf_mine.py").resolve()
    assert lines[0] == "call targets:"
    assert lines[1] == f"  flows/main.yaml:9:15: cf_mine:handle: module cf_mine ({mine})"
    assert lines[2] == "  flows/main.yaml:10:15: json:dumps: module json, standard library"
    assert lines[3].startswith(
        "  flows/main.yaml:11:15: yaml:safe_dump: module yaml, installed package PyYAML ("
    )


def test_a2a_routes_follow_the_outbound_rules(project: Project) -> None:
    """An ``a2a`` route's URL is checked as an ``http`` one: a fixed host, and no
    metadata or link-local address unless ``http.allow`` lists it."""
    project.routes('- a2a: {url: "http://169.254.169.254/a2a/x"}\n')
    code, lines = project.validate()
    assert code == 1
    assert lines[0].startswith("flows/main.yaml:9:20: groups.g.routes[0].a2a.url: ")
    assert "169.254.169.254 is a link-local address" in lines[0]
    project.routes('- a2a: {url: "http://{{ msg.host }}/a2a/x"}\n')
    code, lines = project.validate()
    assert code == 1 and "must be fixed text in the flow file" in lines[0]
    project.routes('- a2a: {url: "http://127.0.0.1:18997/a2a/{{ msg.agent }}"}\n')
    assert project.validate()[0] == 0
