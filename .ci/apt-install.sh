#!/usr/bin/env bash
# Installs Debian packages for CI: `bash .ci/apt-install.sh WHO PACKAGE...` (WHO names the caller in messages).
# Root runs apt-get itself; CI runners that are not root have passwordless sudo.
set -euo pipefail

who=$1
shift
if ! command -v apt-get >/dev/null 2>&1; then
  echo "$who: no apt-get here; install Debian's $* yourself" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" != "0" ]; then
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update
$sudo apt-get install -y "$@"
