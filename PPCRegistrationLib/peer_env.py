"""The peer tools' own environment (``ppcreg bench --peer``): DiffDRR 0.6.1 installed once into a separate virtual
environment, ``<cache>/peer-diffdrr-0.6.1/`` (cache: ``$PPCREG_CACHE`` or ``~/.cache/ppcregistration``), with the
exact pins of ``peer_diffdrr_requirements.txt``, and reused while it still has them.  DiffDRR is never a dependency
of this project."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .errors import InputError

__all__ = ["DIFFDRR_VERSION", "REQUIREMENTS", "PeerEnv", "PeerError", "read_pins", "pin_mismatches", "peer_env_dir",
           "ensure_peer_env", "log", "run_streaming"]

DIFFDRR_VERSION = "0.6.1"
REQUIREMENTS = Path(__file__).with_name("peer_diffdrr_requirements.txt")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.!+_-]+)$")


class PeerError(InputError):
    """The peer environment could not be set up or the peer failed (the message says how to retry)."""


def log(progress: bool, msg: str) -> None:
    """Progress of the peer comparison on stderr (when ``progress``)."""
    if progress:
        print(f"[ppcreg peer] {msg}", file=sys.stderr, flush=True)


def _norm(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: str | Path = REQUIREMENTS) -> dict[str, str]:
    """``{normalised name: version}`` of a requirements file of exact pins (``name==version``, ``#`` comments).

    Raises:
        InputError: a line that is not an exact pin, a name pinned twice, or no pins at all.
    """
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InputError(f"cannot read the peer requirements {p}: {exc}") from exc
    pins: dict[str, str] = {}
    for n, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _PIN.match(line.replace(" ", ""))
        if not m:
            raise InputError(f"{p}:{n}: {raw.strip()!r} is not an exact pin (name==version)")
        name = _norm(m.group(1))
        if name in pins:
            raise InputError(f"{p}:{n}: {m.group(1)} is pinned twice")
        pins[name] = m.group(2)
    if not pins:
        raise InputError(f"{p} has no pins")
    return pins


def pin_mismatches(pins: dict[str, str], installed: dict[str, str]) -> list[str]:
    """The pins ``installed`` (``{name: version}`` of an environment) does not satisfy, as readable strings
    (a local label is ignored: ``2.13.0+cpu`` satisfies ``==2.13.0``)."""
    have = {_norm(k): v for k, v in installed.items()}
    return [f"{n}=={v} (installed: {have.get(n) or 'none'})" for n, v in pins.items()
            if have.get(n) is None or have[n].split("+")[0] != v.split("+")[0]]


def peer_env_dir(cache_dir: str | Path | None = None) -> Path:
    """``<cache>/peer-diffdrr-<version>`` (cache: ``$PPCREG_CACHE`` or ``~/.cache/ppcregistration``)."""
    from .sample_data import default_cache_dir

    base = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return base / f"peer-diffdrr-{DIFFDRR_VERSION}"


@dataclass
class PeerEnv:
    """A ready peer environment: its folder, interpreter, installed pins and what setting it up took."""

    path: Path
    python: Path
    versions: dict[str, str]  # the installed versions of the pinned packages (normalised names)
    installed_now: bool
    seconds: float


_LIST_DISTS = ("import json, importlib.metadata as m; "
               "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions() if d.metadata['Name']}))")


def _installed(python: Path) -> dict[str, str] | None:
    """``{name: version}`` of the distributions in the environment of ``python`` (None if it does not run)."""
    try:
        proc = subprocess.run([str(python), "-I", "-c", _LIST_DISTS], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    try:
        return dict(json.loads(proc.stdout))
    except ValueError:
        return None


def run_streaming(cmd: list[str], progress: bool, show: Sequence[str] = (), env: dict | None = None,
                   prefix: str = "") -> tuple[int, list[str]]:
    """Run ``cmd``; print its output lines that start with one of ``show`` (all when empty); returns the exit
    code and the last 40 lines."""
    tail: list[str] = []
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                bufsize=1)
    except OSError as exc:
        return 127, [str(exc)]
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-40:]
        if progress and (not show or line.lstrip().startswith(tuple(show))):
            print(f"{prefix}{line}", file=sys.stderr, flush=True)
    return proc.wait(), tail


def ensure_peer_env(cache_dir: str | Path | None = None, *, progress: bool = True,
                    requirements: str | Path = REQUIREMENTS) -> PeerEnv:
    """The DiffDRR peer environment, created (``python -m venv``) and installed (pip, exact pins) on first use.

    An existing environment is reused when it has every pin; otherwise pip installs what is missing into it.

    Raises:
        PeerError: the virtual environment or the pip install failed (the message says what and how to retry).
    """
    pins = read_pins(requirements)
    env = peer_env_dir(cache_dir)
    python = env / "bin" / "python"
    t0 = time.perf_counter()
    if python.exists():
        have = _installed(python)
        if have is not None and not pin_mismatches(pins, have):
            log(progress, f"reusing the DiffDRR peer environment {env} ({len(pins)} pinned packages)")
            return PeerEnv(env, python, _pinned(have, pins), False, time.perf_counter() - t0)
        missing = pin_mismatches(pins, have or {})
        log(progress, f"the peer environment {env} lacks {len(missing)} of its pins (e.g. {missing[0]}); "
                       "installing them")
    else:
        log(progress, f"creating the DiffDRR peer environment {env} (python -m venv; never part of this project)")
        env.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([sys.executable, "-m", "venv", str(env)], capture_output=True, text=True)
        if proc.returncode != 0 or not python.exists():
            raise PeerError(f"could not create the virtual environment {env} with {sys.executable} -m venv: "
                            f"{(proc.stderr or proc.stdout).strip()[-500:]}. Check that the venv module is available "
                            f"(Debian: apt-get install python3-venv) and that {env.parent} is writable, then run the "
                            "command again")
    log(progress, f"installing diffdrr=={DIFFDRR_VERSION} and its {len(pins) - 1} pinned dependencies (torch=="
                   f"{pins.get('torch', '?')}, ...) with pip from {requirements}; about 2.5 GB, a few minutes")
    rc, tail = run_streaming([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-r",
                               str(requirements)], progress, show=("Collecting", "Installing", "Successfully",
                                                                   "ERROR"), prefix="[ppcreg peer] pip: ")
    if rc != 0:
        why = [line for line in tail if "ERROR" in line or "rror:" in line] or tail[-6:]
        raise PeerError(f"installing the DiffDRR peer environment failed: pip exited with code {rc}: "
                        + " | ".join(line.strip() for line in why[-6:] if line.strip())
                        + f". The pins are in {requirements} (resolved on Python 3.11; this is Python "
                          f"{sys.version.split()[0]}). Fix the cause (network or package index, disk space) and run "
                          f"the command again: it resumes in {env}; or delete that folder to start afresh")
    have = _installed(python) or {}
    bad = pin_mismatches(pins, have)
    if bad:
        raise PeerError(f"after pip the peer environment {env} still lacks {', '.join(bad[:5])}; delete {env} and "
                        "run the command again")
    seconds = time.perf_counter() - t0
    log(progress, f"DiffDRR peer environment ready in {seconds:.0f} s")
    return PeerEnv(env, python, _pinned(have, pins), True, seconds)


def _pinned(have: dict[str, str], pins: dict[str, str]) -> dict[str, str]:
    norm = {_norm(k): v for k, v in have.items()}
    return {k: norm.get(k, "") for k in pins}
