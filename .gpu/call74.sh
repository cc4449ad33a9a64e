# session 35's short form of call72 for a fresh machine with little device time: the q/k RMSNorm + RoPE kernel's GPU
# tests, its speed beside inductor's, then the step with and without it, all with the Triton GEMM (no CUTLASS DSL
# parts carried, so no stash calls, and cuDNN's attention: flash-attn-4 needs the DSL): the comparison is between the two steps
# of one run
. .gpu/pre.sh "$1"
gtest 120 tests/test_norm_rope.py | tail -3
python3 benchmarks/norm_rope_speed.py --out $OUT 2>&1 | tail -24
timeout $(( $(left) - 5 )) python3 benchmarks/flux_step.py --variants int4-fused-compiled-graph,int4-fused-normrope-compiled-graph \
  --batch 1 --attention _native_cudnn --profile --act-blocks width --out $OUT > $OUT/step.log 2>&1; echo "step rc=$?"
grep -E '^int4' $OUT/step.log | cut -c1-400
tail -c 600 $OUT/step.log
