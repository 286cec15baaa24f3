#!/usr/bin/env bash
# Launch presets, one per plugin. Usage: ./train.sh PRESET [extra train.py flags...]
#
#   cpu-smoke         2 CPU processes, tiny model, EP 2 (runs on this machine in ~10 s)
#   cpu-smoke-2node   the same as a two-node job on one machine (hostfile: 127.0.0.1 + localhost, no ssh)
#   ep                8 GPUs, OpenMoE-8B, EP over all 8 ranks, ZeRO-2 (the reference README's "ep")
#   ep_zero           8 GPUs, OpenMoE-8B, EP 4 x 2 ZeRO-sharded expert replicas, ZeRO-1 (reference train.sh)
#   hybrid            8 GPUs, OpenMoE-8B, 1F1B pipeline 2 x expert-DP 1 x EP 4, ZeRO-1 (reference benchmark)
#   ep-2node          2 nodes x 8 GPUs (HOSTFILE, see hostfile.example), EP 16, ZeRO-2
#   ep_zero-2node     2 nodes x 8 GPUs, EP 8 inside each node, experts replicated across the 2 nodes, ZeRO-1
#
# GPU presets need TOKENIZER=/path/to/umt5-tokenizer (DATASET, TASK_NAME optional) in the environment.
# Multi-node: HOSTFILE (default ./hostfile) lists one host per line, node-rank order, the first one being the
# rendezvous master; see hostfile.example. No comment lines: colossalai 0.5.0 reads every non-empty line as a
# host. Hosts named localhost, 127.0.0.1, 0.0.0.0 or resolving to this machine run locally without ssh; any
# other host is reached over ssh (port 22 or --ssh_port), so set up passwordless login first (ssh-keygen;
# ssh-copy-id HOST; `ssh HOST true` must not prompt), keep this repository and its .venv at the same path on
# every host, and let every host reach the first host's --master_port. colossalai run starts the bare
# `torchrun` on every host, so the .venv's bin must be on PATH there (this script puts it first locally).
set -euo pipefail
cd "$(dirname "$0")"
export PATH="$PWD/.venv/bin:$PATH"
PRESET=${1:-cpu-smoke}
shift || true
HOSTFILE=${HOSTFILE:-hostfile}
# The released-size presets need the umT5 tokenizer (256384 tokens; a local directory, since a hub name is refused
# offline) and a real dataset (default: the reference's self_instruct / super_natural_instructions; a DATASET of
# your own gets TASK_NAME only if you set one, as local files have no hub configuration).
openmoe_8b() {
  : "${TOKENIZER:?set TOKENIZER to a local umT5 tokenizer directory (e.g. a saved google/umt5-small)}"
  local task=${TASK_NAME:-}
  [[ -n ${DATASET:-} ]] || task=${TASK_NAME:-super_natural_instructions}
  echo "--model_name 8b --batch_size 1 --lr 1e-5 --num_epoch 1 --precision bf16 --tokenizer $TOKENIZER" \
       "--dataset ${DATASET:-yizhongw/self_instruct}${task:+ --task_name $task}"
}

case "$PRESET" in
  cpu-smoke)
    OMP_NUM_THREADS=1 colossalai run --nproc_per_node 2 train.py \
      --plugin ep --max_steps 20 --batch_size 2 --eval_samples 20 --output_path outputs/cpu-smoke "$@" ;;
  cpu-smoke-2node)
    mkdir -p outputs && printf '127.0.0.1\nlocalhost\n' > outputs/hostfile.local
    OMP_NUM_THREADS=1 colossalai run --hostfile outputs/hostfile.local --nproc_per_node 1 train.py \
      --plugin ep --max_steps 20 --batch_size 2 --eval_samples 20 --output_path outputs/cpu-smoke-2node "$@" ;;
  ep)
    OPENMOE_8B=$(openmoe_8b)
    colossalai run --nproc_per_node 8 train.py $OPENMOE_8B --plugin ep --zero_stage 2 "$@" ;;
  ep_zero)
    OPENMOE_8B=$(openmoe_8b)
    colossalai run --nproc_per_node 8 train.py $OPENMOE_8B --plugin ep_zero --extra_dp_size 2 --zero_stage 1 "$@" ;;
  hybrid)
    OPENMOE_8B=$(openmoe_8b)
    colossalai run --nproc_per_node 8 train.py $OPENMOE_8B --plugin hybrid --zero_stage 1 \
      --pp_size 2 --dp_size 1 --ep_size 4 --microbatch_size 1 --batch_size 2 "$@" ;;
  ep-2node)
    OPENMOE_8B=$(openmoe_8b)
    colossalai run --hostfile "$HOSTFILE" --nproc_per_node 8 train.py $OPENMOE_8B --plugin ep --zero_stage 2 "$@" ;;
  ep_zero-2node)
    OPENMOE_8B=$(openmoe_8b)
    colossalai run --hostfile "$HOSTFILE" --nproc_per_node 8 train.py $OPENMOE_8B --plugin ep_zero \
      --extra_dp_size 2 --zero_stage 1 "$@" ;;
  *)
    sed -n '2,12p' "$0"; exit 2 ;;
esac
