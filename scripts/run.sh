#!/usr/bin/env bash
# `make run`: installs the build packages if missing, builds the release binary, reports what
# the node will find (`arknet doctor`), then runs the node in the foreground until Ctrl-C.
#
#   scripts/run.sh [serve options...]     e.g. --no-mdns, --backend http://127.0.0.1:18081
#   scripts/run.sh --doctor-only [...]    only the report (`make doctor`)
#
# The node reads conf/arknet.toml (data in ./data, API on 127.0.0.1:8910, a local Ollama at
# 127.0.0.1:11434) and needs no root. That file turns mDNS on, as a node on a home LAN wants:
# it advertises itself there so neighbours can find it. Pass --no-mdns to stay silent on the
# network (tests, CI and benchmarks never use this script without it).
set -euo pipefail
cd "$(dirname "$0")/.."

doctor_only=false
if [ "${1:-}" = "--doctor-only" ]; then doctor_only=true; shift; fi

scripts/deps.sh build
echo "==> cargo build --release (the first build takes about 10 minutes on 2 cores; later ones seconds)"
cargo build --release --locked
bin=target/release/arknet
echo "==> $("$bin" --version)"

echo "==> arknet doctor $*"
status=0
"$bin" doctor "$@" || status=$?
if $doctor_only; then exit "$status"; fi
# Problems such as "no backend yet" are worth reading, not a reason to refuse to start: the
# node serves its peers' models and picks a backend up as soon as it answers.
if [ "$status" -ne 0 ]; then
  echo "    starting anyway. No model server yet? 'make demo' shows a grid with a real small model."
fi

mdns=on
for a in "$@"; do [ "$a" = "--no-mdns" ] && mdns=off; done
echo "==> arknet serve $*   (Ctrl-C stops it)"
if [ "$mdns" = on ]; then
  echo "    mDNS is on (conf/arknet.toml): the node advertises itself on your LAN. To stay silent: make run ARGS=--no-mdns"
fi
echo "    admin page and API: http://127.0.0.1:8910/ (or the --listen address)"
exec "$bin" serve "$@"
