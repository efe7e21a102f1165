#!/usr/bin/env bash
# The web console's bundle, admin-ui/dist, is committed: the control plane
# embeds it at compile time, so building Prism needs no Node. This checks
# that the committed files are exactly what the sources and the lockfile
# build: npm ci, npm run build, and no difference.
set -euo pipefail
cd "$(dirname "$0")/../admin-ui"

npm ci --no-audit --no-fund
npm run build

if ! git diff --exit-code --stat -- dist || [ -n "$(git status --porcelain -- dist)" ]; then
  git status --short -- dist >&2
  echo >&2
  echo "admin-ui/dist is not what admin-ui/src and package-lock.json build." >&2
  echo "Rebuild and commit it: (cd admin-ui && npm ci && npm run build) && git add admin-ui/dist" >&2
  exit 1
fi
echo "admin-ui/dist is what a fresh build makes."
