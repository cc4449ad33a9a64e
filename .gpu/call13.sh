# the GPU tests that calibrate through a pipeline and fuse every model, then Qwen-Image-Edit's memory table
. .gpu/pre.sh "$@"
gtest 300 tests/test_gpu_models.py 2>&1 | tail -20 | tee $OUT/gpu_models.txt
timeout $(( $(left) - 5 )) python3 benchmarks/pipeline_memory.py --models qwenimage-edit --out $OUT > $OUT/pm.log 2>&1; echo "pm rc=$?"; tail -c 3000 $OUT/pm.log
