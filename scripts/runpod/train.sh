#!/usr/bin/env bash
# Run on every node of a runpod Instant Cluster, from the repository root:
#   scripts/runpod/train.sh CONFIG [key=value overrides] [multitune launch flags]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

venv="${MULTITUNE_VENV:-$HOME/.venvs/multitune}"
[[ -x "$venv/bin/multitune" ]] || bash scripts/runpod/setup.sh
export PATH="$venv/bin:$PATH"

# SSH sessions do not inherit the container's environment; the cluster variables are on PID 1.
if [[ -z "${PRIMARY_ADDR:-}" && -r /proc/1/environ ]]; then
  while IFS= read -r -d '' pair; do
    case "${pair%%=*}" in
      PRIMARY_ADDR | PRIMARY_PORT | NODE_RANK | NUM_NODES | NUM_TRAINERS) export "$pair" ;;
    esac
  done </proc/1/environ
fi
# PRIMARY_ADDR is on ens1, the cluster network; eth0 is the slow management interface.
if [[ -z "${NCCL_SOCKET_IFNAME:-}" && -e /sys/class/net/ens1 ]]; then
  export NCCL_SOCKET_IFNAME=ens1
fi
[[ -n "${HF_TOKEN:-}" ]] || echo "warning: HF_TOKEN is not set; gated models will not download" >&2

exec multitune launch "$@"
