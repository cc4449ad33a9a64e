# issue 27: the quantizer's new kernels and the 57-block run with them. First the GPU tests of the scoring kernel,
# GPTQ (members in one pass, the inverse by halves) and the batched search; the kernels' benchmarks; then the
# 57-block FLUX.1-dev-size quantization at a 24 GB cap with TF32 scoring (batch-1 records, then batch-4 records,
# what a pipeline's calibration records). The fp32-scoring run at this commit is call29's command without --scoring.
. .gpu/pre.sh "$@"
gtest 150 tests/test_kernels.py tests/test_gptq.py tests/test_algorithm.py -k "scoring or gptq or batched" 2>&1 | tail -5
timeout 60 python3 benchmarks/scoring_speed.py --out $OUT > $OUT/scoring.log 2>&1; echo "scoring_speed rc=$?"; cut -c1-220 $OUT/scoring.log
timeout 90 python3 benchmarks/gptq_speed.py --blocks 64 --out $OUT/gptq > $OUT/gptq.log 2>&1; echo "gptq_speed rc=$?"; tail -c 1500 $OUT/gptq.log
for b in 1 4; do
  timeout $(( b == 1 ? $(left) / 2 : $(left) - 5 )) python3 benchmarks/quantize_flux.py --double 19 --single 38 --snapshots 128 --batch $b --max-gpu-memory 24GB --scoring tf32 --out $OUT/qf_b$b > $OUT/qf_b$b.log 2>&1; echo "qf tf32 batch $b rc=$?"
  tail -c 1500 $OUT/qf_b$b.log
done
