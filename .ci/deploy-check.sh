#!/usr/bin/env bash
# Static checks of the deployment files in deploy/: the Kubernetes manifests
# against the API's schemas, the Dockerfile through hadolint, and the compose
# setup (compose file, Prometheus, Grafana, collector) through
# .ci/deploy_check.py, which also cross-checks the manifests and holds every
# flag and PRISM_* variable given to `prism` to those src/ defines. No docker engine
# or cluster is used: nothing here is run, only read. About two seconds once
# the tools are installed (about 30 s the first time, creating the venv);
# stops at the first step that fails, naming the file and what is wrong.
set -euo pipefail
cd "$(dirname "$0")/.."

# The schemas of this Kubernetes release, the first where every field the
# manifests use is GA (trafficDistribution, in proxy-services.yaml, since 1.33).
KUBERNETES_VERSION=1.33.0

# The tools, pinned in .ci/requirements-deploy.txt, in the project's venv
# (never the system's site-packages); reinstalled only when that file changes.
venv=.tools/venv
requirements=.ci/requirements-deploy.txt
stamp=$venv/deploy-check-requirements.stamp
want="sha256 $(sha256sum "$requirements" | cut -d' ' -f1)"
if ! "$venv/bin/python" -c '' 2>/dev/null; then
    echo "deploy-check: creating $venv (python3 -m venv)"
    if ! python3 -m venv "$venv"; then
        echo "deploy-check: python3 -m venv failed; on Debian: apt-get install python3-venv" >&2
        exit 1
    fi
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "deploy-check: installing $requirements into $venv"
    "$venv/bin/python" -m pip install --quiet --require-virtualenv \
        --disable-pip-version-check --no-input -r "$requirements"
    echo "$want" >"$stamp"
fi

echo "== kubernetes-validate --strict, Kubernetes $KUBERNETES_VERSION: deploy/kubernetes"
# Every manifest but kustomization.yaml, which is kustomize's, not the API's
# (deploy_check.py checks the files it lists exist).
manifests=()
for file in deploy/kubernetes/*.yaml; do
    [ "$file" = deploy/kubernetes/kustomization.yaml ] || manifests+=("$file")
done
"$venv/bin/kubernetes-validate" --strict --quiet --kubernetes-version "$KUBERNETES_VERSION" "${manifests[@]}"
echo "  ${#manifests[@]} files valid"

echo "== hadolint: deploy/Dockerfile"
"$venv/bin/hadolint" deploy/Dockerfile
echo "  no findings"

echo "== compose, Prometheus, Grafana, collector; Kubernetes cross-checks; flags: .ci/deploy_check.py"
"$venv/bin/python" .ci/deploy_check.py
echo "deploy-check: all passed"
