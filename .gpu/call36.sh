# issue 27 in one call (session 25's short budget): call33's and call34's essentials, most decisive first. The GPU
# tests of the new quantizer pieces; the 57-block run with TF32 scoring (batch-1 records joined four a call, the
# default); the quality gate of TF32 scoring (fp32 against tf32, same seed); the 57-block run with fp32 scoring
# (the time A/B in one run); then the scoring kernel's benchmark and the replay ablation while time is left.
. .gpu/pre.sh "$@"
gtest 120 tests/test_kernels.py tests/test_gptq.py tests/test_algorithm.py tests/test_stream.py -k "scoring or gptq or batched or stream" 2>&1 | tail -4
Q="python3 benchmarks/quantize_flux.py --double 19 --single 38 --snapshots 128 --max-gpu-memory 24GB"
qf() { timeout $1 $Q ${@:3} --out $OUT/$2 > $OUT/$2.log 2>&1; echo "qf $2 rc=$?"; tail -c 900 $OUT/$2.log; }
qf 150 qf_tf32 --batch 1 --scoring tf32
V="int4@32 w4a4@32 nvfp4@32 int4-naive"
for s in fp32 tf32; do
  timeout 150 python3 benchmarks/quality.py --per-class 10 --variants $V --scoring $s --out $OUT/quality_$s.md > $OUT/quality_$s.log 2>&1; echo "quality $s rc=$?"
  grep -E "^\| (int4|w4a4|nvfp4)" $OUT/quality_$s.md
done
[ $(left) -gt 110 ] && qf $(( $(left) - 10 )) qf_fp32 --batch 1 --scoring fp32
[ $(left) -gt 40 ] && { timeout 30 python3 benchmarks/scoring_speed.py --out $OUT > $OUT/scoring.log 2>&1; echo "scoring_speed rc=$?"; cut -c1-220 $OUT/scoring.log; }
[ $(left) -gt 110 ] && qf $(( $(left) - 5 )) qf_apart --batch 1 --scoring tf32 --replay-images 1
echo done
