#!/usr/bin/env bash
# The fault runs behind docs/reliability.md, longer than the suite's bounded versions:
# the crash loop (a node killed with SIGKILL again and again under mixed load) on
# RocksDB and on PostgreSQL, printing what was acknowledged and what was lost.
#
#   tests/bench/faults.sh           50 kills per engine
#   tests/bench/faults.sh 200       200 kills per engine
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS="${1:-50}"
bash .ci/setup
source .ci/env
for engine in rocksdb postgres; do
    echo "== crash loop on $engine, $ROUNDS kills"
    PIL_TEST_ENGINE="$engine" PIL_CRASH_ROUNDS="$ROUNDS" cargo test --release --test it \
        faults::a_node_killed_again_and_again -- --nocapture 2>&1 | grep -E "^crash loop|test result|panicked"
done
