#!/usr/bin/env bash
# Creates (if missing) a Python venv at $1 holding the pinned packages of
# requirements.txt that pil_example.py needs. Safe to run again: an existing venv with
# the pinned versions is left as it is; a half-made one is made anew.
#
#   ./setup-venv.sh /path/to/venv && /path/to/venv/bin/python pil_example.py --demo-dir DIR
set -euo pipefail

if [ "$#" -ne 1 ] || [ -z "$1" ]; then
    echo "usage: $0 VENV_DIR" >&2
    exit 2
fi
venv=$1
requirements="$(cd "$(dirname "$0")" && pwd)/requirements.txt"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "$0: need root to run: $*" >&2
        exit 1
    fi
}

# Debian splits venv/ensurepip out of python3; install both if either is missing.
if ! command -v python3 >/dev/null || ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    if ! command -v apt-get >/dev/null; then
        echo "$0: python3 with venv support is missing and apt-get is not available" >&2
        exit 1
    fi
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv
fi
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "$0: pil_example.py needs Python 3.11 or newer; python3 is $(python3 -V 2>&1)" >&2
    exit 1
fi

# A half-made venv (e.g. from a run before python3-venv was installed) is made anew.
if [ ! -x "$venv/bin/python" ] || [ ! -x "$venv/bin/pip" ]; then
    python3 -m venv --clear "$venv"
fi

# True when every `name==version` line of requirements.txt is installed in the venv.
installed() {
    "$venv/bin/python" - "$requirements" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import PackageNotFoundError, version
ok = True
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    name, _, pinned = line.partition("==")
    try:
        ok &= version(name) == pinned
    except PackageNotFoundError:
        ok = False
sys.exit(not ok)
EOF
}

if ! installed; then
    "$venv/bin/pip" install --disable-pip-version-check --quiet -r "$requirements"
fi
"$venv/bin/python" -c 'import grpc, grpc_tools.protoc, jwt, cryptography'
echo "venv ready: $venv ($(grep -v '^#' "$requirements" | grep . | paste -sd ' ' -))"
