# issue 23 with the CUTLASS DSL (carries .cw5 and .whl after the four stash calls): the step's variants ($2) at the
# batches ($3), with the activation passes' blocks by width ($4 = uniform: as before session 29), and more of
# flux_step.py's flags in $5
# bash .gpu/call56.sh 590 "fp8-torchao-compiled-graph,int4-fused-compiled-graph" "1 4"
. .gpu/pre.sh "$1"
. .gpu/cwinstall.sh || exit 1
timeout $(( $(left) - 5 )) python3 benchmarks/flux_step.py --variants "$2" --batch ${3:-1} --attention _native_cudnn \
  --profile --act-blocks ${4:-width} $5 --out $OUT > $OUT/step.log 2>&1; echo "step rc=$?"
grep -E '^(bf16|fp8|int4)' $OUT/step.log | cut -c1-300
tail -c 1200 $OUT/step.log
# the largest inductor kernels of our steps (the elementwise class), from the results' breakdowns
python3 -c "
import json, sys
for name, row in json.load(open(sys.argv[1]))['variants'].items():
    for b, r in row.items():
        for k, ms in (r.get('breakdown', {}).get('top_rest', {}).items() if isinstance(r, dict) else ()):
            print(name, b, round(ms, 3), k[:200])
" $OUT/flux_step.json 2>&1 | head -30
