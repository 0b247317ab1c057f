#!/usr/bin/env bash
# `make release`: the binary to install, a reasonable size for a daemon, and its debug info
# beside it:
#   target/dist/arknet         symbols kept (backtraces name every function), no DWARF
#   target/dist/arknet.debug   the DWARF (file:line), found through the binary's .gnu_debuglink
#                              when installed as /usr/lib/debug<bindir>/arknet.debug (or next
#                              to the binary, or in <bindir>/.debug/), by Rust backtraces and gdb
#
# Environment: BIN (default: cargo build --release, target/release/arknet), DIST (target/dist).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${BIN:-}" ]; then
  scripts/deps.sh build
  echo "==> cargo build --release (the first build takes about 10 minutes on 2 cores)"
  cargo build --release --locked
  BIN=target/release/arknet
fi
dist=${DIST:-target/dist}
mkdir -p "$dist"
# The release profile keeps line tables (Cargo.toml); BoringSSL's C code adds full DWARF.
# Splitting rather than stripping keeps all of it for whoever debugs a crash.
# --add-gnu-debuglink records the basename (arknet.debug) and the file's CRC.
objcopy --only-keep-debug "$BIN" "$dist/arknet.debug"
chmod 0644 "$dist/arknet.debug"
objcopy --strip-debug --add-gnu-debuglink="$dist/arknet.debug" "$BIN" "$dist/arknet"
size() { du -h "$1" | cut -f1; }
echo "==> $dist/arknet ($(size "$dist/arknet")), debug info in $dist/arknet.debug ($(size "$dist/arknet.debug")); built from $BIN ($(size "$BIN"))"
