# the streaming GPU tests, then the real pipeline's calibration + quantization at 24 GB (issue 27, <= 3 min)
. .gpu/pre.sh "$@"
gtest 120 tests/test_stream.py 2>&1 | tail -25 | tee $OUT/stream_tests.txt
echo "left $(left) s"
timeout $(( $(left) - 5 )) python3 benchmarks/quantize_pipeline.py --max-gpu-memory 24GB --out $OUT/default > $OUT/qp_default.log 2>&1; echo "qp rc=$?"
tail -c 6000 $OUT/qp_default.log
