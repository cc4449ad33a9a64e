# what a user gets by default, beside the alternatives in one run (carries .cw5 on a machine that has stashed
# .cw1-.cw4): the FLUX.1-dev pipeline (its architecture, random weights, 1024², 28 steps) in BF16 eager and compiled,
# svdquant int4 through svdquant.optimize's defaults, then torchao FP8 row-wise compiled on a new pipeline
# ($2: other variants; $3: other models, e.g. sd3)
. .gpu/pre.sh "$1"
. .gpu/cwinstall.sh || exit 1
timeout $(( $(left) - 5 )) python3 benchmarks/e2e.py --models ${3:-flux} --variants ${2:-bf16 bf16-compiled int4 fp8-torchao} \
  --batch 1 --repeats 2 --budget-s $(( $(left) - 240 )) --out $OUT > $OUT/e2e.log 2>&1; echo "e2e rc=$?"
grep -E "^(flux|sd3|sdxl|qwenimage|sana|pixart)|^\|" $OUT/e2e.log | cut -c1-400
tail -c 800 $OUT/e2e.log
