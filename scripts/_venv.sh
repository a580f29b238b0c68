# shellcheck shell=bash
# Sourced (never run) by scripts/test.sh and scripts/demo.sh: creates or reuses the repository's
# .venv and installs the package in editable mode with one extra.
#
#   source "$repo_root/scripts/_venv.sh"
#   saga_venv_ensure "$repo_root" dev        # or: embedded
#
# The install is skipped when a stamp file inside .venv records the sha256 of pyproject.toml for
# that extra, so a second run starts in about a second instead of re-resolving every dependency.
# Delete .venv (or its .saga-install-* stamps) to force a reinstall.
#
# Environment:
#   SAGA_PYTHON  interpreter used to create .venv (default: the first of python3, python3.13,
#                python3.12, python3.11 that is Python >= 3.11).

# Prints "==> message" on stderr, the banner style shared by the scripts.
saga_say() {
    printf '==> %s\n' "$*" >&2
}

# Prints "error: message" on stderr and returns 1 (callers run under set -e).
saga_die() {
    printf 'error: %s\n' "$*" >&2
    return 1
}

# Succeeds when the interpreter $1 runs and is Python >= 3.11.
saga_python_ok() {
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1
}

# Prints the path of a Python >= 3.11 interpreter, or fails with a message.
saga_find_python() {
    local candidate path
    for candidate in ${SAGA_PYTHON:+"$SAGA_PYTHON"} python3 python3.13 python3.12 python3.11; do
        path="$(command -v "$candidate" 2>/dev/null)" || continue
        if saga_python_ok "$path"; then
            printf '%s\n' "$path"
            return 0
        fi
    done
    saga_die "no Python >= 3.11 found on PATH (tried: ${SAGA_PYTHON:+$SAGA_PYTHON }python3" \
        "python3.13 python3.12 python3.11); install one or set SAGA_PYTHON=/path/to/python3"
}

# Prints the sha256 of file $2, computed by interpreter $1 (portable: no sha256sum/shasum needed).
saga_sha256() {
    "$1" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' \
        "$2"
}

# saga_venv_ensure REPO_ROOT EXTRA: makes REPO_ROOT/.venv exist, work, and hold `-e .[EXTRA]`.
saga_venv_ensure() {
    local root="$1" extra="$2"
    local venv="$root/.venv"
    local vpy="$venv/bin/python"
    local python stamp want have

    if [[ -e "$venv" ]] && ! saga_python_ok "$vpy"; then
        # A venv whose interpreter moved or is too old cannot be repaired in place.
        saga_say "$venv is broken or older than Python 3.11; recreating it"
        rm -rf -- "$venv"
    fi
    if [[ ! -e "$venv" ]]; then
        python="$(saga_find_python)"
        saga_say "creating $venv with $python ($("$python" -c 'import sys; print(sys.version.split()[0])'))"
        "$python" -m venv "$venv" ||
            saga_die "could not create $venv (on Debian/Ubuntu: apt-get install python3-venv)"
    fi

    stamp="$venv/.saga-install-$extra.sha256"
    want="$(saga_sha256 "$vpy" "$root/pyproject.toml")"
    have="$(cat "$stamp" 2>/dev/null || true)"
    if [[ "$have" == "$want" ]]; then
        return 0
    fi

    saga_say "installing -e '.[$extra]' into $venv (pyproject.toml changed or first run)"
    rm -f -- "$stamp"
    (
        cd "$root"
        PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
            "$vpy" -m pip install --quiet --editable ".[$extra]"
    ) || saga_die "pip install -e '.[$extra]' failed (see the pip output above)"
    printf '%s\n' "$want" >"$stamp"
}
