"""Install Debian packages a test needs (Prometheus, Chromium) when they are missing: CI machines start
bare. One install at a time (a file lock, since parallel sessions share apt); the calling test skips with
the reason where that is impossible (not root, no apt-get, no such package)."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

INSTALL_LOCK = Path(tempfile.gettempdir()) / "ctxsteer-apt-install.lock"


def _apt_install(packages: tuple[str, ...]) -> str | None:
    """apt-get install; None on success, else why it failed. Services are kept from starting
    (policy-rc.d), so no packaged daemon runs beside the test's own."""
    names = " ".join(packages)
    if os.geteuid() != 0:
        return f"not root, and the Debian package(s) {names} are not installed"
    if shutil.which("apt-get") is None:
        return f"no apt-get on this machine to install the Debian package(s) {names}"
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = not policy.exists()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        if made_policy:
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
        for cmd in (
            ["apt-get", "update"],
            ["apt-get", "install", "-y", "--no-install-recommends", *packages],
        ):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                return f"`{' '.join(cmd)}` failed ({done.returncode}): {done.stderr.strip()[-500:]}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"installing the Debian package(s) {names} failed: {e}"
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)
    return None


def ensure_binaries(binaries: tuple[str, ...], packages: tuple[str, ...]) -> tuple[str, ...]:
    """Paths of `binaries`, installing `packages` first when one is missing; skips the calling test
    (saying why) when they cannot be had."""
    with open(INSTALL_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = tuple(shutil.which(b) for b in binaries)
        if None in found:
            failure = _apt_install(packages)
            found = tuple(shutil.which(b) for b in binaries)
            if None in found:
                missing = [b for b, p in zip(binaries, found, strict=True) if p is None]
                pytest.skip(failure or f"installing {' '.join(packages)} gave no {', '.join(missing)}")
    return found  # type: ignore[return-value]
