#!/usr/bin/env bash
# bench/sidecar-cmd.sh egress|ingress -- the sidecar as the benchmark harness's "custom" proxy.
# The harness (run.sh) exports PKI paths: CLIENT_CERT CLIENT_KEY SERVER_CA CLIENT_CA SERVER_CERT
# SERVER_KEY. Writes a config for that scenario and execs the sidecar in the foreground.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
conf=$(mktemp -d)/bench.toml
ACCESS_LOG=${ACCESS_LOG:-true}   # as users run it
WORKERS=${WORKERS:-1}             # the harness exports 1, or 2 in its auto mode
SERVICE_EXTRA=${SERVICE_EXTRA:-}  # more [service] lines, e.g. "malloc_trim_interval = 0"
PROFILE=${PROFILE:-}              # a file: run under cProfile, its stats written there at exit
case ${1:?egress|ingress} in
  egress) cat >"$conf" <<CONF
[log]
format = "json"
access = $ACCESS_LOG
[service]
workers = $WORKERS
$SERVICE_EXTRA
[[egress]]
name = "bench-egress"
listen = "127.0.0.1:8080"
upstream = "https://localhost:9443"
client_cert = "$CLIENT_CERT"
client_key = "$CLIENT_KEY"
trust = "$SERVER_CA"
profile = "generic"
max_connection_age = 300
CONF
  ;;
  ingress) cat >"$conf" <<CONF
[log]
format = "json"
access = $ACCESS_LOG
[service]
workers = $WORKERS
$SERVICE_EXTRA
[[ingress]]
name = "bench-ingress"
listen = "127.0.0.1:8443"
server_cert = "$SERVER_CERT"
server_key = "$SERVER_KEY"
client_ca = "$CLIENT_CA"
upstream = "http://127.0.0.1:9080"
max_connections = 4096
CONF
  ;;
esac
if [[ -n $PROFILE ]]; then
  exec "$here/.venv/bin/python" -m cProfile -o "$PROFILE" -m proxy.cli run -c "$conf"
fi
exec "$here/.venv/bin/mtls-sidecar" run -c "$conf"
