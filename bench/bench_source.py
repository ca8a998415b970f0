"""Wall time and peak memory of refusing hostile YAML: an alias bomb and a 50 MB file.

Run: ``python bench/bench_source.py``. Each case runs in a fresh child process so that
peak RSS (``resource.getrusage``) belongs to that case alone.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cortex_flow.errors import ValidationFailed
from cortex_flow.flow.source import load_yaml


def billion_laughs(levels: int = 9, width: int = 9) -> str:
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    for level in range(1, levels):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def make_case(name: str, folder: Path) -> Path:
    path = folder / f"{name}.yaml"
    if name == "alias-bomb":
        path.write_text(billion_laughs())
    elif name == "50mb-file":
        line = b"key: " + b"x" * 74 + b"\n"  # real bytes on disk, not a sparse file
        with path.open("wb") as stream:
            for _ in range(50 * 1024 * 1024 // len(line)):
                stream.write(line)
    elif name == "deep-nesting":
        path.write_text("[" * 100_000 + "]" * 100_000)
    return path


def measure(path: Path) -> None:
    start = time.perf_counter()
    try:
        load_yaml(path)
        outcome = "loaded (unexpected)"
    except ValidationFailed as failed:
        outcome = failed.problems[0].message
    elapsed = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"{path.stem:14} {elapsed * 1000:8.1f} ms  peak RSS {peak_mib:6.1f} MiB  {outcome}")


def main() -> None:
    if len(sys.argv) == 2:
        measure(Path(sys.argv[1]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("alias-bomb", "50mb-file", "deep-nesting"):
            path = make_case(name, Path(tmp))
            env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
            subprocess.run([sys.executable, __file__, str(path)], check=True, env=env)


if __name__ == "__main__":
    main()
