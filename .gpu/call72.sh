# session 34's q/k RMSNorm + RoPE kernel on a GPU (carries .cw5 on a machine that has stashed .cw1-.cw4): its GPU
# tests, its speed beside inductor's at FLUX's shapes, then the step with and without it
. .gpu/pre.sh "$1"
. .gpu/cwinstall.sh || exit 1
gtest 120 tests/test_norm_rope.py | tail -3
python3 benchmarks/norm_rope_speed.py --out $OUT 2>&1 | tail -24
timeout $(( $(left) - 5 )) python3 benchmarks/flux_step.py --variants int4-fused-compiled-graph,int4-fused-normrope-compiled-graph \
  --batch 1 --attention svdquant_flash4 --profile --act-blocks width --out $OUT > $OUT/step.log 2>&1; echo "step rc=$?"
grep -E '^int4' $OUT/step.log | cut -c1-400
