# issue 23: the CUTLASS GEMM's tile for FLUX's M = 512 text stream (128 x 128 against the shipped 128 x 256), and the
# partial-tile reference tests (carries .cw5 after the stash calls)
. .gpu/pre.sh "$@"
. .gpu/cwinstall.sh || exit 1
gtest 120 tests/test_cutlass_gemm.py 2>&1 | grep -E "^(E  |FAILED)|passed|failed|rc=" | head -20 | tee $OUT/tests.txt
timeout $(( $(left) - 5 )) python3 benchmarks/cutlass_int8_gemm.py --out $OUT --lora --no-int32 --tokens 512 4096 --configs 128x256_c1x1 128x128_c1x1 > $OUT/cutlass.log 2>&1; echo "cutlass rc=$?"
tail -c 5000 $OUT/cutlass.log
