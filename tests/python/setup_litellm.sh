#!/usr/bin/env bash
# Creates the venv with the real LiteLLM proxy (`litellm[proxy]`) for tests/litellm.rs, from the
# fully pinned, wheels-only list in litellm-requirements.txt. Kept apart from tests/python/setup.sh's
# venv: LiteLLM pulls in ~100 packages whose pins must not move the official-client tests.
#
# Idempotent and quick once done: a marker file records what was installed.
# The venv lives at $LITELLM_VENV, else ${CARGO_TARGET_DIR:-<repo>/target}/litellm-venv.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${LITELLM_VENV:-${CARGO_TARGET_DIR:-$root/target}/litellm-venv}"
python="${PYTHON3:-python3}"
reqs="$here/litellm-requirements.txt"

marker="$venv/.arknet-litellm-setup-done"
want="$(cat "$reqs")"
if [ -x "$venv/bin/litellm" ] && [ -f "$marker" ] && [ "$(cat "$marker")" = "$want" ]; then
  exit 0
fi

if ! command -v "$python" >/dev/null 2>&1; then
  echo "setup_litellm.sh: $python not found; on Debian: apt-get install python3 python3-venv python3-pip" >&2
  exit 1
fi

if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
  echo "setup_litellm.sh: creating venv $venv" >&2
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  if ! "$python" -m venv "$venv" >"$venv.log" 2>&1; then
    cat "$venv.log" >&2
    rm -rf "$venv" "$venv.log"
    echo "setup_litellm.sh: '$python -m venv' failed. On Debian/Ubuntu install the venv module:" >&2
    echo "    apt-get install python3-venv" >&2
    exit 1
  fi
  rm -f "$venv.log"
fi

# A changed pin list starts from what is there; pip upgrades or downgrades to the pins.
rm -f "$marker"
echo "setup_litellm.sh: installing litellm[proxy] (pinned, wheels only) into $venv" >&2
started=$SECONDS
if ! "$venv/bin/python" -m pip --disable-pip-version-check --no-input -q \
  install --only-binary=:all: -r "$reqs"; then
  echo "setup_litellm.sh: pip install -r $reqs failed (needs PyPI on first run; every pin must" >&2
  echo "have a wheel for $("$venv/bin/python" -c 'import sys;print(sys.version.split()[0])'))" >&2
  exit 1
fi

# Check that what the test uses is really there before writing the marker: the proxy's own
# entry point and module, and the official openai client it depends on (the test drives
# LiteLLM with it).
test -x "$venv/bin/litellm" || { echo "setup_litellm.sh: litellm missing in $venv/bin" >&2; exit 1; }
LITELLM_LOCAL_MODEL_COST_MAP=True "$venv/bin/python" -c 'import litellm.proxy.proxy_server, openai' ||
  { echo "setup_litellm.sh: litellm's proxy or the openai client does not import" >&2; exit 1; }

printf '%s' "$want" >"$marker"
echo "setup_litellm.sh: done in $((SECONDS - started)) s" >&2
