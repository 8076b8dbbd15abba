#!/usr/bin/env bash
# Fashion-MNIST for the accuracy-floor test (tests/test_recipes.py): Debian's dataset-fashion-mnist, under CI only
# (CI=true), where that test must run; elsewhere it skips when the package is missing.
set -euo pipefail

dir=/usr/share/datasets/fashion-mnist
if [ "${CI:-}" != "true" ]; then
  echo "datasets.sh: CI is not 'true'; not installing anything"
  exit 0
fi
if [ -f "$dir/t10k-labels-idx1-ubyte.gz" ]; then
  echo "datasets.sh: Fashion-MNIST already in $dir"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "datasets.sh: no apt-get here; install Debian's dataset-fashion-mnist (or its four files in $dir)" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" != "0" ]; then
  sudo="sudo"  # CI runners that are not root have passwordless sudo
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update
$sudo apt-get install -y dataset-fashion-mnist
ls "$dir"
