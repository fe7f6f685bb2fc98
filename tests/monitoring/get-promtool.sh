#!/usr/bin/env bash
# Puts promtool in DIR (default ~/.cache/pil-promtool), taken out of Debian's prometheus
# package without installing it: no server, no service, no other package.
set -euo pipefail
DIR="${1:-$HOME/.cache/pil-promtool}"
[ -x "$DIR/promtool" ] && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
if ! apt-get download -qq prometheus >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    apt-get download -qq prometheus >/dev/null
fi
dpkg-deb -x prometheus_*.deb extracted
mkdir -p "$DIR"
cp extracted/usr/bin/promtool "$DIR/promtool.new"
mv "$DIR/promtool.new" "$DIR/promtool"
echo "promtool in $DIR" >&2
