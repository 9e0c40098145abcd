#!/usr/bin/env bash
# Installs the Debian packages moai-finetune needs, only those that are missing. (The tokenizer
# reference test also wants npm, which comes with nodejs from nodesource or as Debian's npm;
# without it that test skips and says so.)
# A no-op (one dpkg-query call) when everything is present; uses sudo when not root.
set -euo pipefail

pkgs=(
    build-essential pkg-config clang clang-format
    libyaml-dev libjansson-dev libopenblas-dev
    libsentencepiece-dev sentencepiece libpcre2-dev
    libzstd-dev zstd libcmocka-dev
    libopenmpi-dev openmpi-bin
    groff-base mandoc python3
    jq nodejs
)

missing=()
for p in "${pkgs[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "install-deps: installing ${missing[*]}" >&2
sudo=
[ "$(id -u)" -eq 0 ] || sudo=sudo
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
