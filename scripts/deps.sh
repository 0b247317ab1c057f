#!/usr/bin/env bash
# System packages ArkNet needs, by purpose, installed with apt-get only when some are missing.
#
#   scripts/deps.sh build   what `cargo build` needs (BoringSSL: cmake, clang, libclang-dev)
#                           plus curl and python3 for the demo
#   scripts/deps.sh test    build + everything the test suite drives (nginx, avahi, WireGuard,
#                           Chromium, Node.js, Python venvs)
#   scripts/deps.sh bench   build + what `cargo bench --bench gateway` compares against and
#                           profiles with (nginx, wrk, perf); not needed by CI
#   scripts/deps.sh --list build|test|bench   print the package names (used by .ci/run)
#
# Quick and idempotent: when every package is already installed it runs no apt-get at all
# (no `apt-get update`, no root needed). Otherwise it runs apt-get as root, through sudo when
# not root. Debian/Ubuntu only; elsewhere it prints what to install.
set -euo pipefail

# cmake, clang, libclang-dev: BoringSSL (Pingora's TLS) and its bindgen. build-essential: the C
# toolchain and make. curl: the demo and humans following the README. python3, python3-venv:
# the demo's llama.cpp server and model come from PyPI into a venv.
build_pkgs=(build-essential cmake clang libclang-dev pkg-config curl ca-certificates
  python3 python3-venv python3-pip)
# nginx-light: the /arknet/ reverse-proxy test. iproute2: network namespaces (mesh/discovery
# tests). chromium, chromium-driver: the admin page's browser test. avahi-daemon, avahi-utils,
# dbus: mDNS interoperability. wireguard-go, wireguard-tools: WireGuard discovery (userspace
# tunnel, no kernel module). systemd: `systemd-analyze verify` of conf/arknet.service (only the
# tool is used; nothing is started). postgresql: the registry's PostgreSQL back-end test starts
# its own server (initdb/postgres as nobody in a temp dir). setpriv (util-linux) runs it as
# nobody. nodejs, npm: handled below.
test_pkgs=(nginx-light iproute2 chromium chromium-driver avahi-daemon avahi-utils dbus
  wireguard-go wireguard-tools systemd postgresql util-linux)
# nginx-light: the proxy the gateway bench compares against. wrk: the standard load generator the
# bench runs beside its own client. linux-perf: profiling arknet under that load (benches/README.md).
bench_pkgs=(nginx-light wrk linux-perf)

usage() { echo "usage: $0 [--list] build|test|bench" >&2; exit 64; }

list=false
if [ "${1:-}" = "--list" ]; then list=true; shift; fi
case "${1:-}" in
  build) pkgs=("${build_pkgs[@]}") ;;
  test) pkgs=("${build_pkgs[@]}" "${test_pkgs[@]}") ;;
  bench) pkgs=("${build_pkgs[@]}" "${bench_pkgs[@]}") ;;
  *) usage ;;
esac
# Node.js >= 18 with npm drives Chromium (playwright-core). Only when npm is absent, so that a
# newer Node.js already installed (e.g. from NodeSource, which ships its own npm) is left alone.
if [ "$1" = test ] && ! command -v npm >/dev/null 2>&1; then pkgs+=(nodejs npm); fi

if $list; then printf '%s\n' "${pkgs[@]}"; exit 0; fi

if ! command -v dpkg-query >/dev/null 2>&1; then
  echo "deps: not a Debian/Ubuntu system; install the equivalents of: ${pkgs[*]}" >&2
  exit 0
fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "==> system packages for '$1': all ${#pkgs[@]} installed"
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1; then
  sudo=(sudo)
else
  echo "deps: missing packages: ${missing[*]}" >&2
  echo "deps: not root and no sudo; as root run: apt-get update && apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "==> system packages for '$1': installing ${missing[*]} (apt-get${sudo:+ via sudo})"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "==> system packages for '$1': done"
