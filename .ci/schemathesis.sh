#!/usr/bin/env bash
# Property-based tests of the admin API against its own OpenAPI document:
# starts `prism control-plane` on free loopback ports with a fresh data dir,
# points schemathesis at http://…/v1/openapi.json with the first admin
# token, and fails if any request gets a 5xx or an answer the document does
# not allow (status code, content type, headers, body schema). Then stops
# the server. Runnable alone from the repository root:
#
#     bash .ci/schemathesis.sh            # MAX_EXAMPLES=… SEED=… to vary
#
# schemathesis comes from .tools/venv (xtask/requirements-test.txt, which
# `cargo xtask test` installs), else from PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

max_examples="${MAX_EXAMPLES:-25}"
seed="${SEED:-1}"
target_dir="${CARGO_TARGET_DIR:-target}"

schemathesis="$PWD/.tools/venv/bin/schemathesis"
if [[ ! -x "$schemathesis" ]]; then
    schemathesis="$(command -v schemathesis || true)"
fi
if [[ -z "$schemathesis" ]]; then
    echo "schemathesis: not in .tools/venv or on PATH; run \`cargo xtask test\` once" >&2
    exit 1
fi

cargo build --quiet --locked --bin prism
prism="$(cd "$target_dir" && pwd)/debug/prism"

work="$(mktemp -d)"
server=""
cleanup() {
    if [[ -n "$server" ]]; then
        kill "$server" 2>/dev/null || true
        wait "$server" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# Port 0: the kernel picks free ports, and prism prints them on its first
# line of stdout (`admin=http://127.0.0.1:… xds=http://127.0.0.1:…`).
RUST_LOG="${RUST_LOG:-warn}" "$prism" control-plane \
    --data-dir "$work/data" \
    --admin-addr 127.0.0.1:0 \
    --xds-addr 127.0.0.1:0 \
    >"$work/stdout" 2>"$work/stderr" &
server=$!

# Wait, at most 30 s, for the addresses, the admin token and /healthz.
admin=""
for _ in $(seq 300); do
    if ! kill -0 "$server" 2>/dev/null; then
        echo "prism control-plane exited:" >&2
        cat "$work/stderr" >&2
        exit 1
    fi
    admin="$(grep -o 'admin=[^ ]*' "$work/stdout" 2>/dev/null | head -1 | cut -d= -f2- || true)"
    if [[ -n "$admin" && -s "$work/data/admin-token" ]] \
        && python3 -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=1)" \
            "$admin/healthz" 2>/dev/null; then
        break
    fi
    admin=""
    sleep 0.1
done
if [[ -z "$admin" ]]; then
    echo "prism control-plane did not come up in 30 s:" >&2
    cat "$work/stderr" >&2
    exit 1
fi
token="$(tr -d '[:space:]' <"$work/data/admin-token")"

# Two runs, so that the token this script holds stays valid: revoking it
# succeeds once another admin token exists, and the first run creates
# some. So the revocations run first, while this is the only admin token
# (they get 404, or 409 for this one); then everything else.
run() {
    local max_time="$1"
    shift
    # From the temporary directory: schemathesis keeps state in ./.schemathesis.
    (cd "$work" && timeout $((max_time + 60)) "$schemathesis" run "$admin/v1/openapi.json" \
        -H "Authorization: Bearer $token" \
        --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance \
        --max-examples "$max_examples" \
        --seed "$seed" \
        --request-timeout 10 \
        --max-time "$max_time" \
        --workers 1 \
        --generation-database none \
        --no-color \
        "$@" \
        ${SCHEMATHESIS_ARGS:-})
}

echo "schemathesis against $admin/v1/openapi.json (max $max_examples examples per operation, seed $seed)"
# One worker: hypothesis's lambda descriptions call ast.parse, which
# CPython 3.11 does not allow from two threads at once.
status=0
run 30 --include-name "GET /v1/tokens" --include-name "DELETE /v1/tokens/{id}" || status=$?
if [[ $status -eq 0 ]]; then
    # The traffic stream never ends by itself (tests/traffic.rs reads it).
    run 120 --exclude-name "DELETE /v1/tokens/{id}" --exclude-name "GET /v1/traffic/stream" || status=$?
fi
if [[ $status -ne 0 ]]; then
    echo "== prism control-plane stderr" >&2
    tail -50 "$work/stderr" >&2
fi
exit "$status"
