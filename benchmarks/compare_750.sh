#!/usr/bin/env bash
# The README's 750-step comparison (`ccrk compare`: 5 languages en/de/fr/ja/zh omitting details at
# compare's default rates, 2000 training / 500 test images, 50 epochs of global batch 128 = 750
# steps for every arm): each arm at the learning rate its sweep chose, one command per arm and seed
# into one folder, then every run of the variant reported together (DIR/compare.md, compare.png).
# A finished run is kept, so an interrupted script resumes where it stopped, and seeds can be
# trained by separate invocations (or on separate machines, their run folders copied into DIR).
# A run takes 13-20 minutes on a 2-core CPU machine (ITC variant), 16-20 (full variant).
#
#   benchmarks/compare_750.sh [VARIANT: itc | full] [SEEDS: "0 1 2"] [DIR: out/c750]
set -euo pipefail
cd "$(dirname "$0")/.."
variant=${1:-itc}
seeds=${2:-0 1 2}
out=${3:-out/c750}
CCRK=${CCRK:-.venv/bin/ccrk}
data=(--languages en,de,fr,ja,zh --train-images 2000 --epochs 50)
lrs=(one_to_k=1e-3 one_to_one=1e-3 cross_lingual=3e-3)

for seed in $seeds; do
  for arm in "${lrs[@]}"; do
    "$CCRK" compare --out "$out" --objectives "${arm%%=*}" --variants "$variant" --lr "${arm##*=}" \
        --seeds "$seed" "${data[@]}"
  done
done
"$CCRK" compare --out "$out" --objectives one_to_k,one_to_one,cross_lingual --variants "$variant" \
    --seeds "$(echo $seeds | tr ' ' ,)" --objective-lrs "$(IFS=,; echo "${lrs[*]}")" "${data[@]}"
