# issue 23: the CUTLASS GEMM called through apache-tvm-ffi (torch tensors, torch's stream) against DLPack views:
# the GPU tests with it on (eager, compiled, captured), the launch's host cost at M = 512 / 4,096, the FLUX step compiled
# without CUDA graphs (where the host cost shows) both ways (carries .cw5 after the stash calls)
. .gpu/pre.sh "$@"
. .gpu/cwinstall.sh || exit 1
python3 -c "import tvm_ffi; print('tvm_ffi', tvm_ffi.__version__)" || exit 1
gtest 60 tests/test_cutlass_gemm.py -k "layer or test_gpu_matches_the_reference and 77" 2>&1 | grep -E "^(E  |FAILED)|passed|failed|rc=" | head -20 | tee $OUT/tests.txt
timeout 70 python3 benchmarks/cutlass_int8_gemm.py --out $OUT --lora --no-int32 --rep 50 --tokens 512 4096 --shapes 2 --configs 128x128_c1x1 > $OUT/cutlass.log 2>&1; echo "cutlass rc=$?"
grep -E "^\| (512|4096) " $OUT/cutlass.log
for mode in views ffi; do
  flag=$([ $mode = views ] && echo --cutlass-views); share=$([ $mode = views ] && echo 2 || echo 1)
  timeout $(( ($(left) - 10) / share )) python3 benchmarks/flux_step.py --variants int4-fused-compiled --batch 1 --attention _native_cudnn $flag --out $OUT/$mode > $OUT/step_$mode.log 2>&1; echo "step $mode rc=$?"
  grep -E '^int4' $OUT/step_$mode.log | cut -c1-200
done
