#!/usr/bin/env bash
# A Ray cluster of several nodes on this machine, for trying `kavg sweep submit`.
#
#   cluster/local.sh up        head + $KAVG_WORKERS worker nodes (token auth on)
#   cluster/local.sh status    `ray status` of that cluster
#   cluster/local.sh down      stop what `up` started, and nothing else
#
# Every node runs `ray start --block` in the background with one temp dir of its own
# ($KAVG_CLUSTER_DIR/ray); `down` sends SIGTERM to those `ray start` processes (they
# stop their node's processes) and then kills any process left whose command line names
# that temp dir. It never runs `ray stop`, which would stop every Ray on the machine.
#
# Settings (environment):
#   KAVG_CLUSTER_DIR     state: PIDs, logs, Ray temp dir  [/tmp/kavg-cluster-$UID]
#   KAVG_RAY_PORT        GCS port of the head               [6379]
#   KAVG_DASHBOARD_PORT  dashboard (and Jobs API) port      [8265]
#   KAVG_CLIENT_PORT     Ray Client server port (ray://)    [10001]
#   KAVG_PORT_BASE       node i uses ports BASE+10i ... BASE+10i+5 for its agents,
#                        metrics export (BASE+10i+3), node and object managers [52400]
#   KAVG_WORKERS         worker nodes besides the head      [1]
#   KAVG_NUM_CPUS        CPUs each node offers              [2]
#   RAY                  the ray command                    [ray]
#   PYTHON               a Python with Ray and kavg_ray     [python]
set -euo pipefail

STATE=${KAVG_CLUSTER_DIR:-/tmp/kavg-cluster-$(id -u)}
PORT=${KAVG_RAY_PORT:-6379}
DASH_PORT=${KAVG_DASHBOARD_PORT:-8265}
CLIENT_PORT=${KAVG_CLIENT_PORT:-10001}
BASE=${KAVG_PORT_BASE:-52400}
WORKERS=${KAVG_WORKERS:-1}
CPUS=${KAVG_NUM_CPUS:-2}
RAY=${RAY:-ray}
PYTHON=${PYTHON:-python}
TMP="$STATE/ray"

# Token authentication stays on: every node and driver of this cluster needs it.
export RAY_AUTH_MODE=token

node_ports() {  # the per-node ports of node $1 (0 = head)
    local b=$((BASE + 10 * $1))
    echo "--dashboard-agent-listen-port $b --dashboard-agent-grpc-port $((b + 1))" \
        "--runtime-env-agent-port $((b + 2)) --metrics-export-port $((b + 3))" \
        "--node-manager-port $((b + 4)) --object-manager-port $((b + 5))"
}

# Loopback only: Ray 2.60 turns a node IP or address of 127.0.0.1 into the machine's
# external address, and then listens on every interface. The head (and `ray status`)
# run in Ray's single-machine mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the macOS
# default), whose node IP is the loopback, and which the head's processes (dashboard,
# job drivers) inherit. A worker node, which that mode refuses to start, runs `ray start`
# through kavg_ray.launch.loopback, which keeps 127.0.0.1 as given. Ray binds its servers
# (GCS, raylets, agents, metrics exporters, Ray Client) to a local node IP: nothing of
# this cluster listens beyond the loopback.
start_node() {  # $1: index, rest: ray start arguments; the PID is in $NODE_PID
    local i=$1
    shift
    local -a cmd=(env RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 "$RAY")
    if ((i > 0)); then
        cmd=(env RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 "$PYTHON" -m kavg_ray.launch.loopback)
    fi
    # shellcheck disable=SC2046
    nohup "${cmd[@]}" start --block --temp-dir "$TMP" --num-cpus "$CPUS" \
        $(node_ports "$i") --disable-usage-stats "$@" >>"$STATE/node-$i.log" 2>&1 &
    NODE_PID=$!
    echo "$NODE_PID" >>"$STATE/pids"
}

# A busy machine can miss Ray's fixed 30 s for a new node to register: `ray start`
# then exits, and the node is started again (up to 3 times).
start_and_wait() {  # $1: index, $2: nodes expected alive afterwards, rest: ray start arguments
    local i=$1 want=$2 attempt
    shift 2
    for attempt in 1 2 3; do
        start_node "$i" "$@"
        if wait_nodes "$want" "${KAVG_UP_TIMEOUT:-180}" "$NODE_PID"; then
            return 0
        fi
        kill -TERM "$NODE_PID" 2>/dev/null || true
        echo "node $i did not come up (attempt $attempt); see $STATE/node-$i.log" >&2
    done
    return 1
}

alive_nodes() {  # nodes listed as Active by `ray status`
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 "$RAY" status --address "127.0.0.1:$PORT" 2>/dev/null \
        | awk '/^Active:/{a=1; next} /^(Pending|Recent failures):/{a=0} a && /node_/{n++}
               END{print n+0}'
}

wait_nodes() {  # until $1 nodes are alive; fail after $2 s or when PID $3 has exited
    local want=$1 deadline=$((SECONDS + $2)) pid=$3 n=0
    while ((SECONDS < deadline)); do
        n=$(alive_nodes || true)
        n=${n:-0}
        if ((n >= want)); then
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            return 1
        fi
        sleep 2
    done
    echo "error: $n of $want nodes alive after $2 s; logs: $STATE/node-*.log" >&2
    return 1
}

up() {
    if [[ -s "$STATE/pids" ]]; then
        echo "error: a cluster from $STATE is up already (cluster/local.sh down first)" >&2
        exit 1
    fi
    mkdir -p "$STATE"
    : >"$STATE/pids"
    # The head makes a token in ~/.ray/auth_token unless one is there ($RAY_AUTH_TOKEN wins).
    if [[ -z "${RAY_AUTH_TOKEN:-}" ]]; then
        "$RAY" get-auth-token --generate >/dev/null
    fi
    start_and_wait 0 1 --head --node-ip-address 127.0.0.1 --port "$PORT" \
        --dashboard-host 127.0.0.1 \
        --dashboard-port "$DASH_PORT" --ray-client-server-port "$CLIENT_PORT" || {
        down
        exit 1
    }
    for ((i = 1; i <= WORKERS; i++)); do
        start_and_wait "$i" $((i + 1)) --address "127.0.0.1:$PORT" || {
            down
            exit 1
        }
    done
    echo "cluster up: $((WORKERS + 1)) nodes, GCS 127.0.0.1:$PORT"
    echo "dashboard:  http://127.0.0.1:$DASH_PORT (token: ray get-auth-token)"
    echo "submit:     kavg sweep submit SPEC.yaml --address http://127.0.0.1:$DASH_PORT"
}

our_pids() {  # processes whose command line names our temp dir (not this script)
    ps -eo pid=,args= | grep -F -- "$TMP" | grep -v -e "local.sh" -e "grep -F" \
        | awk '{print $1}' || true
}

# `ray start --block` exits on SIGTERM without stopping its node's processes, so `down`
# sends SIGTERM to those too (raylets, GCS, dashboard: all name the temp dir) and
# returns as soon as none is left; what is still there after KAVG_DOWN_TIMEOUT is killed.
down() {
    if [[ -f "$STATE/pids" ]]; then
        while read -r pid; do
            [[ -n "$pid" ]] && kill -TERM "$pid" 2>/dev/null || true
        done <"$STATE/pids"
    fi
    local deadline=$((SECONDS + ${KAVG_DOWN_TIMEOUT:-30})) left
    left=$(our_pids)
    if [[ -n "$left" ]]; then
        # shellcheck disable=SC2086
        kill -TERM $left 2>/dev/null || true
    fi
    while ((SECONDS < deadline)); do
        left=$(our_pids)
        [[ -z "$left" ]] && break
        sleep 0.2
    done
    left=$(our_pids)
    if [[ -n "$left" ]]; then
        # shellcheck disable=SC2086
        kill -KILL $left 2>/dev/null || true
    fi
    if [[ -f "$STATE/pids" ]]; then
        while read -r pid; do
            [[ -n "$pid" ]] && kill -KILL "$pid" 2>/dev/null || true
        done <"$STATE/pids"
        rm -f "$STATE/pids"
    fi
    echo "cluster down ($STATE)"
}

status() {
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 "$RAY" status --address "127.0.0.1:$PORT"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *)
        echo "usage: $0 up|down|status" >&2
        exit 2
        ;;
esac
