#!/usr/bin/env bash
# bench/run-sidecar.sh -- `make bench`: the sidecar against nginx in the same runs of the shared
# loopback harness (wrk, openssl s_time), at one worker and at the harness's auto mode (the sidecar
# with `workers = 2`, access log on), RUNS times; beside each, egress with the access log on and
# off back to back; then medians and ratios, then idle-connection memory.
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
  # what the access log costs: egress at mode 1 with the log on and off, back to back, the
  # order alternating between runs so that drift on a shared host does not favour either
  order="true false"; (( i % 2 )) || order="false true"
  for log in $order; do
    label=custom-log; [[ $log == false ]] && label=custom-nolog
    PROXIES="custom" MODES=1 SCENARIOS=egress TAG=$tag-$label ACCESS_LOG=$log \
      CUSTOM_EGRESS_CMD="$here/sidecar-cmd.sh egress" "$HARNESS/run.sh"
    out="${BASE:-/tmp/lab-bench}/results/$tag-$label"
    sed -i "s/\tcustom\t/\t$label\t/" "$out/results.tsv"
    dirs+=("$out")
  done
done
"$root/.venv/bin/python" "$here/ratios.py" "${dirs[@]}"
"$root/.venv/bin/python" "$here/idle_rss.py"
"$root/.venv/bin/python" "$here/tracing.py"   # CPU per request: [tracing] off, ratio 0, ratio 1.0
