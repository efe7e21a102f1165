#!/bin/bash
# Instructions per request of the release `prism proxy --workers 1`, counted by
# callgrind: the same figure on a busy machine, unlike wall-clock load runs.
#
#   cargo build --release --bin prism
#   benches/load/callgrind.sh target/release/prism [REQUESTS]
#
# Starts an nginx origin (128-byte answers, as the load harness's origin) and
# Prism's control plane, applies a one-route policy, runs the proxy under
# callgrind with instrumentation off, warms it up, then counts REQUESTS
# (default 20000) HTTP/1.1 requests (h2load --h1 -c16), as many h2c ones
# (h2load -c4 -m16) to the HTTP/1.1 upstream, and as many h2c ones to an
# HTTP/2 upstream (`h2`: the gRPC scenario's path, upstream pool and h2
# client included), each into its own profile. Needs valgrind, nginx, h2load
# and curl; installs nothing. Read a profile with
#   callgrind_annotate --inclusive=yes DIR/cg.h1
set -euo pipefail
BIN=$(realpath "$1"); N=${2:-20000}
for tool in valgrind callgrind_control nginx h2load curl; do
  command -v "$tool" >/dev/null || { echo "error: $tool is not installed" >&2; exit 1; }
done
D=$(mktemp -d /tmp/prism-callgrind.XXXXXX); cd "$D"
BODY="Prism load harness origin. This body is 128 bytes long, the same for every target and scenario of the run......................\n"
cat > nginx.conf <<CONF
daemon off; master_process off; worker_processes 1; pid $D/nginx.pid; error_log $D/nginx.log warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000000;
  client_body_temp_path $D/t1; proxy_temp_path $D/t2; fastcgi_temp_path $D/t3; uwsgi_temp_path $D/t4; scgi_temp_path $D/t5;
  server { listen 127.0.0.1:18181; location / { return 200 "$BODY"; } }
  server { listen 127.0.0.1:18182 http2; location / { return 200 "$BODY"; } } }
CONF
cat > policy.yaml <<CONF
namespaces: [{name: bench, hosts: ["127.0.0.1"], default_timeout: 30s}]
backends: [{name: bench/origin-http1, protocol: HTTP1, connect_timeout: 5s, endpoints: [{address: "127.0.0.1:18181"}]},
           {name: bench/origin-http2, protocol: HTTP2, connect_timeout: 5s, endpoints: [{address: "127.0.0.1:18182"}]}]
routes: [{name: bench/h2, match: {prefix: /h2/}, backend: origin-http2, timeout: 30s},
         {name: bench/root, match: {prefix: /}, backend: origin-http1, timeout: 30s}]
CONF
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null; wait 2>/dev/null' EXIT
nginx -p "$D" -c "$D/nginx.conf" & PIDS+=($!)
"$BIN" control-plane --data-dir cp --admin-addr 127.0.0.1:19000 --xds-addr 127.0.0.1:19001 \
  --envoy-listener-addr 127.0.0.1:19002 --envoy-tls-listener-addr 127.0.0.1:19003 > cp.log 2>&1 & PIDS+=($!)
for _ in $(seq 100); do curl -s 127.0.0.1:19000/ >/dev/null && break; sleep 0.2; done
"$BIN" --admin-url http://127.0.0.1:19000 --token-file cp/admin-token apply -f policy.yaml >/dev/null
RUST_LOG=warn valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$D/cg.out.%p" \
  "$BIN" proxy --control-plane http://127.0.0.1:19001 --listen 127.0.0.1:18080 \
  --tls-listen 127.0.0.1:18443 --admin-addr 127.0.0.1:19901 --data-dir px --node-id callgrind \
  --workers 1 > proxy.log 2>&1 & PX=$!; PIDS+=($PX)
for _ in $(seq 300); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' 127.0.0.1:18080/)" = 200 ] && break; sleep 0.2
done
h2load --h1 -n 2000 -c 16 http://127.0.0.1:18080/ >/dev/null
h2load -n 2000 -c 4 -m 16 http://127.0.0.1:18080/ >/dev/null
count() { # name, path, h2load flags
  local name=$1 path=$2; shift 2
  callgrind_control -i on $PX >/dev/null 2>&1
  h2load "$@" -n "$N" "http://127.0.0.1:18080$path" > "$name.h2load"
  callgrind_control -i off $PX >/dev/null 2>&1
  callgrind_control -d "$name" $PX >/dev/null 2>&1
  sleep 1
  mv "$(ls -t "$D"/cg.out.$PX.* | head -1)" "cg.$name"
  local ir; ir=$(awk '/^totals:/ {print $2}' "cg.$name")
  echo "$name: $(grep -o '[0-9]* succeeded' "$name.h2load"), $((ir / N)) Ir/request"
}
h2load -n 2000 -c 4 -m 16 http://127.0.0.1:18080/h2/ >/dev/null
count h1 / --h1 -c 16
count h2c / -c 4 -m 16
count h2 /h2/ -c 4 -m 16
echo "profiles: $D/cg.h1 $D/cg.h2c $D/cg.h2"
