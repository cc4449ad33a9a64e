# session 31's first call (stashes the .cw part it carries; no CUTLASS DSL needed): GPU tests of session 30's
# CPU-built changes (W4A16 split K at FLUX's adaLN shape, the one pass given row maxima at its new blocks), then
# kernel_speed.py's W4A16 table and sweep in CUDA graphs (split K among the options; NOTES-GPU.md session 30 item 5)
. .gpu/pre.sh "$1"
# $2: the GPU tests' selection (session 32: "w4a16 or row_maxima or int8_gemm", the Triton GEMM without its spill), $3
# their time limit
gtest ${3:-200} tests/test_kernels.py -k "${2:-w4a16 or row_maxima}" | tail -3
timeout $(( $(left) - 5 )) python3 benchmarks/kernel_speed.py --w4a16 --out $OUT > $OUT/w4a16.log 2>&1
echo "w4a16 rc=$?"
grep '^w4a16' $OUT/w4a16.log | python3 -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l[6:]); sw={k:v for k,v in r['sweep'].items() if isinstance(v,float)}
    fm={k:v for k,v in sw.items() if json.loads(k).get('fma')}; b=min(fm,key=fm.get) if fm else None
    print(r['k'], r['n'], r['m'], 'default graph us', round(r['graph_ms']*1e3,1), 'bf16 eager / graph', round(r['bf16_ms']*1e3,1), round(r['bf16_graph_ms']*1e3,1),
        'best', r['best'], r['best_ms'] and round(r['best_ms']*1e3,1), 'TB/s', r['best_tbs'] and round(r['best_tbs'],2),
        'copy', round(r['copy_tbs'],2), 'best fma', b, b and round(fm[b]*1e3,1))
    print('  bad:', {k:v for k,v in r['sweep'].items() if not isinstance(v,float)})"
