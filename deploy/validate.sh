#!/usr/bin/env bash
# Validates the deployments: the Akash SDLs with Akash's own validator (npm @akashnetwork/chain-sdk,
# pinned in deploy/validate/package-lock.json) plus the rules it leaves to Akash's Go parser and
# shmback's own (deploy/validate/validate-sdl.mjs), and the Kubernetes manifests against the
# Kubernetes 1.33 schemas (PyPI kubernetes-validate, pinned below, strict) plus the pod rules
# (deploy/validate/validate-k8s.py). Each bad sample under akash/bad and k8s/bad must be refused
# with the error its `# expect:` line names. Needs node (20+) and npm, python3; reaches npm and PyPI.
set -euo pipefail
cd "$(dirname "$0")"
KUBERNETES_VALIDATE_VERSION=1.37.0
venv=${SHMBACK_VALIDATE_VENV:-${TMPDIR:-/tmp}/shmback-validate-venv}

echo "--- Akash SDLs (validateSDL + generateManifest for mainnet, Go parser rules, shmback rules)"
# chain-sdk declares node >= 22.14; its validator runs on node 20 (what CI has), so the engine
# check is a warning here, not a refusal.
(cd validate && npm ci --no-audit --no-fund --loglevel=error --engine-strict=false >/dev/null)
node validate/validate-sdl.mjs akash/deploy.*.yaml
node validate/validate-sdl.mjs --expect-fail akash/bad/*.yaml

echo "--- Kubernetes manifests (kubernetes-validate $KUBERNETES_VALIDATE_VERSION, strict, Kubernetes 1.33; pod rules)"
if ! "$venv/bin/python" -c "import kubernetes_validate, sys; sys.exit(kubernetes_validate.__version__ != '$KUBERNETES_VALIDATE_VERSION')" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi
"$venv/bin/python" validate/validate-k8s.py k8s/*.yaml
"$venv/bin/python" validate/validate-k8s.py --context k8s/secret.yaml --expect-fail k8s/bad/*.yaml
