# session 42: the GEMM's two-launch GPU tests at the new partial-tile shape (4,600 × 12,288 → 3,072), then the FLUX
# step headline with today's split plan (SPLIT_MIN_GAIN): torchao FP8 row-wise compiled beside ours, batch $2
# bash .gpu/call81.sh 590 1   (no batch: the tests only)
. .gpu/pre.sh "$1"
. .gpu/cwinstall.sh || exit 1
gtest 150 tests/test_cutlass_gemm.py -k two_launches | tail -3
[ -n "$2" ] || return 0 2>/dev/null || exit 0
timeout $(( $(left) - 5 )) python3 benchmarks/flux_step.py --variants \
  fp8-torchao-compiled-graph,int4-fused-normrope-compiled-graph --batch $2 --attention svdquant_flash4 \
  --profile --act-blocks width --out $OUT > $OUT/step.log 2>&1; echo "step rc=$?"
grep -E '^(bf16|fp8|int4)' $OUT/step.log | cut -c1-400
tail -c 800 $OUT/step.log
