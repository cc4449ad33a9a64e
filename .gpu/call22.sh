# issue 23: the CUTLASS GEMM's launch plan (cutlass_launch.plan: the tile, and the walk that keeps an operand in L2)
# - the GPU tests at every plan, the FLUX step at batch 1 and 4 with the plan against Triton's GEMM, then the
# probe: every plan's config at M = 512 / 4,096 / 4,608 / 16,384 / 18,432 (carries .cw5 after the stash calls)
. .gpu/pre.sh "$@"
. .gpu/cwinstall.sh || exit 1
gtest 150 tests/test_cutlass_gemm.py 2>&1 | grep -E "^(E  |FAILED)|passed|failed|rc=" | head -20 | tee $OUT/tests.txt
timeout 220 python3 benchmarks/flux_step.py --variants int4-fused-compiled-graph,int4-fused-triton-compiled-graph --batch 1 4 --attention _native_cudnn --profile --out $OUT > $OUT/step.log 2>&1; echo "step rc=$?"
grep -E '^int4' $OUT/step.log | cut -c1-400
timeout $(( $(left) - 5 )) python3 benchmarks/cutlass_int8_gemm.py --out $OUT --lora --no-int32 --rep 50 --tokens 512 4096 4608 16384 18432 --configs 128x256_c1x1 128x128_c1x1 128x256_c1x1_rn 128x128_c1x1_rn 128x256_c1x1_s4 128x256_c1x1_rn_s4 > $OUT/cutlass.log 2>&1; echo "cutlass rc=$?"
tail -c 6000 $OUT/cutlass.log
