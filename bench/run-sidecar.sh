#!/usr/bin/env bash
# bench/run-sidecar.sh -- `make bench`: the sidecar against nginx in the same runs of the shared
# loopback harness (wrk, openssl s_time), RUNS times, then medians and ratios; then idle-connection
# memory and a 100 MB body through egress.
# Needs: apt-get install nginx haproxy stunnel4 wrk  (the harness checks for all of them)
# Knobs: RUNS=3 HARNESS=../shared/bench DUR=10s, plus the harness's own (see its README).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
HARNESS=${HARNESS:-$root/../shared/bench}
RUNS=${RUNS:-3}
stamp=$(date +%Y%m%d-%H%M%S)
dirs=()
for i in $(seq "$RUNS"); do
  tag="sidecar-$stamp-$i"
  PROXIES="nginx custom" MODES=1 TAG=$tag \
    CUSTOM_EGRESS_CMD="$here/sidecar-cmd.sh egress" CUSTOM_INGRESS_CMD="$here/sidecar-cmd.sh ingress" \
    "$HARNESS/run.sh"
  dirs+=("${BASE:-/tmp/lab-bench}/results/$tag")
done
"$root/.venv/bin/python" "$here/ratios.py" "${dirs[@]}"
"$root/.venv/bin/python" "$here/idle_rss.py"
