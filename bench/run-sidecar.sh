#!/usr/bin/env bash
# bench/run-sidecar.sh -- `make bench`: the sidecar against nginx in the same runs of the shared
# loopback harness (wrk, openssl s_time), at one worker and at the harness's auto mode (the sidecar
# with `workers = 2`, access log on), RUNS times; an access-log-off egress run beside each; then
# medians and ratios, then idle-connection memory.
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
  PROXIES="nginx custom" MODES=${MODES:-"1 auto"} TAG=$tag \
    CUSTOM_EGRESS_CMD="$here/sidecar-cmd.sh egress" CUSTOM_INGRESS_CMD="$here/sidecar-cmd.sh ingress" \
    "$HARNESS/run.sh"
  dirs+=("${BASE:-/tmp/lab-bench}/results/$tag")
  # the same sidecar with its access log off, egress at mode 1: what the log costs
  PROXIES="custom" MODES=1 SCENARIOS=egress TAG=$tag-nolog ACCESS_LOG=false \
    CUSTOM_EGRESS_CMD="$here/sidecar-cmd.sh egress" "$HARNESS/run.sh"
  nolog="${BASE:-/tmp/lab-bench}/results/$tag-nolog"
  sed -i 's/\tcustom\t/\tcustom-nolog\t/' "$nolog/results.tsv"
  dirs+=("$nolog")
done
"$root/.venv/bin/python" "$here/ratios.py" "${dirs[@]}"
"$root/.venv/bin/python" "$here/idle_rss.py"
