#!/usr/bin/env bash
# `make install` (as root): an ArkNet node as a systemd service.
#
#   make release                 # as yourself: target/dist/arknet (+ arknet.debug)
#   sudo make install            # this script
#   sudo scripts/install.sh --uninstall   # removes binary, unit and user; keeps config and data
#
# What it does, each step idempotent:
#   - system user and group `arknet` (no login; home = the data dir)
#   - $PREFIX/bin/arknet (debug info split off, scripts/release.sh) and its debug file
#     /usr/lib/debug$PREFIX/bin/arknet.debug, where Rust backtraces and gdb look for it
#   - $SYSCONFDIR/arknet/arknet.toml from conf/arknet.toml, only when absent: your edits survive
#     a re-install (root:arknet 0640; mDNS is on in it, as a LAN node wants)
#   - the data dir, arknet:arknet 0750 (identity key, admin token, approvals, audit log)
#   - $UNITDIR/arknet.service from conf/arknet.service with these paths and user
#   - when systemd runs this machine: daemon-reload, enable --now (skip with NO_START=1)
#
# Environment (defaults): BIN (target/dist/arknet split from target/release/arknet, which must
# be built), PREFIX (/usr/local), SYSCONFDIR (/etc), DATA_DIR (/opt/ark/data/arknet), UNITDIR
# (/etc/systemd/system), DEBUGDIR (/usr/lib/debug), ARKNET_USER (arknet), NO_START.
set -euo pipefail
cd "$(dirname "$0")/.."

prefix=${PREFIX:-/usr/local}
sysconfdir=${SYSCONFDIR:-/etc}
data_dir=${DATA_DIR:-/opt/ark/data/arknet}
unitdir=${UNITDIR:-/etc/systemd/system}
debugdir=${DEBUGDIR:-/usr/lib/debug}
user=${ARKNET_USER:-arknet}
bin_path=$prefix/bin/arknet
debug_path=$debugdir$prefix/bin/arknet.debug
config=$sysconfdir/arknet/arknet.toml
unit=$unitdir/arknet.service
systemd_up() { [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; }

if [ "$(id -u)" -ne 0 ]; then
  echo "install: run as root (sudo $0): it creates a system user and writes $prefix, $sysconfdir, $unitdir" >&2
  exit 1
fi

if [ "${1:-}" = "--uninstall" ]; then
  if systemd_up && [ -z "${NO_START:-}" ]; then
    systemctl disable --now arknet.service 2>/dev/null || true
  fi
  rm -f "$bin_path" "$debug_path" "$unit"
  if systemd_up && [ -z "${NO_START:-}" ]; then systemctl daemon-reload; fi
  if id "$user" >/dev/null 2>&1; then userdel "$user"; fi
  echo "==> removed $bin_path, $debug_path, $unit and user $user; kept $config and $data_dir"
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ -n "${BIN:-}" ]; then
  DIST=$tmp BIN=$BIN scripts/release.sh
else
  if [ ! -x target/release/arknet ]; then
    echo "install: target/release/arknet is missing; build it first, as yourself: make release" >&2
    exit 1
  fi
  DIST=$tmp BIN=target/release/arknet scripts/release.sh
fi

if id "$user" >/dev/null 2>&1; then
  echo "==> user $user exists"
else
  echo "==> creating system user $user"
  useradd --system --user-group --no-create-home --home-dir "$data_dir" --shell /usr/sbin/nologin "$user"
fi

echo "==> $bin_path ($("$tmp/arknet" --version)), debug info $debug_path"
install -d -m 0755 "$prefix/bin" "$(dirname "$debug_path")"
install -m 0755 "$tmp/arknet" "$bin_path"
install -m 0644 "$tmp/arknet.debug" "$debug_path"

install -d -m 0755 "$sysconfdir/arknet"
if [ -e "$config" ]; then
  echo "==> $config exists: kept (compare with conf/arknet.toml after an upgrade)"
else
  echo "==> $config (from conf/arknet.toml; edit it, then: systemctl restart arknet)"
  install -m 0640 -o root -g "$user" conf/arknet.toml "$config"
fi
if ! "$bin_path" serve --check --config "$config"; then
  echo "install: $config is not valid; fix it before starting the service" >&2
  exit 64
fi

echo "==> data dir $data_dir ($user, 0750)"
install -d -m 0750 -o "$user" -g "$user" "$data_dir"

echo "==> $unit"
install -d -m 0755 "$unitdir"
sed -e "s#/usr/local/bin/arknet#$bin_path#g" \
  -e "s#/etc/arknet/arknet.toml#$config#g" \
  -e "s#/opt/ark/data/arknet#$data_dir#g" \
  -e "s#^User=arknet\$#User=$user#" -e "s#^Group=arknet\$#Group=$user#" \
  -e "s#-o arknet -g arknet#-o $user -g $user#" \
  conf/arknet.service >"$tmp/arknet.service"
install -m 0644 "$tmp/arknet.service" "$unit"
if command -v systemd-analyze >/dev/null 2>&1; then
  systemd-analyze verify "$unit"
  echo "    systemd-analyze verify: ok; $(systemd-analyze security --offline=yes "$unit" 2>/dev/null | tail -n 1)"
fi

if [ -n "${NO_START:-}" ]; then
  echo "==> installed; not started (NO_START). Start with: systemctl enable --now arknet"
elif systemd_up; then
  systemctl daemon-reload
  systemctl enable --now arknet.service
  echo "==> started: systemctl status arknet; journalctl -u arknet; $bin_path doctor --config $config --data-dir $data_dir"
else
  echo "==> installed; systemd is not running here, so nothing was started. As the service would:"
  echo "    setpriv --reuid=$user --regid=$user --init-groups -- $bin_path serve --config $config --data-dir $data_dir"
fi
