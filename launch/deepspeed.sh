#!/usr/bin/env bash
# Launch `marscale train` with the DeepSpeed launcher, on one node or several.
#
#   launch/deepspeed.sh CONFIG [marscale train arguments...]
#
# One node, all its GPUs (or GPUS=4 for four):
#   launch/deepspeed.sh configs/mar_vit_l_k400.yaml --set run.name=vitl
# Several nodes with passwordless ssh (the usual form): a hostfile ("host slots=8" per
# line, launch/hostfile.example), run on the first node, from this checkout on storage
# every node sees; the launcher reaches every node (the first one too) over ssh with pdsh
# and starts its ranks in the folder you launched from:
#   HOSTFILE=hosts.txt launch/deepspeed.sh configs/mar_vit_l_k400.yaml --resume auto
# Several nodes *without* ssh: run the same command on every node with its NODE_RANK:
#   NO_SSH=1 HOSTFILE=hosts.txt NODE_RANK=0 MASTER_ADDR=node0 launch/deepspeed.sh CONFIG   # on node0
#   NO_SSH=1 HOSTFILE=hosts.txt NODE_RANK=1 MASTER_ADDR=node0 launch/deepspeed.sh CONFIG   # on node1
# On a CPU-only machine (gloo), GPUS=2 starts two CPU processes.
#
# The Python it runs: PYTHON, else this checkout's .venv (make setup), else python3.
# Before anything starts (marscale/cluster/launch.py): the config is read (a bad one:
# status 78); every host of the hostfile must resolve, answer ssh within CHECK_TIMEOUT_S
# (default 10) and have the launch folder; without ssh, MASTER_ADDR must answer (status 68
# otherwise, in seconds). Remote ranks get this environment's PATH (its venv first) and
# the job's variables in a .deepspeed_env that extends yours; each node's ranks talk over
# the interface that routes to MASTER_ADDR unless GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME
# are set. Everything chosen is printed, then the command (`+ deepspeed ...`).
#
# Environment it reads:
#   GPUS          processes per node (default: every GPU of the node; slots= in HOSTFILE)
#   HOSTFILE      nodes and their slots; unset: this node only
#   MASTER_ADDR   address of rank 0's node (default: the first host's first address,
#                 `hostname -I` over ssh; 127.0.0.1 on one node). Required with NO_SSH.
#   MASTER_PORT   rank 0's port (default 29500)
#   NO_SSH=1 NODE_RANK=i   start only this node's ranks (no ssh)
#   SSH_PORT      sshd port of the nodes, if not 22
#   CHECK_TIMEOUT_S  seconds a host has to answer the start-up check (default 10, at most 3600)
#   LAUNCHER      pdsh (default), openmpi, mvapich, slurm, ...: how remote nodes are reached
# Remote nodes get PATH, GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME, OMP_NUM_THREADS,
# TORCH_EXTENSIONS_DIR (when set here) and PYTHON*, UCX*, MLFLOW* from this shell; put
# anything else (NCCL_IB_HCA, NCCL_DEBUG=WARN, ...) one VAR=value per line in
# ./.deepspeed_env or ~/.deepspeed_env, or a file named by DS_ENV_FILE (your values win).
# Logs: every rank's output on this terminal, prefixed by host with pdsh (redirect it:
# `... 2>&1 | tee logs/run.log`); metrics, eval results and checkpoints in run.output_dir.
# Exit status (README "Exit status"): 0 finished; 69 a rank or node was lost and 75
# pre-empted after a checkpoint (SIGTERM/SIGUSR1 to this script reaches every rank): start
# it again with --resume auto; 68 a host did not answer; 78 a bad configuration; 1 an
# unforeseen error.
set -euo pipefail
if [[ $# -lt 1 ]]; then
    sed -n '2,/^set -e/{/^set -e/!p}' "$0"; exit 2
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-}
if [[ -z $python ]]; then
    if [[ -x $here/.venv/bin/python ]]; then python=$here/.venv/bin/python; else python=$(command -v python3); fi
fi
exec "$python" -m marscale.cluster.launch deepspeed "$@"
