#!/usr/bin/env bash
# Launch `marscale train` with torchrun (DeepSpeed still wraps the model inside).
#
#   launch/torchrun.sh CONFIG [marscale train arguments...]
#
# One node:            GPUS=8 launch/torchrun.sh configs/mar_vit_b_k400.yaml
# Node i of N:         NNODES=N NODE_RANK=i MASTER_ADDR=node0 GPUS=8 launch/torchrun.sh CONFIG
# CPU-only (gloo):     GPUS=2 launch/torchrun.sh configs/demo.yaml
set -euo pipefail
if [[ $# -lt 1 ]]; then
    sed -n '2,9p' "$0"; exit 2
fi
config=$1; shift
gpus=${GPUS:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
exec torchrun \
    --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$gpus" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    -m marscale.cli train --config "$config" "$@"
