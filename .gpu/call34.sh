# issue 27: the quality gate of TF32 scoring (the tiny FLUX table, bf16 on the GPU, fp32 against TF32 scoring, same
# seed), then the 57-block run with fp32 scoring at this commit (GPTQ's members in one pass and the inverse by halves
# without TF32): decides SCORING_TF32's default
. .gpu/pre.sh "$@"
V="int4@32 w4a4@32 nvfp4@32 int4-naive"
for s in fp32 tf32; do
  timeout 200 python3 benchmarks/quality.py --per-class 10 --variants $V --scoring $s --out $OUT/quality_$s.md > $OUT/quality_$s.log 2>&1; echo "quality $s rc=$?"
  grep -E "^\| (int4|w4a4|nvfp4)" $OUT/quality_$s.md
done
timeout $(( $(left) - 5 )) python3 benchmarks/quantize_flux.py --double 19 --single 38 --snapshots 128 --max-gpu-memory 24GB --scoring fp32 --out $OUT/qf > $OUT/qf.log 2>&1; echo "qf fp32 rc=$?"
tail -c 1500 $OUT/qf.log
