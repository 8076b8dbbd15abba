#!/usr/bin/env bash
# Fashion-MNIST for the accuracy-floor test (tests/training/test_recipes.py): Debian's dataset-fashion-mnist, under CI only
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
bash "$(dirname "$0")/apt-install.sh" datasets.sh dataset-fashion-mnist
ls "$dir"
