#!/usr/bin/env bash
# Entrypoint of the multitune image (docker/Dockerfile) on a runpod pod or Instant Cluster node.
#   start.sh                        no arguments: print the environment check and stay up (so
#                                   the web terminal / SSH can be used), as runpod pods expect
#   start.sh CONFIG [overrides] [multitune launch flags]
#                                   train: runpod's cluster variables become the torchrun
#                                   command (`multitune launch`), one worker per GPU
# Caches and outputs go to the network volume (/workspace) so a restarted pod finds them;
# secrets come from the environment (runpod "secrets": HF_TOKEN, WANDB_API_KEY).
set -euo pipefail

volume="${MULTITUNE_VOLUME:-/workspace}"
if [[ -d "$volume" ]]; then
  export HF_HOME="${HF_HOME:-$volume/hf-cache}"
  export WANDB_DIR="${WANDB_DIR:-$volume/wandb}"
  export MULTITUNE_EXTENSION_DIR="${MULTITUNE_EXTENSION_DIR:-$volume/torch-extensions}"
  mkdir -p "$HF_HOME" "$WANDB_DIR" "$MULTITUNE_EXTENSION_DIR"
fi

# SSH sessions do not inherit the container's environment; the cluster variables are on PID 1.
# (Unreadable in some sandboxes even when -r says otherwise: then skipped.)
if [[ -z "${PRIMARY_ADDR:-}" && -r /proc/1/environ ]]; then
  { while IFS= read -r -d '' pair; do
      case "${pair%%=*}" in
        PRIMARY_ADDR | PRIMARY_PORT | NODE_RANK | NUM_NODES | NUM_TRAINERS) export "$pair" ;;
      esac
    done </proc/1/environ; } 2>/dev/null || true
fi
# PRIMARY_ADDR is on ens1, the cluster network; eth0 is the slow management interface.
if [[ -z "${NCCL_SOCKET_IFNAME:-}" && -e /sys/class/net/ens1 ]]; then
  export NCCL_SOCKET_IFNAME=ens1
fi

[[ -n "${HF_TOKEN:-}" ]] || echo "start.sh: HF_TOKEN is not set; gated models (Llama) and hub.push will fail" >&2
[[ -n "${WANDB_API_KEY:-}" ]] || echo "start.sh: WANDB_API_KEY is not set; a config with tracking.wandb.mode=online will stop before training" >&2

if [[ $# -eq 0 ]]; then
  echo "start.sh: HF_HOME=${HF_HOME:-unset} node ${NODE_RANK:-0}/${NUM_NODES:-1} primary ${PRIMARY_ADDR:-none}"
  echo "start.sh: no config given; waiting. Train with: scripts/runpod/start.sh CONFIG [overrides]"
  exec sleep infinity
fi
exec multitune launch "$@"
