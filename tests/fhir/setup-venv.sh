#!/usr/bin/env bash
# Creates (if missing) a Python venv at $1 holding the pinned FHIR models that
# validate_auditevent.py needs, for CI on a fresh Debian machine. Safe to run again:
# an existing venv with the pinned versions is left as it is.
#
#   ./setup-venv.sh /path/to/venv && /path/to/venv/bin/python validate_auditevent.py FILE
set -euo pipefail

if [ "$#" -ne 1 ] || [ -z "$1" ]; then
    echo "usage: $0 VENV_DIR" >&2
    exit 2
fi
venv=$1

# fhir.resources 8.3.0: FHIR R4B models under fhir.resources.R4B (AuditEvent as in R4).
FHIR_RESOURCES=8.3.0
FHIR_CORE=1.1.12

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

# A half-made venv (e.g. from a run before python3-venv was installed) is made anew.
if [ ! -x "$venv/bin/python" ] || [ ! -x "$venv/bin/pip" ]; then
    python3 -m venv --clear "$venv"
fi

installed() {
    "$venv/bin/python" - "$FHIR_RESOURCES" "$FHIR_CORE" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(not (version("fhir.resources") == sys.argv[1] and version("fhir-core") == sys.argv[2]))
EOF
}

if ! installed; then
    "$venv/bin/pip" install --disable-pip-version-check --quiet \
        "fhir.resources==$FHIR_RESOURCES" "fhir-core==$FHIR_CORE"
fi
"$venv/bin/python" -c 'from fhir.resources.R4B.auditevent import AuditEvent'
echo "venv ready: $venv (fhir.resources==$FHIR_RESOURCES, fhir-core==$FHIR_CORE)"
