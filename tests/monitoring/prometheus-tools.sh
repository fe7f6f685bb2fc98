#!/usr/bin/env bash
# Puts promtool and prometheus in DIR (default ~/.cache/pil-promtool), taken out of
# Debian's prometheus package without installing it: no service, no other package.
# promtool checks the shipped monitoring files; the prometheus server only runs when
# the dashboard picture is drawn (dashboard-picture.sh).
set -euo pipefail
DIR="${1:-$HOME/.cache/pil-promtool}"
[ -x "$DIR/promtool" ] && [ -x "$DIR/prometheus" ] && exit 0
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
for tool in promtool prometheus; do
    cp "extracted/usr/bin/$tool" "$DIR/$tool.new"
    mv "$DIR/$tool.new" "$DIR/$tool"
done
echo "promtool and prometheus in $DIR" >&2
