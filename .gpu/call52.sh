# issue 23 on an H200 (carries .cw5 after the four stash calls), two variants a call (each compiles for 90-140 s):
# bash .gpu/call52.sh 590 "fp8-torchao-compiled-graph,int4-fused-compiled-graph" "1 4", then the same with
# "int4-fused-ahead-compiled-graph,int4-fused-compiled-graph" (ours again: the step's noise between calls)
. .gpu/pre.sh "$1"
. .gpu/cwinstall.sh || exit 1
timeout $(( $(left) - 5 )) python3 benchmarks/flux_step.py --variants "$2" --batch ${3:-1} --attention _native_cudnn --profile --out $OUT > $OUT/step.log 2>&1; echo "step rc=$?"
grep -E '^(bf16|fp8|int4)' $OUT/step.log | cut -c1-260
tail -c 1500 $OUT/step.log
