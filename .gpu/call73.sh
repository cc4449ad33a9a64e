# the FLUX.1-dev pipeline (its architecture, random weights) through svdquant.optimize with the blocks compiled and
# with compile="model" (carries .cw5 on a machine that has stashed .cw1-.cw4)
. .gpu/pre.sh "$1"
. .gpu/cwinstall.sh || exit 1
timeout $(( $(left) - 5 )) python3 benchmarks/e2e.py --models flux --variants int4 int4-model --batch 1 --repeats 2 \
  --budget-s $(( $(left) - 120 )) --out $OUT > $OUT/e2e.log 2>&1; echo "e2e rc=$?"
grep -E "^flux|^\|" $OUT/e2e.log | cut -c1-300
