# issue 23: the FLUX step by default (blocks compiled, norm_rope, flash-attn-4, CUDA graph) with the CUTLASS GEMM's
# tail rows in a second launch (--gemm-tail-launch), then in one launch (the default), one process each
# bash .gpu/call79.sh 590
. .gpu/pre.sh "$1"
. .gpu/cwinstall.sh || exit 1
V=int4-fused-normrope-compiled-graph
for ab in split one; do
  flag=$([ $ab = split ] && echo --gemm-tail-launch)
  mkdir -p $OUT/$ab
  timeout $(( $(left) - 5 )) python3 benchmarks/flux_step.py --variants $V --batch 1 --attention svdquant_flash4 \
    --profile --act-blocks width $flag --out $OUT/$ab > $OUT/$ab/step.log 2>&1; echo "$ab rc=$?"
  grep -E '^(int4)' $OUT/$ab/step.log | cut -c1-400
done
