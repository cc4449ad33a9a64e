# issue 23: the FLUX step by default (blocks compiled, norm_rope, flash-attn-4, CUDA graph, the CUTLASS GEMM's tail
# rows in a second launch), then with every GEMM in one launch (--gemm-one-launch), one process each, at batch $2
# (session 40 wrote it with the split off by default and a --gemm-tail-launch flag; session 41 ran it so, at batch 1
# and 4, and turned the split on)
# bash .gpu/call79.sh 590 [1]
. .gpu/pre.sh "$1"
. .gpu/cwinstall.sh || exit 1
V=int4-fused-normrope-compiled-graph
for ab in split one; do
  flag=$([ $ab = one ] && echo --gemm-one-launch)
  mkdir -p $OUT/$ab
  timeout $(( $(left) - 5 )) python3 benchmarks/flux_step.py --variants $V --batch ${2:-1} --attention svdquant_flash4 \
    --profile --act-blocks width $flag --out $OUT/$ab > $OUT/$ab/step.log 2>&1; echo "$ab rc=$?"
  grep -E '^(int4)' $OUT/$ab/step.log | cut -c1-400
done
