#!/usr/bin/env bash
# The headless browser for the demo's end-to-end test (tests/demo/test_app.py::test_app_in_headless_chromium).
# Only under CI (CI=true), where that test must run; installs Debian's chromium + chromium-driver if missing.
set -euo pipefail

if [ "${CI:-}" != "true" ]; then
  echo "browser.sh: CI is not 'true'; not installing anything (the browser test skips without chromium)"
  exit 0
fi
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  echo "browser.sh: $(chromium --version 2>/dev/null | head -n1) and chromedriver already installed"
  exit 0
fi
bash "$(dirname "$0")/apt-install.sh" browser.sh chromium chromium-driver
chromium --version 2>/dev/null | head -n1
chromedriver --version
