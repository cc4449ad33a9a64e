# session 32 (no CUTLASS DSL needed): GPU tests of the W4A16 kernels, the one pass given row maxima and the Triton INT8
# GEMM (its branch pointer no longer specialized on alignment), then kernel_speed.py's W4A16 table and sweep in
# CUDA graphs (the GEMV at 8 and 16 groups a step among the options)
. .gpu/pre.sh "$1"
gtest 80 tests/test_kernels.py -k "w4a16 or row_maxima or int8_gemm" | tail -3
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
