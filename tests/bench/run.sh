#!/usr/bin/env bash
# The benchmark suite: builds pil-bench and the node, starts a throwaway PostgreSQL for
# the baseline (installing Debian's package if it is missing), runs every benchmark,
# and writes the results into docs/benchmarks.md.
#
#   tests/bench/run.sh              the full suite, optimized build (about an hour on
#                                   2 cores, most of it the 20 M pointer growth run)
#   tests/bench/run.sh --quick      every benchmark briefly on a small data set, debug
#                                   build; prints the tables, leaves the docs alone
#
# Other arguments go to `pil-bench run`, e.g. --growth-pointers 0 (skip the growth run),
# --scenarios floor,local,postgres, --patients 50000, or --baseline-node PATH (another
# build's pil-test-node, measured beside this one). Everything runs on this machine:
# nodes and PostgreSQL on loopback and Unix sockets under one temporary directory,
# removed at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

QUICK=0
for arg in "$@"; do
    [ "$arg" = "--quick" ] && QUICK=1
done

bash .ci/setup
source .ci/env

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# PostgreSQL's server and client programs; Debian keeps them per major version.
pg_bin() {
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}
PGBIN=$(pg_bin)
if [ -z "$PGBIN" ] || [ ! -x "$PGBIN/initdb" ] || [ ! -x "$PGBIN/pgbench" ]; then
    echo "installing postgresql" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
    PGBIN=$(pg_bin)
fi

if [ "$QUICK" -eq 1 ]; then
    cargo build --workspace --all-targets
    BIN="$CARGO_TARGET_DIR/debug"
else
    # Optimized binaries in their own target directory (RocksDB is compiled once more
    # the first time).
    export CARGO_TARGET_DIR="${PIL_BENCH_TARGET_DIR:-$HOME/.cache/pil-target-release}"
    cargo build --release --workspace --bins
    BIN="$CARGO_TARGET_DIR/release"
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/pil-bench.XXXXXX")
chmod 755 "$TMP"
PGDIR="$TMP/pg"
mkdir -p "$PGDIR" "$TMP/work"

# The server refuses to run as root: as root, run it as the postgres user.
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}
[ "$(id -u)" -eq 0 ] && chown postgres "$PGDIR"

cleanup() {
    if [ -f "$PGDIR/data/postmaster.pid" ]; then
        as_pg "$PGBIN/pg_ctl" -D "$PGDIR/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT

as_pg "$PGBIN/initdb" -D "$PGDIR/data" -U postgres --auth=trust -E UTF8 --no-sync >/dev/null
# Unix socket only; durable commits; a buffer cache the size of the node's block cache.
as_pg "$PGBIN/pg_ctl" -D "$PGDIR/data" -l "$PGDIR/server.log" -w -o \
    "-c listen_addresses='' -k $PGDIR -p 5432 -c fsync=on -c synchronous_commit=on -c shared_buffers=256MB -c max_connections=200" \
    start >/dev/null
"$PGBIN/psql" -X -q -h "$PGDIR" -p 5432 -U postgres -d postgres -c "CREATE DATABASE pil_bench"

COMMAND="tests/bench/run.sh $*"
PG_ARGS=(--pg-host "$PGDIR" --pg-port 5432 --pg-user postgres --pg-db pil_bench --pg-bin "$PGBIN")
if [ "$QUICK" -eq 1 ]; then
    TMPDIR="$TMP/work" "$BIN/pil-bench" run "${PG_ARGS[@]}" --command "${COMMAND% }" \
        --json "$TMP/results.json" "$@"
else
    RESULTS="${PIL_BENCH_RESULTS:-$HOME/.cache/pil-bench}"
    mkdir -p "$RESULTS"
    JSON="$RESULTS/results-$(date -u +%Y%m%dT%H%M%SZ).json"
    TMPDIR="$TMP/work" "$BIN/pil-bench" run "${PG_ARGS[@]}" --command "${COMMAND% }" \
        --json "$JSON" --markdown "$ROOT/docs/benchmarks.md" "$@"
    echo "results: docs/benchmarks.md (raw: $JSON)" >&2
fi
