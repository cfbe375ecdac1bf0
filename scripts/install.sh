#!/usr/bin/env bash
# Install everything rrcm and its test suite use, on Debian or Ubuntu:
#   system packages: the Fashion-MNIST data, a C++ compiler, CMake and the Boost.Math headers (the C++
#   certifier), python3-venv where venv is missing: as root, or through sudo; otherwise it prints the
#   exact command to run and stops;
#   .venv: torch 2.13.0 (CPU build) first and pinned, then this package with its onnx, gpu (Triton), int8
#   (torchao) and test extras. It reinstalls only when pyproject.toml changed since the last install.
# The Quick start (scripts/quickstart.sh) and CI (.ci/run) both install through this script.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(dataset-fashion-mnist g++ cmake libboost-math-dev)
python3 -c "import ensurepip" 2>/dev/null || packages+=(python3-venv)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    command="apt-get update && apt-get install -y ${missing[*]}"
    if [ "$(id -u)" -eq 0 ]; then
        sudo=""
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        sudo="sudo"
    else
        echo "rrcm install: missing system packages: ${missing[*]}. Run as root, then this script again:" >&2
        echo "    sudo sh -c '$command'" >&2
        exit 2
    fi
    echo "rrcm install: apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

stamp=.venv/.rrcm-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -x .venv/bin/rrcm ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    exit 0
fi
echo "rrcm install: .venv (torch 2.13.0 CPU, then rrcm with its onnx, gpu, int8 and test extras)"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch pulls the multi-GB CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[onnx,gpu,int8,test]"
echo "$want" > "$stamp"
