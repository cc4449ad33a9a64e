# call41 at batch 1 only, for a shorter budget (carries .cw5 after the four stash calls): torchao FP8 compiled, the
# fused default, and the fused default with the adaLN modulations ahead, compiled + CUDA graph, profiled, one run
. .gpu/pre.sh "$@"
. .gpu/cwinstall.sh || exit 1
timeout $(( $(left) - 5 )) python3 benchmarks/flux_step.py --variants fp8-torchao-compiled-graph,int4-fused-compiled-graph,int4-fused-ahead-compiled-graph --batch 1 --attention _native_cudnn --profile --out $OUT > $OUT/step.log 2>&1; echo "step rc=$?"
grep -E '^(bf16|fp8|int4)' $OUT/step.log | cut -c1-260
tail -c 1500 $OUT/step.log
