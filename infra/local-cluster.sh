#!/usr/bin/env bash
# A two-node Ray cluster on one machine (what tests/cluster.py does for the tests): a head and a second
# node, token authentication with a token of this cluster only, every process marked so that `stop`
# ends exactly this cluster and no other Ray of the user (unlike `ray stop`).
#
#   infra/local-cluster.sh start [HEAD_CPUS [NODE_CPUS]]   # default 1 and 1; NODE_CPUS=0: head only
#   source <(infra/local-cluster.sh env)                   # RAY_ADDRESS, RAY_API_SERVER_ADDRESS, auth
#   ray job submit --working-dir . -- multitalent train jobs/pretrain_cpu_tiny.yaml --set ...
#   infra/local-cluster.sh status | stop
#
# State lives in $MT_LOCAL_CLUSTER_DIR (default /tmp/mt-local-cluster; keep it short: Ray puts Unix
# sockets under it). Ports: GCS $MT_GCS_PORT (6390), dashboard / jobs API $MT_DASHBOARD_PORT (8266).
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
bin="${MT_VENV_BIN:-$repo/.venv/bin}"
dir="${MT_LOCAL_CLUSTER_DIR:-/tmp/mt-local-cluster}"
gcs_port="${MT_GCS_PORT:-6390}"
dash_port="${MT_DASHBOARD_PORT:-8266}"
marker=MULTITALENT_LOCAL_CLUSTER

free_port() { "$bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

cluster_env() {
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$dir/auth_token" RAY_USAGE_STATS_ENABLED=0
    export PATH="$bin:$PATH" DS_ACCELERATOR=cpu PYTHONUNBUFFERED=1
    export "$marker=$dir"
    unset RAY_ADDRESS
}

# PIDs of every process carrying this cluster's marker (daemons, workers, job drivers in their own sessions).
cluster_pids() {
    local env_file pid
    for env_file in /proc/[0-9]*/environ; do
        pid="${env_file#/proc/}"; pid="${pid%/environ}"
        [[ "$pid" == "$$" || "$pid" == "$BASHPID" ]] && continue
        if { tr '\0' '\n' < "$env_file"; } 2>/dev/null | grep -qxF "$marker=$dir"; then echo "$pid"; fi
    done
}

start_node() {  # ray start ARGS in a session of its own; its daemons keep that process group
    setsid "$bin/ray" start "$@" --disable-usage-stats --num-gpus 0 \
        --dashboard-agent-listen-port "$(free_port)" >> "$dir/start.log" 2>&1 &
    local pid=$!
    wait "$pid" || { echo "ray start $* failed; see $dir/start.log" >&2; exit 1; }
}

cmd="${1:-}"
case "$cmd" in
start)
    head_cpus="${2:-1}"; node_cpus="${3:-1}"
    if [[ -n "$(cluster_pids)" ]]; then echo "already running (infra/local-cluster.sh stop first)" >&2; exit 1; fi
    rm -rf "$dir"; mkdir -p "$dir"
    (umask 077; "$bin/python" -c 'import secrets; print(secrets.token_hex(32))' > "$dir/auth_token")
    cluster_env
    start_node --head --port "$gcs_port" --dashboard-host 127.0.0.1 --dashboard-port "$dash_port" \
        --ray-client-server-port "$(free_port)" --temp-dir "$dir" --num-cpus "$head_cpus"
    if [[ "$node_cpus" -gt 0 ]]; then
        start_node --address "127.0.0.1:$gcs_port" --num-cpus "$node_cpus"
    fi
    want=$(( node_cpus > 0 ? 2 : 1 ))
    for _ in $(seq 120); do
        alive=$("$bin/ray" list nodes --address "http://127.0.0.1:$dash_port" --filter state=ALIVE 2>/dev/null \
            | grep -c ALIVE || true)
        [[ "$alive" -ge "$want" ]] && break
        sleep 1
    done
    echo "$want node(s) up: GCS 127.0.0.1:$gcs_port, jobs API http://127.0.0.1:$dash_port (logs: $dir)"
    ;;
env)
    echo "export RAY_ADDRESS=127.0.0.1:$gcs_port RAY_API_SERVER_ADDRESS=http://127.0.0.1:$dash_port"
    echo "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$dir/auth_token PATH=$bin:\$PATH"
    ;;
status)
    cluster_env
    "$bin/ray" status --address "127.0.0.1:$gcs_port"
    ;;
stop)
    for sig in TERM KILL; do
        pids=$(cluster_pids)
        [[ -z "$pids" ]] && break
        # shellcheck disable=SC2086
        kill -s "$sig" $pids 2>/dev/null || true
        for _ in $(seq 10); do [[ -z "$(cluster_pids)" ]] && break; sleep 0.5; done
    done
    rm -rf "$dir"
    echo "stopped"
    ;;
*)
    sed -n '2,13p' "$0" >&2
    exit 2
    ;;
esac
