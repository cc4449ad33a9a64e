# issue 23 on an H200 with the CUTLASS DSL (carries .cw5 and .whl after the four stash calls) and the activation
# passes in one launch up to the width call53 chose on this machine (/tmp/one_launch_k; 0 if it did not run here):
# bash .gpu/call54.sh 590 "fp8-torchao-compiled-graph,int4-fused-compiled-graph" "1 4"
. .gpu/pre.sh "$1"
. .gpu/cwinstall.sh || exit 1
K=$(cat /tmp/one_launch_k 2>/dev/null || echo 0); echo "one launch up to K=$K"
timeout $(( $(left) - 5 )) python3 benchmarks/flux_step.py --variants "$2" --batch ${3:-1} --attention _native_cudnn \
  --profile --act-one-launch-k $K --out $OUT > $OUT/step.log 2>&1; echo "step rc=$?"
grep -E '^(bf16|fp8|int4)' $OUT/step.log | cut -c1-260
tail -c 1500 $OUT/step.log
