#!/usr/bin/env bash
# Launch `marscale train` with the DeepSpeed launcher, on one node or several.
#
#   launch/deepspeed.sh CONFIG [marscale train arguments...]
#
# One node, all its GPUs (or GPUS=4 for four):
#   launch/deepspeed.sh configs/mar_vit_l_k400.yaml --set run.name=vitl
# Several nodes with passwordless ssh (the usual form): a hostfile ("host slots=8" per
# line, launch/hostfile.example), run on the first node; the launcher reaches every node
# over ssh with pdsh, cds to this folder there (shared storage) and starts its ranks:
#   HOSTFILE=hosts.txt launch/deepspeed.sh configs/mar_vit_l_k400.yaml --resume auto
# Several nodes *without* ssh: run the same command on every node with its NODE_RANK:
#   NO_SSH=1 HOSTFILE=hosts.txt NODE_RANK=0 MASTER_ADDR=node0 launch/deepspeed.sh CONFIG   # on node0
#   NO_SSH=1 HOSTFILE=hosts.txt NODE_RANK=1 MASTER_ADDR=node0 launch/deepspeed.sh CONFIG   # on node1
# On a CPU-only machine (gloo), GPUS=2 starts two CPU processes.
#
# Environment it reads:
#   GPUS          processes per node (default: every GPU of the node; slots= in HOSTFILE)
#   HOSTFILE      nodes and their slots; unset: this node only
#   MASTER_ADDR   address of rank 0's node (default: asked of the first host over ssh,
#                 `hostname -I`; 127.0.0.1 on one node). Required with NO_SSH.
#   MASTER_PORT   rank 0's port (default 29500)
#   NO_SSH=1 NODE_RANK=i   start only this node's ranks (no ssh)
#   SSH_PORT      sshd port of the nodes, if not 22
#   LAUNCHER      pdsh (default), openmpi, mvapich, slurm, ...: how remote nodes are reached
# Remote nodes get only PYTHON*, UCX*, MLFLOW* and the accelerator's variables from this
# shell; put anything else (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, OMP_NUM_THREADS, ...) one
# VAR=value per line in ./.deepspeed_env or ~/.deepspeed_env, or a file named by
# DS_ENV_FILE. Worth knowing on clusters: NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME (the
# interface whose address the other nodes reach, e.g. ib0 or eth0: needed when the host
# name resolves to another one), NCCL_IB_HCA, NCCL_DEBUG=WARN, TORCH_NCCL_ASYNC_ERROR_HANDLING
# (marscale sets 1), TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC; the time a lost node takes to
# notice is run.collective_timeout_s.
# Logs: every rank's output on this terminal, prefixed by host with pdsh (redirect it:
# `... 2>&1 | tee logs/run.log`); metrics, eval results and checkpoints in run.output_dir.
# Exit status 75 means a pre-emption signal stopped the run after saving a checkpoint, 1
# an error (a lost node among them): start it again with --resume auto.
set -euo pipefail
if [[ $# -lt 1 ]]; then
    sed -n '2,/^set -e/{/^set -e/!p}' "$0"; exit 2
fi
config=$1; shift
args=(--no_local_rank --master_port "${MASTER_PORT:-29500}")
[[ -n "${GPUS:-}" ]] && args+=(--num_gpus "$GPUS")
[[ -n "${HOSTFILE:-}" ]] && args+=(--hostfile "$HOSTFILE")
[[ -n "${MASTER_ADDR:-}" ]] && args+=(--master_addr "$MASTER_ADDR")
[[ -n "${SSH_PORT:-}" ]] && args+=(--ssh_port "$SSH_PORT")
[[ -n "${LAUNCHER:-}" ]] && args+=(--launcher "$LAUNCHER")
if [[ -n "${NO_SSH:-}" ]]; then
    : "${HOSTFILE:?NO_SSH needs HOSTFILE (the nodes and their slots)}"
    : "${NODE_RANK:?NO_SSH needs NODE_RANK (the index of this node in HOSTFILE)}"
    : "${MASTER_ADDR:?NO_SSH needs MASTER_ADDR (the address of the first node in HOSTFILE)}"
    args+=(--no_ssh --node_rank "$NODE_RANK")
fi
cmd=(deepspeed "${args[@]}" --module marscale.cli train --config "$config" "$@")
echo "+ $(printf '%q ' "${cmd[@]}")" >&2
exec "${cmd[@]}"
