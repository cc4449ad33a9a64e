# issue 23, the activation passes' blocks by width (stashes the .cw part it carries; no CUTLASS DSL needed): GPU
# tests, activation_passes.py at the shipped blocks against the uniform ones, then the FLUX step with each (a
# second process: inductor's caches make its compile short)
. .gpu/pre.sh "$1"
gtest 150 tests/test_kernels.py -k "blocks_by_width or activation" | tail -3
timeout 120 python3 benchmarks/activation_passes.py --no-sweep --out $OUT > $OUT/act.log 2>&1; echo "act rc=$?"
grep -E '^step' $OUT/act.log
for b in uniform width; do
  timeout $(( $(left) - 5 )) python3 benchmarks/flux_step.py --variants int4-fused-compiled-graph --batch 1 \
    --attention _native_cudnn --profile --act-blocks $b --out $OUT/step_$b > $OUT/step_$b.log 2>&1
  echo "step $b rc=$?"; grep -E '^int4' $OUT/step_$b.log | cut -c1-420
done
