# issue 23: the CUTLASS GEMM's tail rows in a second launch (cutlass_launch.launches). Its GPU tests first (the new
# two-launch shapes against the reference; $3 seconds), then kernel_speed.py's table (the GEMM split / one launch,
# eager and in CUDA graphs, beside bare FP8 _scaled_mm)
# bash .gpu/call78.sh 590 ["--tokens 4608": only the 4,608-token rows, where the plan splits] [200]
. .gpu/pre.sh "$1"
. .gpu/cwinstall.sh || exit 1
gtest ${3:-200} tests/test_cutlass_gemm.py -k "two_launches or (gpu_matches and 4080)" | tail -4
timeout $(( $(left) - 10 )) python3 benchmarks/kernel_speed.py --no-check $2 --out $OUT > $OUT/kernels.log 2>&1; echo "kernels rc=$?"
python3 -c "
import json, sys
for line in open(sys.argv[1]):
    if line.startswith('table '):
        r = json.loads(line[6:])
        keys = ('m', 'k', 'n', 'bf16', 'fp8_mm', 'ours_speed_r32', 'gemm', 'gemm_launches', 'gemm_split', 'gemm_one_launch',
                'gemm_graph', 'gemm_one_launch_graph', 'error')
        print({k: round(r[k], 4) if isinstance(r.get(k), float) else r.get(k) for k in keys if k in r})
" $OUT/kernels.log
tail -c 400 $OUT/kernels.log
