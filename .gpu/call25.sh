# issue 23's quality gate: the tiny FLUX table (bf16 on the GPU) with the CUTLASS GEMM (bf16 branch, the default on
# H100 / H200) and with Triton's (tf32 branch), same process type, same seed; then the fused linear against cuBLAS
# BF16 (kernel_speed.py: the activation pass + GEMM of a real layer, CUTLASS on sm_90) (carries .cw5 after stashes)
. .gpu/pre.sh "$@"
. .gpu/cwinstall.sh || exit 1
V="int4@32 w4a4@32 nvfp4@32 w8a8@32 int4-naive"
for g in default triton; do
  timeout 200 python3 benchmarks/quality.py --per-class 10 --variants $V --gemm $g --out $OUT/quality_$g.md > $OUT/quality_$g.log 2>&1; echo "quality $g rc=$?"
  grep -E "^\| (int4|w4a4|nvfp4|w8a8)" $OUT/quality_$g.md
done
timeout $(( $(left) - 5 )) python3 benchmarks/kernel_speed.py --out $OUT > $OUT/kernels.log 2>&1; echo "kernel_speed rc=$?"
tail -c 3000 $OUT/kernels.md
