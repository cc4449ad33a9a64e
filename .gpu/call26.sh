# the CUTLASS GEMM with a rank-128 branch (a stacked group whose members carry LoRAs): every GPU test of the kernel
# (the reference includes rank 128 on 128 x 128 tiles), then the probe at rank 128. If they pass: RANKS in
# cutlass_launch.takes gains 128 (carries .cw5 after the stash calls)
. .gpu/pre.sh "$@"
. .gpu/cwinstall.sh || exit 1
gtest 200 tests/test_cutlass_gemm.py 2>&1 | grep -E "^(E  |FAILED)|passed|failed|rc=" | head -20 | tee $OUT/tests.txt
timeout $(( $(left) - 5 )) python3 benchmarks/cutlass_int8_gemm.py --out $OUT --lora --lora-rank 128 --no-int32 --rep 50 --tokens 4096 4608 --configs 128x128_c1x1 128x256_c1x1 > $OUT/cutlass.log 2>&1; echo "cutlass rc=$?"
tail -c 4000 $OUT/cutlass.log
