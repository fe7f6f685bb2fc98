#!/usr/bin/env bash
# Draws docs/monitoring/dashboard.svg (see tests/tests/it/dashboard.rs): three regions
# under load for a minute and a half, scraped by Prometheus, drawn from the dashboard's
# own queries. Not part of CI; run it when the dashboard changes.
set -euo pipefail
cd "$(dirname "$0")/../.."
source .ci/env
bash tests/monitoring/prometheus-tools.sh "${PIL_PROMTOOL_DIR:-$HOME/.cache/pil-promtool}"
cargo test -p pil-tests --test it -- --ignored --exact dashboard::draw_the_dashboard_picture --nocapture
