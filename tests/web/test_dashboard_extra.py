"""The dashboard is an optional extra: the core never imports a web framework."""

from __future__ import annotations

import subprocess
import sys


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def test_importing_saga_imports_no_web_framework() -> None:
    """``import saga`` (and its CLI) loads neither Starlette nor Jinja2."""
    result = _python(
        "import sys, saga, saga.__main__\n"
        "loaded = [m for m in ('starlette', 'jinja2', 'uvicorn') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    assert result.returncode == 0, result.stderr


def test_saga_web_without_the_extra_names_the_install_command() -> None:
    """Without Starlette installed, ``import saga.web`` raises ImportError saying
    ``pip install 'saga[web]'``."""
    result = _python(
        "import sys\n"
        "sys.modules['starlette'] = None  # as if not installed\n"
        "try:\n"
        "    import saga.web\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    raise SystemExit('imported')\n"
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'saga[web]'" in result.stdout
