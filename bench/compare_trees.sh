#!/usr/bin/env bash
# Whether a change made the attention kernels or the training step slower: the same
# benchmarks from two checkouts, alternately, in one GPU session (a refactor must show no
# slowdown on the same device in the same run, not against numbers from another day).
#
#   bench/compare_trees.sh attention|train BASE_TREE [OUT_DIR]
#
# BASE_TREE is a checkout of the base commit (e.g. `git worktree add .old <commit>`, then
# carried to the GPU machine); this checkout is the change. `attention`: bench/attention.py
# at 8K and 32K (Triton and cuDNN), two rounds of base then change. `train`: one
# bench/train_step.py run per checkout and round, Qwen2-1.5B text at 16K tokens, selective
# remat (step time, MFU, peak memory). Output: OUT_DIR/<part>_<base|change>_<round>.*
# and a table of the medians at the end.
set -euo pipefail
part=${1:?usage: bench/compare_trees.sh attention|train BASE_TREE [OUT_DIR]}
base=$(cd "${2:?usage: bench/compare_trees.sh attention|train BASE_TREE [OUT_DIR]}" && pwd)
out=$(mkdir -p "${3:-.}" && cd "${3:-.}" && pwd)
change=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
site=${SITE:-}  # extra packages (the GPU machine's wheels), searched before the tree

run() {  # run TREE NAME ROUND: one benchmark from TREE, its JSON under OUT_DIR
  local tree=$1 name=$2 round=$3
  local json="$out/${part}_${name}_${round}.json"
  case $part in
    attention)
      (cd "$tree" && PYTHONPATH="$site:$tree" "$python" bench/attention.py --seqs 8192,32768 \
        --backends triton,cudnn --json "$json") ;;
    train)
      (cd "$tree" && PYTHONPATH="$site:$tree" "$python" bench/train_step.py \
        --model qwen2_1_5b --seq 16384 --remat selective --steps 4 --json "$json") ;;
    *)
      echo "compare_trees.sh: unknown part '$part' (attention, train)" >&2
      exit 2 ;;
  esac
}

for round in 1 2; do
  run "$base" base "$round"
  run "$change" change "$round"
done
"$python" "$change/bench/compare_table.py" "$part" "$out"
