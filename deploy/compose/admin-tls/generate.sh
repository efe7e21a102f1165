#!/bin/sh
# The control plane's admin certificate for deploy/compose/compose.yaml, made
# once by the one-shot `admin-tls` service into the `admin-tls` volume.
#
# The admin API serves plain HTTP only on loopback (prism control-plane
# refuses otherwise), and in compose it has to be reached from other
# containers: Prometheus scrapes its /metrics, and the CLI may run on the
# host. So it serves TLS with a certificate signed by a small CA made here:
#   ca.pem                 the CA; Prometheus and the CLI trust it (--admin-ca)
#   admin.pem, admin.key   the server certificate for control-plane,
#                          localhost and 127.0.0.1 (PRISM_ADMIN_TLS_NAMES),
#                          and its key
# A CA and a leaf rather than one self-signed certificate: rustls (the CLI)
# refuses a CA certificate as a server's, and Go (Prometheus) wants a CA.
#
# Existing files are kept, so a restart keeps the certificate the CLI already
# trusts. To use your own instead, put ca.pem, admin.pem and admin.key into
# the volume (or mount a directory at /tls in place of it); this script then
# leaves them alone.
#
# Run by hand it makes the same files for another deployment, e.g. the
# Kubernetes Secret of deploy/kubernetes (README "Deployment"):
#   PRISM_ADMIN_TLS_NAMES=DNS:prism-control-plane,DNS:localhost,IP:127.0.0.1 \
#     sh deploy/compose/admin-tls/generate.sh ./admin-tls
set -eu
dir=${1:-/tls}
# The names the certificate is valid for, as openssl's subjectAltName.
names=${PRISM_ADMIN_TLS_NAMES:-DNS:control-plane,DNS:localhost,IP:127.0.0.1}
# The control plane's user in deploy/Dockerfile, who alone reads the key.
owner=${PRISM_UID:-10001}

if [ -s "$dir/admin.pem" ] && [ -s "$dir/admin.key" ] && [ -s "$dir/ca.pem" ]; then
    echo "admin-tls: keeping the certificate in $dir"
    exit 0
fi
if ! command -v openssl >/dev/null 2>&1; then
    # The alpine image of compose's admin-tls service has no openssl.
    apk add --no-cache openssl >/dev/null
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$work/ca.key" -out "$work/ca.pem" -days 3650 \
    -subj "/CN=Prism admin CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$work/admin.key" -out "$work/admin.csr" \
    -subj "/CN=Prism admin API" 2>/dev/null
printf '%s\n' \
    "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth" \
    "subjectAltName=$names" >"$work/ext"
openssl x509 -req -in "$work/admin.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" \
    -CAcreateserial -days 825 -extfile "$work/ext" -out "$work/admin.pem" 2>/dev/null

mkdir -p "$dir"
cp "$work/ca.pem" "$work/admin.pem" "$work/admin.key" "$dir/"
# The certificates are public; the key is the control plane's alone. The CA's
# key is not kept: nothing else is ever signed with it.
chmod 644 "$dir/ca.pem" "$dir/admin.pem"
chmod 600 "$dir/admin.key"
if [ "$(id -u)" = 0 ]; then
    chown "$owner" "$dir/admin.key"
fi
echo "admin-tls: made $dir/ca.pem, $dir/admin.pem and $dir/admin.key"
