"""What the ``saga`` command takes before it connects: a target whose sagas a client
cannot register, an empty ``--dsn``, and the worker's durations. README, Command line:
exit code "`2` usage (bad option, DSN, duration, run id, schema name or target, ...)".

The sagas below are the targets of the commands (the child processes import this
module: it must stay free of side effects at import).
"""

from __future__ import annotations

import signal
import subprocess

import anyio
import pytest
from pydantic import BaseModel

import saga
from tests._harness import popen, python_env, run
from tests.conftest import Cli

pytestmark = pytest.mark.timeout(60)


class Part(BaseModel):
    n: int = 0


#: A saga whose step starts runs of another: a target naming only it lacks its child.
part = saga.Saga("targets_part", input=Part, output=int)


@part.step()
async def count(ctx: saga.Context[Part]) -> int:
    return ctx.input.n


whole = saga.Saga("targets_whole", input=Part)
parts = whole.children("parts", part, lambda ctx: [Part(n=1)])

#: Two different definitions of one saga name and version: the list is a bad target.
twin_a = saga.Saga("targets_twin", input=Part)
twin_b = saga.Saga("targets_twin", input=Part)


@twin_a.step()
async def left(ctx: saga.Context[Part]) -> int:
    return 1


@twin_b.step()
async def right(ctx: saga.Context[Part]) -> int:
    return 2


TWINS = [twin_a, twin_b]

#: A saga with no step: a client cannot register it (DefinitionError at open).
stepless = saga.Saga("targets_stepless", input=Part)
RUN_ID = "01a24b94-3bde-74fc-a4f6-568cd712def8"


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["worker", "tests.test_cli_targets:whole"], "targets_part"),
        (["signal", "go", RUN_ID, "--payload", "{}", "--target",
          "tests.test_cli_targets:whole"], "targets_part"),
        (["worker", "tests.test_cli_targets:TWINS"], "targets_twin"),
    ],
    ids=["worker-without-child", "signal-without-child", "worker-two-definitions"],
)  # fmt: skip
async def test_a_target_whose_sagas_cannot_be_registered_is_a_usage_error(
    dsn: str, argv: list[str], named: str
) -> None:
    """README, Child sagas: "The child saga must be registered with the same orchestrator
    (else `DefinitionError` at open)"; Command line: a bad target is a usage error.

    A target naming a saga whose children step starts a saga the target does not hold
    (`myapp:imports` instead of the list), or holding two different definitions of one
    saga version, exits 2 naming the saga, before any connection. Before, it exited 1,
    the code of a database error."""
    done = await run("-m", "saga", *argv, "--dsn", dsn, env=python_env(dsn), timeout=30)
    assert named in done.stderr, done.stderr
    assert "invalid target" in done.stderr, done.stderr
    assert done.returncode == 2, f"exit {done.returncode}: {done.stderr.strip()}"


@pytest.mark.parametrize("empty", ["", "  "], ids=["empty", "blank"])
async def test_an_empty_dsn_option_is_a_usage_error_not_the_environments_database(
    cli: Cli, dsn: str, monkeypatch: pytest.MonkeyPatch, empty: str
) -> None:
    """README, Command line: "`saga` ... takes the database from `--dsn` or `SAGA_DSN`";
    exit "`2` usage (bad option, DSN, ...)".

    `--dsn ""` (a script's `--dsn "$STAGING_DSN"` with the variable unset) is refused
    with exit 2 and a message naming --dsn; nothing runs. Before, the command ran on the
    database of `SAGA_DSN` (here a prune, exit 0)."""
    monkeypatch.setenv("SAGA_DSN", dsn)  # the environment names another database
    code, out, err = await cli("prune", "--older-than", "30d", "--dsn", empty, dsn=False)
    assert code == 2, f"--dsn {empty!r} ran on $SAGA_DSN (exit {code}): {out or err}"
    assert "--dsn is empty" in err


async def test_worker_durations_take_the_documented_duration_format(dsn: str) -> None:
    """README, Command line: "Durations are `90s`, `10m`, `2h`, `3d`, `1w` or
    combinations", and `saga worker` takes `--poll-interval` and `--shutdown-timeout`.

    `saga worker ... --shutdown-timeout 30s --poll-interval 2s --lease-seconds 1m`
    starts (bare seconds still work). Before, those options took bare seconds only
    (exit 2, "must be a positive number, got '30s'")."""
    proc = popen(
        "-m", "saga", "worker", "examples.checkout:SAGAS", "--dsn", dsn,
        "--shutdown-timeout", "30s", "--poll-interval", "2s", "--lease-seconds", "1m",
        env=python_env(dsn), stdout=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        said: list[bytes] = []
        with anyio.fail_after(20):
            while True:
                line = await anyio.to_thread.run_sync(proc.stderr.readline)
                said.append(line)
                if not line or b" ready: " in line:
                    break
        assert b" ready: " in said[-1], f"exit {proc.wait(5)}: {b''.join(said).decode()}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
        proc.stderr.close()


async def test_a_worker_duration_that_is_not_one_is_a_usage_error(cli: Cli) -> None:
    """README, Command line: exit 2 for a bad duration. `--poll-interval 2x` and
    `--shutdown-timeout 0s` are refused with exit 2, naming what is accepted."""
    for option, value in (("--poll-interval", "2x"), ("--shutdown-timeout", "0s")):
        code, _, err = await cli("worker", "examples.checkout:SAGAS", option, value)
        assert code == 2, (option, value, err)
        assert "a duration" in err, err


async def test_a_target_saga_without_steps_is_a_usage_error(dsn: str) -> None:
    """README, Command line: exit "`2` usage (... target, ...)". A target whose saga has
    no step (what a client refuses at open: also a saga ending with a sleep, a key on a
    graph saga, a bad pivot) exits 2 before any connection. Before, it exited 1 after
    connecting."""
    done = await run(
        "-m", "saga", "worker", "tests.test_cli_targets:stepless", "--dsn", dsn,
        env=python_env(dsn), timeout=30,
    )  # fmt: skip
    assert done.returncode == 2, f"exit {done.returncode}: {done.stderr.strip()}"
    assert "targets_stepless" in done.stderr
    assert "no steps" in done.stderr
