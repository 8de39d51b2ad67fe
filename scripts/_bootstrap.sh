# Sourced by scripts/dev and scripts/test: make sure .venv exists and is up to date.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

find_python() {
    for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
        [ -n "$candidate" ] || continue
        command -v "$candidate" >/dev/null 2>&1 || continue
        if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "orderflow needs Python 3.11 or newer (set PYTHON=/path/to/python3.x)" >&2
    return 1
}

if [ ! -x .venv/bin/python ]; then
    python="$(find_python)"
    echo "creating .venv with $("$python" --version)" >&2
    "$python" -m venv .venv
fi
# Reinstall only when the dependency list changed.
stamp=".venv/.orderflow-installed-$(cksum < pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
    echo "installing orderflow and its dependencies into .venv" >&2
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]' >&2
    rm -f .venv/.orderflow-installed-*
    touch "$stamp"
fi
