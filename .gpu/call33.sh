# issue 27: the quantizer's new kernels and the 57-block run with them. First the GPU tests of the scoring kernel,
# GPTQ (members in one pass, the inverse by halves) and the batched search; the kernels' benchmarks; then the
# 57-block FLUX.1-dev-size quantization at a 24 GB cap with TF32 scoring: batch-1 records replayed four images a
# call (the default since calibration/merge.py), the same replayed as recorded (--replay-images 1), and batch-4
# records (what a pipeline's calibration records). The fp32-scoring run is call34's.
. .gpu/pre.sh "$@"
gtest 150 tests/test_kernels.py tests/test_gptq.py tests/test_algorithm.py -k "scoring or gptq or batched" 2>&1 | tail -5
gtest 200 tests/test_stream.py tests/test_concurrent_groups.py 2>&1 | tail -5  # the replays now join one-image calls
timeout 60 python3 benchmarks/scoring_speed.py --out $OUT > $OUT/scoring.log 2>&1; echo "scoring_speed rc=$?"; cut -c1-220 $OUT/scoring.log
timeout 90 python3 benchmarks/gptq_speed.py --blocks 64 --out $OUT/gptq > $OUT/gptq.log 2>&1; echo "gptq_speed rc=$?"; tail -c 1500 $OUT/gptq.log
Q="python3 benchmarks/quantize_flux.py --double 19 --single 38 --snapshots 128 --max-gpu-memory 24GB --scoring tf32"
run() { timeout $1 $Q ${@:3} --out $OUT/$2 > $OUT/$2.log 2>&1; echo "qf $2 rc=$?"; tail -c 1200 $OUT/$2.log; }
run $(( $(left) / 3 )) qf_b1 --batch 1
run $(( $(left) / 2 )) qf_b1_apart --batch 1 --replay-images 1
run $(( $(left) - 5 )) qf_b4 --batch 4
