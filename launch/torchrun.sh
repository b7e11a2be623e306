#!/usr/bin/env bash
# Launch `marscale train` with torchrun (DeepSpeed still wraps the model inside).
#
#   launch/torchrun.sh CONFIG [marscale train arguments...]
#
# One node:            GPUS=8 launch/torchrun.sh configs/mar_vit_b_k400.yaml
# N nodes: the same command on every node; they meet at a rendezvous on MASTER_ADDR:
#   NNODES=2 MASTER_ADDR=node0 GPUS=8 launch/torchrun.sh configs/mar_vit_l_k400.yaml --resume auto
# Recovery without a person: MAX_RESTARTS=3 restarts every node's workers when one fails
# (a worker killed, a node's processes lost); with --resume auto each restart continues
# from the newest complete checkpoint.
# CPU-only (gloo):     GPUS=2 launch/torchrun.sh configs/demo.yaml
#
# Environment it reads:
#   GPUS          processes per node (default: the node's GPUs, 1 on a CPU-only node)
#   NNODES        number of nodes (default 1)
#   MASTER_ADDR   node hosting the rendezvous, reachable from every node (default 127.0.0.1)
#   MASTER_PORT   its port (default 29500)
#   RDZV_ID       job id shared by the nodes of one job (default marscale; set it per job
#                 when several jobs share a rendezvous host)
#   MAX_RESTARTS  worker-group restarts before the job fails (default 0)
#   LOCAL_ADDR    this node's address as the others reach it, when its host name does not
#                 resolve to it (torchrun --local-addr; the node whose LOCAL_ADDR is
#                 MASTER_ADDR then hosts the rendezvous)
#   NODE_RANK     only for one node (NNODES=1); with several nodes the rendezvous assigns ranks
# NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_DEBUG and the rest are read
# from this environment by every worker (see launch/deepspeed.sh); the time a lost node
# takes to notice is run.collective_timeout_s.
# Logs: every worker's output on this terminal; metrics, eval results and checkpoints in
# run.output_dir. Exit status: 0 finished, non-zero once the restarts are used up.
set -euo pipefail
if [[ $# -lt 1 ]]; then
    sed -n '2,/^set -e/{/^set -e/!p}' "$0"; exit 2
fi
config=$1; shift
gpus=${GPUS:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
nnodes=${NNODES:-1}
endpoint="${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}"
args=(--nnodes "$nnodes" --nproc_per_node "$gpus" --max_restarts "${MAX_RESTARTS:-0}")
if [[ $nnodes == 1 ]]; then
    args+=(--node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}")
else
    # c10d rendezvous hosted by the node at MASTER_ADDR: nodes join in any order, and when
    # one node's workers fail every node restarts its workers together (MAX_RESTARTS).
    args+=(--rdzv_backend c10d --rdzv_endpoint "$endpoint" --rdzv_id "${RDZV_ID:-marscale}")
fi
if [[ -n "${LOCAL_ADDR:-}" ]]; then
    args+=(--local_addr "$LOCAL_ADDR")
    # Knowing its address, a node knows whether it hosts the rendezvous (torchrun's own
    # guess compares host names, and misses addresses on secondary interfaces).
    if [[ $nnodes != 1 ]]; then
        [[ $LOCAL_ADDR == "${MASTER_ADDR:-}" ]] && is_host=1 || is_host=0
        args+=(--rdzv_conf "is_host=$is_host")
    fi
fi
cmd=(torchrun "${args[@]}" -m marscale.cli train --config "$config" "$@")
echo "+ $(printf '%q ' "${cmd[@]}")" >&2
exec "${cmd[@]}"
