# issue 23: the CUTLASS GEMM's tail rows in a second launch (cutlass_launch.launches). Its GPU tests first (the new
# two-launch shapes against the reference), then kernel_speed.py's 24-shape table (the GEMM split / one launch,
# eager and in CUDA graphs, beside bare FP8 _scaled_mm), then the FLUX step by default if time is left
# bash .gpu/call78.sh 590 ["--tokens 4608": only the 4,608-token rows, where the plan splits]
. .gpu/pre.sh "$1"
. .gpu/cwinstall.sh || exit 1
gtest ${3:-200} tests/test_cutlass_gemm.py -k "gpu_matches and (4608 or 4600 or 4080)" | tail -4
timeout $(( $(left) - 10 )) python3 benchmarks/kernel_speed.py --no-check $2 --out $OUT > $OUT/kernels.log 2>&1; echo "kernels rc=$?"
grep -E "^\| (4096|4608|16384|18432) " $OUT/kernels.md | awk -F'|' '{print $2,$3,$4,$5,$6,$8,$10,$21,$22}'
tail -c 600 $OUT/kernels.log
