#!/usr/bin/env bash
# Install everything boxvm needs on a Debian 12 machine, then build the guest bundle
# and the built-in images. Idempotent: a second run only checks. Arguments go to
# `boxvm setup` (--refresh, --with-build-tools).
set -euo pipefail
cd "$(dirname "$0")/.."

# docker-registry and skopeo: the registry tests and the pull benchmark baseline.
# mmdebstrap, apt-utils (apt-ftparchive) and fakechroot (its mode without root): the default image.
APT_PACKAGES=(qemu-system-x86 qemu-utils e2fsprogs fakeroot dpkg apt passwd make python3-venv docker-registry skopeo
    mmdebstrap apt-utils fakechroot)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if [ ${#missing[@]} -gt 0 ]; then
    echo "bootstrap: installing ${missing[*]}"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# `apt-get download` (the guest bundle) and the image package resolution need package lists.
if [ -z "$(ls -A /var/lib/apt/lists/ 2>/dev/null | grep -v -e lock -e partial)" ]; then
    $SUDO apt-get update -q
fi

# The guest runs Debian's Python 3.11 and the host byte-compiles its stdlib: same minor version.
PY=""
for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
        PY=$(command -v "$candidate"); break
    fi
done
[ -n "$PY" ] || { echo "bootstrap: Python 3.11 is required" >&2; exit 1; }

stamp=.venv/.boxvm-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x .venv/bin/boxvm ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$PY" -m venv --clear .venv  # --clear: also repairs a half-deleted venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[dev]'
    echo "$want" > "$stamp"
fi
.venv/bin/boxvm setup "$@"
