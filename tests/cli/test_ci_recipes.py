"""The CI recipes the README documents: the pre-commit hook and the GitHub Actions step."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cortex_flow.cli import cli

REPO = Path(__file__).resolve().parents[2]
BROKEN = "version: 1\ngroups:\n  g: {stream: nope, routes: [{drop: true}]}\n"
BROKEN_LINE = 'flows/bad.yaml:3:15: groups.g.stream: stream "nope" is not a declared stream'


def readme_yaml_blocks(section: str) -> list[object]:
    """The YAML code blocks of one README section, parsed."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", body, re.DOTALL)]


def flows_project(folder: Path) -> Path:
    """A copy of the repository's config and flows in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "config.yaml", folder / "config.yaml")
    shutil.copytree(REPO / "flows", folder / "flows")
    return folder


def test_the_readme_pre_commit_lines_name_the_shipped_hook() -> None:
    """The three documented lines use the id .pre-commit-hooks.yaml defines, which runs
    `cortex-flow validate` over the whole project (not file by file)."""
    [config, _] = readme_yaml_blocks("Validate in CI")
    assert isinstance(config, dict)
    [repo] = config["repos"]
    assert set(repo) == {"repo", "rev", "hooks"}
    [hook] = yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())
    assert repo["hooks"] == [{"id": hook["id"]}] == [{"id": "cortex-flow-validate"}]
    assert (hook["entry"], hook["language"], hook["pass_filenames"]) == (
        "cortex-flow validate",
        "python",
        False,
    )
    assert re.search(hook["files"], "flows/tasks.yaml")
    assert re.search(hook["files"], "config.yml")


@pytest.mark.timeout(600)  # the first run builds the hook's virtualenv (pip install .)
def test_pre_commit_try_repo_runs_the_hook(tmp_path: Path) -> None:
    """`pre-commit try-repo <this repo> cortex-flow-validate` installs cortex-flow from this
    checkout and passes on valid flows; a broken flow file fails it with file:line:col."""
    project = flows_project(tmp_path / "flows-repo")
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    env = {**os.environ, "PRE_COMMIT_HOME": str(tmp_path / "pre-commit-cache")}
    env.pop("CORTEX_A2A_URL", None)
    command = [sys.executable, "-m", "pre_commit", "try-repo", str(REPO)]
    command += ["cortex-flow-validate", "--all-files"]

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, cwd=project, env=env, capture_output=True, text=True, timeout=600
        )

    passed = run()
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert re.search(r"cortex-flow validate\.+Passed", passed.stdout), passed.stdout
    (project / "flows" / "bad.yaml").write_text(BROKEN)
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    failed = run()
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert re.search(r"cortex-flow validate\.+Failed", failed.stdout), failed.stdout
    assert BROKEN_LINE in failed.stdout


def test_the_readme_github_actions_step_validates_with_annotations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The documented workflow parses, installs cortex-flow, and its validate step exits 0
    on the repository's flows and 1 with a GitHub annotation on a broken file."""
    [_, workflow] = readme_yaml_blocks("Validate in CI")
    assert isinstance(workflow, dict)
    [job] = workflow["jobs"].values()
    steps = job["steps"]
    assert any(s.get("uses", "").startswith("actions/checkout@") for s in steps)
    assert any("pip install" in s.get("run", "") for s in steps)
    [validate] = [s["run"] for s in steps if s.get("run", "").startswith("cortex-flow ")]
    assert validate == "cortex-flow validate --format github"
    args = shlex.split(validate)[1:]
    monkeypatch.chdir(flows_project(tmp_path / "checkout"))
    monkeypatch.delenv("CORTEX_A2A_URL", raising=False)
    assert cli(*args) == 0
    capsys.readouterr()
    Path("flows/bad.yaml").write_text(BROKEN)
    assert cli(*args) == 1
    out = capsys.readouterr().out
    assert out.startswith("::error file=flows/bad.yaml,line=3,col=15,title=groups.g.stream::")
    assert BROKEN_LINE in out
