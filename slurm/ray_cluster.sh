#!/usr/bin/env bash
# Ray on Slurm for plain sbatch scripts: a head on the allocation's first node, one worker
# per other node (srun), stopped when the script exits. Python code can do the same with
# `cpt.cluster.ray_cluster()`.
#
#   source slurm/ray_cluster.sh
#   ray_cluster_start            # exports RAY_ADDRESS=<head ip>:<port>
#   python jobs/launch.py stage=generate cluster=local parallel.address=auto ...
#   (ray_cluster_stop runs at exit by itself)
#
# Settings (environment): RAY_PORT (default: a free port), RAY_NUM_CPUS (default
# SLURM_CPUS_ON_NODE), RAY_NUM_GPUS (default: the GPUs Slurm gave this node),
# RAY_START_TIMEOUT (seconds, default 180), RAY_BIN (default: `ray` on PATH).
#
# Authentication: unless RAY_AUTH_MODE is set, the cluster uses Ray's token authentication
# (RAY_AUTH_MODE=token) with a fresh random RAY_AUTH_TOKEN, exported to this script's
# processes and to the workers through srun's environment, and written nowhere: anyone on
# the network who can reach the head's port can otherwise run code as you. Set
# RAY_AUTH_MODE=disabled only on a trusted network (the CI does, on one node).
#
# The cluster is stopped by sending SIGTERM to the `ray start --block` processes this
# script started, not with `ray stop`: `ray stop` kills every Ray process of the user on
# the node, including other jobs' clusters on a shared node.

_ray_log() { echo "[ray_cluster.sh $(date +%H:%M:%S)] $*" >&2; }

ray_cluster_start() {
  local ray_bin="${RAY_BIN:-ray}"
  local nodes head ip port n_nodes num_cpus num_gpus deadline
  if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
    mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  else
    nodes=("$(hostname -s)")
  fi
  n_nodes=${#nodes[@]}
  head=${nodes[0]}
  if [ "$n_nodes" -eq 1 ]; then
    ip=127.0.0.1
  else
    ip=$(getent ahostsv4 "$head" | awk 'NR==1 {print $1}')
    ip=${ip:-$(hostname --ip-address | awk '{print $1}')}
  fi
  port=${RAY_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
  num_cpus=${RAY_NUM_CPUS:-${SLURM_CPUS_ON_NODE:-$(nproc)}}
  if [ -n "${RAY_NUM_GPUS:-}" ]; then
    num_gpus=$RAY_NUM_GPUS
  elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    num_gpus=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
  else
    num_gpus=0
  fi
  if [ -z "${RAY_AUTH_MODE:-}" ]; then
    export RAY_AUTH_MODE=token
    RAY_AUTH_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(32))') || return 1
    export RAY_AUTH_TOKEN
  elif [ "$RAY_AUTH_MODE" = disabled ] && [ "$n_nodes" -gt 1 ]; then
    _ray_log "warning: RAY_AUTH_MODE=disabled: the head accepts anyone who reaches $ip:$port"
  fi
  # the whole cluster stops at once: no point draining a node (up to 30 s) on SIGTERM
  export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}
  RAY_CLUSTER_TMP="/tmp/ray-cpt-${SLURM_JOB_ID:-$$}"
  _ray_log "head on $head ($ip:$port), $n_nodes node(s), $num_cpus CPUs and $num_gpus GPUs per node"
  "$ray_bin" start --head --block --node-ip-address="$ip" --port="$port" \
    --temp-dir="$RAY_CLUSTER_TMP" --include-dashboard=false --disable-usage-stats \
    --num-cpus="$num_cpus" --num-gpus="$num_gpus" &
  RAY_HEAD_PID=$!
  deadline=$(( $(date +%s) + ${RAY_START_TIMEOUT:-180} ))
  until (exec 3<>"/dev/tcp/$ip/$port") 2>/dev/null; do
    if ! kill -0 "$RAY_HEAD_PID" 2>/dev/null; then _ray_log "ray head exited"; return 1; fi
    if [ "$(date +%s)" -gt "$deadline" ]; then _ray_log "ray head did not start"; return 1; fi
    sleep 0.5
  done
  RAY_WORKERS_PID=
  if [ "$n_nodes" -gt 1 ]; then
    srun --nodes=$((n_nodes - 1)) --ntasks-per-node=1 --exclude="$head" --overlap \
      "$ray_bin" start --address="$ip:$port" --block --disable-usage-stats \
      --num-cpus="$num_cpus" --num-gpus="$num_gpus" &
    RAY_WORKERS_PID=$!
    until [ "$(RAY_ADDRESS="$ip:$port" python -c 'import ray; ray.init(log_to_driver=False); print(sum(n["Alive"] for n in ray.nodes()))' 2>/dev/null)" = "$n_nodes" ]; do
      if [ "$(date +%s)" -gt "$deadline" ]; then _ray_log "not all $n_nodes nodes joined"; return 1; fi
      sleep 2
    done
  fi
  export RAY_ADDRESS="$ip:$port"
  trap ray_cluster_stop EXIT
  _ray_log "ray cluster up at $RAY_ADDRESS"
}

ray_cluster_stop() {
  local pid
  for pid in ${RAY_WORKERS_PID:-} ${RAY_HEAD_PID:-}; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in ${RAY_WORKERS_PID:-} ${RAY_HEAD_PID:-}; do
    wait "$pid" 2>/dev/null || true
  done
  RAY_WORKERS_PID= RAY_HEAD_PID=
  unset RAY_ADDRESS
  _ray_log "ray cluster stopped"
}
