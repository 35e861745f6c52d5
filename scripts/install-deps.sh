#!/usr/bin/env bash
# Installs, idempotently, the Debian 12 packages the project and its tests need.
#   scripts/install-deps.sh          everything (libtpms, OpenSSL, swtpm, QEMU, tpm2-tools)
#   scripts/install-deps.sh build    only what building needs (libtpms-dev, libssl-dev, pkg-config)
set -euo pipefail

build_pkgs=(libtpms-dev libssl-dev pkg-config)
test_pkgs=(swtpm swtpm-tools qemu-system-x86 tpm2-tools)

want=("${build_pkgs[@]}")
[ "${1:-all}" = "build" ] || want+=("${test_pkgs[@]}")

missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "install-deps: installing ${missing[*]}" >&2
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
