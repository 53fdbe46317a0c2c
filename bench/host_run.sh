#!/usr/bin/env bash
# One GPU host's sequence-parallel measurements (issue 9), one part per call so that each
# fits the device tool's 10-minute call. The mesh is (node=2, local=N/2) over the host's N
# devices: 2 x 4 on eight GPUs, 2 x 2 as the dry run on four.
#
#   bash bench/host_run.sh PART [OUT_DIR]
#
# PART:
#   sp              bench/sequence_parallel.py (ring over N, Ulysses over N, 2D, all-gather KV)
#                   at each of $SP_TOKENS tokens per GPU
#   train-POLICY    bench/train_step.py, remat POLICY (none|selective|offload|full): the longest
#                   sequence whose compiled step fits (doubling from $TRAIN_START, one
#                   bisection), then one timed step there; 1 video frame per 256 tokens
#   video           bench/inference.py --longest: the longest video whose prefill + one decoded
#                   token runs, from $VIDEO_FRAMES frames, within $VIDEO_SECONDS
#
# Results go to OUT_DIR (default $OUT) as JSON and the printed tables as .txt. Environment:
# MODEL (qwen2_7b), SP_TOKENS ("32768 65536"), SP_SHAPE (GQA 28/4, head dim 128),
# TRAIN_START (131072; 16384 for none), VIDEO_FRAMES (2048), VIDEO_SECONDS (420), MEMORY_GIB
# (the device's own limit when unset); tests/test_bench.py runs every part on 8 CPU devices.
set -euo pipefail
part=${1:?usage: bash bench/host_run.sh sp|train-none|train-selective|train-offload|train-full|video [OUT_DIR]}
out=${2:-${OUT:?give OUT_DIR or set OUT}}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
model=${MODEL:-qwen2_7b}
memory=()
[[ -n ${MEMORY_GIB:-} ]] && memory=(--memory-gib "$MEMORY_GIB")
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  n=$(nvidia-smi -L | wc -l)
else
  n=$("$python" -c "import jax; print(jax.device_count())")
fi
if (( n < 4 || n % 2 )); then
  echo "host_run.sh: needs an even number of devices >= 4 for a 2 x N/2 mesh, found $n" >&2
  exit 2
fi
mesh="1,2,$((n / 2))"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}

case $part in
  sp)
    read -r heads kv_heads head_dim <<< "${SP_SHAPE:-28 4 128}"
    for tokens in ${SP_TOKENS:-32768 65536}; do
      "$python" "$here/sequence_parallel.py" --tokens-per-gpu "$tokens" --heads "$heads" \
        --kv-heads "$kv_heads" --head-dim "$head_dim" --json "$out/sp_$tokens.json" \
        | tee "$out/sp_$tokens.txt"
    done ;;
  train-none|train-selective|train-offload|train-full)
    policy=${part#train-}
    start=${TRAIN_START:-$([[ $policy == none ]] && echo 16384 || echo 131072)}
    "$python" "$here/train_step.py" --model "$model" --mesh "$mesh" --seq "$start" \
      --frames $((start / 256)) --remat "" --longest "$policy" "${memory[@]}" \
      --json "$out/train_longest_$policy.jsonl" | tee "$out/train_longest_$policy.txt"
    best=$("$python" -c "import json, sys; print(json.loads(open(sys.argv[1]).readlines()[-1])['seq'] or 0)" \
      "$out/train_longest_$policy.jsonl")
    if (( best == 0 )); then
      echo "train-$policy: not even $start tokens fit"
    else
      "$python" "$here/train_step.py" --model "$model" --mesh "$mesh" --seq "$best" \
        --frames $((best / 256)) --remat "$policy" --steps 1 --json "$out/train_$policy.jsonl" \
        | tee "$out/train_$policy.txt"
    fi ;;
  video)
    "$python" "$here/inference.py" --model "$model" --mesh "$mesh" \
      --frames "${VIDEO_FRAMES:-2048}" --longest "${VIDEO_SECONDS:-420}" "${memory[@]}" \
      --json "$out/video.jsonl" | tee "$out/video.txt" ;;
  *)
    echo "host_run.sh: unknown part '$part' (sp, train-none, train-selective, train-offload, train-full, video)" >&2
    exit 2 ;;
esac
