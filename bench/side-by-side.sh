#!/usr/bin/env bash
# side-by-side.sh BASE egress|ingress [ROUNDS] -- CPU per keep-alive request (pxus/op) of two
# sidecars at once: the code in BASE (a directory holding another proxy/ tree, e.g. made by
# `git archive main proxy | tar -x -C /tmp/base`) and this checkout's. Both run one worker on
# the same core, each under its own wrk -c50 at the same time, so both see the same background
# load: on a shared machine, a few us per request show here and not in run.sh's separate runs.
# The two swap ports every round. Ports 17080 18080 18443 19080 19443 27080 28080 28443.
#
#   git archive main proxy | tar -x -C /tmp/base
#   bench/side-by-side.sh /tmp/base egress 4
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
base=$(cd "${1:?BASE tree}" && pwd); sc=${2:?egress|ingress}; rounds=${3:-4}; dur=${DUR:-8s}
pki=${PKI:-/tmp/lab-bench/pki}   # run.sh's (../shared/bench/mkpki.sh makes it)
[[ -f $base/proxy/cli.py ]] || { echo "no proxy/ tree in $base" >&2; exit 1; }
[[ -s $pki/server-ecdsa.crt ]] || { echo "no PKI in $pki: run ../shared/bench/mkpki.sh $pki" >&2; exit 1; }
for port in 17080 18080 18443 19080 19443 27080 28080 28443; do
  ss -Hltn "sport = :$port" | grep -q . && { echo "port $port in use" >&2; exit 1; }
done
run=$(mktemp -d); mkdir -p "$run/tmp"
pids=()
cleanup() { local p; for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done; wait 2>/dev/null; }
trap cleanup EXIT
body=$(printf 'x%.0s' $(seq 200))
mtls="proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_ssl_certificate $pki/client-ecdsa.crt;
      proxy_ssl_certificate_key $pki/client-ecdsa.key; proxy_ssl_trusted_certificate $pki/server-ca.crt;
      proxy_ssl_verify on; proxy_ssl_name localhost; proxy_ssl_server_name on; proxy_ssl_session_reuse on;"
cat >"$run/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $run/nginx.pid; error_log $run/nginx.err warn;
events { worker_connections 4096; }
http { access_log off; default_type text/plain; keepalive_timeout 75s; keepalive_requests 1000000;
  client_body_temp_path $run/tmp/b; proxy_temp_path $run/tmp/p; fastcgi_temp_path $run/tmp/f;
  uwsgi_temp_path $run/tmp/u; scgi_temp_path $run/tmp/s;
  server { listen 127.0.0.1:19080 backlog=4096; location / { return 200 "$body"; } }
  server { listen 127.0.0.1:19443 ssl backlog=4096;
    ssl_certificate $pki/server-ecdsa.crt; ssl_certificate_key $pki/server-ecdsa.key;
    ssl_client_certificate $pki/client-ca.crt; ssl_verify_client on; ssl_protocols TLSv1.2 TLSv1.3;
    location / { return 200 "$body"; } }
  upstream a { server 127.0.0.1:18443; keepalive 64; keepalive_requests 1000000; }
  upstream b { server 127.0.0.1:28443; keepalive 64; keepalive_requests 1000000; }
  server { listen 127.0.0.1:17080 backlog=4096; location / { proxy_pass https://a; $mtls } }
  server { listen 127.0.0.1:27080 backlog=4096; location / { proxy_pass https://b; $mtls } }
}
CONF
config() { # listen port -> the harness's config for the scenario (bench/sidecar-cmd.sh)
  printf '[log]\nformat = "json"\naccess = true\n[service]\nworkers = 1\n'
  if [[ $sc == egress ]]; then
    printf '[[egress]]\nname = "bench-egress"\nlisten = "127.0.0.1:%s"\n' "$1"
    printf 'upstream = "https://localhost:19443"\nclient_cert = "%s"\nclient_key = "%s"\n' \
      "$pki/client-ecdsa.crt" "$pki/client-ecdsa.key"
    printf 'trust = "%s"\nprofile = "generic"\nmax_connection_age = 300\n' "$pki/server-ca.crt"
  else
    printf '[[ingress]]\nname = "bench-ingress"\nlisten = "127.0.0.1:%s"\n' "$1"
    printf 'server_cert = "%s"\nserver_key = "%s"\nclient_ca = "%s"\n' \
      "$pki/server-ecdsa.crt" "$pki/server-ecdsa.key" "$pki/client-ca.crt"
    printf 'upstream = "http://127.0.0.1:19080"\nmax_connections = 4096\n'
  fi
}
if [[ $sc == egress ]]; then ports=(18080 28080); urls=(http://127.0.0.1:18080/ http://127.0.0.1:28080/)
else ports=(18443 28443); urls=(http://127.0.0.1:17080/ http://127.0.0.1:27080/); fi
config "${ports[0]}" >"$run/a.toml"; config "${ports[1]}" >"$run/b.toml"
taskset -c 0 nginx -e "$run/nginx.err" -p "$run/" -c "$run/nginx.conf" & pids+=($!)
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
sidecar() { # tree config log: the sidecar of that tree (python -m from it), on core 1
  (cd "$1" && exec taskset -c 1 "$here/.venv/bin/python" -m proxy.cli run -c "$2" >"$3" 2>&1) &
  echo $!
}
declare -A us
for i in $(seq "$rounds"); do
  trees=("$base" "$here"); names=(base this)
  (( i % 2 )) || { trees=("$here" "$base"); names=(this base); }
  a=$(sidecar "${trees[0]}" "$run/a.toml" "$run/a.log"); b=$(sidecar "${trees[1]}" "$run/b.toml" "$run/b.log")
  for _ in $(seq 100); do
    ss -Hltn "sport = :${ports[0]}" | grep -q . && ss -Hltn "sport = :${ports[1]}" | grep -q . && break
    sleep 0.1
  done
  for u in "${urls[@]}"; do taskset -c 0 wrk -t1 -c50 -d2s "$u" >/dev/null 2>&1 & done; wait -n; wait -n
  ka=$(ticks "$a"); kb=$(ticks "$b")
  taskset -c 0 wrk -t1 -c50 -d"$dur" "${urls[0]}" >"$run/wa" 2>&1 & wa=$!
  taskset -c 0 wrk -t1 -c50 -d"$dur" "${urls[1]}" >"$run/wb" 2>&1 & wb=$!
  wait "$wa" "$wb"
  ka=$(( $(ticks "$a") - ka )); kb=$(( $(ticks "$b") - kb ))
  na=$(awk '/requests in/{print $1}' "$run/wa"); nb=$(awk '/requests in/{print $1}' "$run/wb")
  hz=$(getconf CLK_TCK)
  us[${names[0]}]+=" $(( ka * 1000000 / hz / na ))"; us[${names[1]}]+=" $(( kb * 1000000 / hz / nb ))"
  echo "round $i: ${names[0]} $(( ka * 1000000 / hz / na )) us/request ($na), ${names[1]} $(( kb * 1000000 / hz / nb )) us/request ($nb)"
  kill -INT "$a" "$b"; wait "$a" "$b" 2>/dev/null
done
python3 - "${us[base]}" "${us[this]}" <<'PY'
import statistics, sys
base, this = ([int(x) for x in arg.split()] for arg in sys.argv[1:])
print(f"pxus/op median: base {statistics.median(base)}, this checkout {statistics.median(this)}; "
      f"paired base - this: {[b - t for b, t in zip(base, this)]}")
PY
