# issue 23: batch 4 against torchao FP8 in the same run (call24 timed torchao at batch 1 only), ours first
. .gpu/pre.sh "$@"
. .gpu/cwinstall.sh || exit 1
timeout 150 python3 benchmarks/flux_step.py --variants int4-fused-compiled-graph --batch 4 --attention _native_cudnn --out $OUT/ours > $OUT/step_ours.log 2>&1; echo "ours rc=$?"
grep -E '^int4' $OUT/step_ours.log | cut -c1-200
timeout $(( $(left) - 5 )) python3 benchmarks/flux_step.py --variants fp8-torchao-compiled-graph --batch 4 --attention _native_cudnn --out $OUT/fp8 > $OUT/step_fp8.log 2>&1; echo "fp8 rc=$?"
grep -E '^(bf16|fp8)' $OUT/step_fp8.log | cut -c1-200
