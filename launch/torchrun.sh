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
# The Python it runs: PYTHON, else this checkout's .venv (make setup), else python3.
# Before anything starts (marscale/cluster/launch.py): the config is read (a bad one:
# status 78); on a node that does not host the rendezvous, MASTER_ADDR must resolve and
# answer within CHECK_TIMEOUT_S (status 68 otherwise). Each node's workers talk over the
# interface that routes to MASTER_ADDR unless GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME are set.
#
# Environment it reads:
#   GPUS          processes per node (default: the node's GPUs, 1 on a CPU-only node)
#   NNODES        number of nodes (default 1)
#   MASTER_ADDR   node hosting the rendezvous, reachable from every node (default 127.0.0.1)
#   MASTER_PORT   its port (default 29500)
#   RDZV_ID       job id shared by the nodes of one job (default marscale; set it per job
#                 when several jobs share a rendezvous host)
#   MAX_RESTARTS  worker-group restarts before the job fails (default 0)
#   JOIN_TIMEOUT_S  seconds the nodes have to join the rendezvous (default 300)
#   CHECK_TIMEOUT_S seconds MASTER_ADDR has to answer the start-up check (default 10, at most 3600)
#   LOCAL_ADDR    this node's address as the others reach it, when its host name does not
#                 resolve to it (torchrun --local-addr; the node whose LOCAL_ADDR is
#                 MASTER_ADDR then hosts the rendezvous)
#   NODE_RANK     only for one node (NNODES=1); with several nodes the rendezvous assigns ranks
# NCCL_IB_HCA, NCCL_DEBUG and the rest are read from this environment by every worker.
# Logs: every worker's output on this terminal; metrics, eval results and checkpoints in
# run.output_dir. Exit status: as launch/deepspeed.sh (README "Exit status"; torchrun's
# own is 1 whatever failed: the wrapper reads the workers' statuses). SIGTERM/SIGUSR1 to
# this script: torchrun passes SIGTERM to the workers, which save a checkpoint and exit
# 75 if they finish within torchrun's 30 s.
set -euo pipefail
if [[ $# -lt 1 ]]; then
    sed -n '2,/^set -e/{/^set -e/!p}' "$0"; exit 2
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-}
if [[ -z $python ]]; then
    if [[ -x $here/.venv/bin/python ]]; then python=$here/.venv/bin/python; else python=$(command -v python3); fi
fi
exec "$python" -m marscale.cluster.launch torchrun "$@"
