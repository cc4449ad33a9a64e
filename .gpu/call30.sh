# issue 23: memory mode with q/k/v stacked (svdquant::expand_rows) against fused speed mode, b1, then its GPU test
. .gpu/pre.sh "$@"
. .gpu/cwinstall.sh || exit 1
timeout $(( $(left) - 35 )) python3 benchmarks/flux_step.py --variants int4-memory-fused-compiled-graph,int4-fused-compiled-graph --batch 1 --attention _native_cudnn --out $OUT/memory > $OUT/step_memory.log 2>&1; echo "memory rc=$?"
grep -E '^int4' $OUT/step_memory.log | cut -c1-200
gtest $(( $(left) - 3 )) tests/test_fused.py -k "flux_shape_equals" 2>&1 | grep -E "^(E  |FAILED)|passed|failed|rc=" | head -20 | tee $OUT/tests.txt
