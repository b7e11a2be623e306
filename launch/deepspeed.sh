#!/usr/bin/env bash
# Launch `marscale train` with the DeepSpeed launcher, on one node or several.
#
#   launch/deepspeed.sh CONFIG [marscale train arguments...]
#
# One node, all its GPUs (or GPUS=4 for four):
#   launch/deepspeed.sh configs/mar_vit_l_k400.yaml --set run.name=vitl
# Several nodes with passwordless ssh: a hostfile ("host slots=8" per line), run on one node:
#   HOSTFILE=hosts.txt launch/deepspeed.sh configs/mar_vit_l_k400.yaml
# Several nodes *without* ssh: run the same command on every node with its NODE_RANK:
#   NO_SSH=1 HOSTFILE=hosts.txt NODE_RANK=0 MASTER_ADDR=node0 launch/deepspeed.sh CONFIG   # on node0
#   NO_SSH=1 HOSTFILE=hosts.txt NODE_RANK=1 MASTER_ADDR=node0 launch/deepspeed.sh CONFIG   # on node1
# On a CPU-only machine (gloo), GPUS=2 starts two CPU processes.
# Exit status 75 means a pre-emption signal stopped the run after saving a checkpoint:
# start it again with --resume auto.
set -euo pipefail
if [[ $# -lt 1 ]]; then
    sed -n '2,17p' "$0"; exit 2
fi
config=$1; shift
args=(--no_local_rank --master_port "${MASTER_PORT:-29500}")
[[ -n "${GPUS:-}" ]] && args+=(--num_gpus "$GPUS")
[[ -n "${HOSTFILE:-}" ]] && args+=(--hostfile "$HOSTFILE")
[[ -n "${MASTER_ADDR:-}" ]] && args+=(--master_addr "$MASTER_ADDR")
if [[ -n "${NO_SSH:-}" ]]; then
    : "${HOSTFILE:?NO_SSH needs HOSTFILE (the nodes and their slots)}"
    : "${NODE_RANK:?NO_SSH needs NODE_RANK (the index of this node in HOSTFILE)}"
    args+=(--no_ssh --node_rank "$NODE_RANK")
fi
exec deepspeed "${args[@]}" --module marscale.cli train --config "$config" "$@"
