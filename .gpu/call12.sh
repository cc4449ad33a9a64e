# issue 23: the q / k epilogue: GPU tests, the kernel alone, then the step against fuse's default
. .gpu/pre.sh "$@"
gtest 200 tests/test_flux_qk.py tests/test_kernels.py tests/test_compile.py -k "qk or compiled_and_graph" 2>&1 | tail -15 | tee $OUT/qk_tests.txt
timeout 90 python3 benchmarks/kernel_speed.py --qk-epilogue --no-check --no-table --out $OUT > $OUT/ks_qk.log 2>&1; echo "ks rc=$?"; tail -c 2000 $OUT/ks_qk.log
timeout $(( $(left) - 5 )) python3 benchmarks/flux_step.py --variants int4-fused-compiled-graph,int4-fused-qk-compiled-graph --batch 1 4 --attention _native_cudnn --profile --out $OUT > $OUT/step_qk.log 2>&1; echo "step rc=$?"; tail -c 4000 $OUT/step_qk.log
