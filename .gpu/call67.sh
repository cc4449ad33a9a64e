# session 33 (carries .cw5 after the four stash calls; .whl too on a fresh machine): flash-attn-4 (installed with the
# CUTLASS DSL from .cw5): its GPU test, its BF16 forward beside cuDNN / flash SDPA at FLUX's attention shapes (eager
# and in CUDA graphs), then with $2 = step our FLUX step with it (svdquant_flash4) against cuDNN in one process
. .gpu/pre.sh "$1"
. .gpu/cwinstall.sh || exit 1
gtest 150 tests/test_flash4_attention.py | tail -3
timeout $(( $(left) - 5 )) python3 benchmarks/attention_speed.py --shapes FLUX --out $OUT > $OUT/att.log 2>&1
echo "attention rc=$?"; cat $OUT/attention.md 2>/dev/null || tail -c 2000 $OUT/att.log
[ "$2" = step ] || exit 0
for a in svdquant_flash4 _native_cudnn; do
  mkdir -p $OUT/$a; timeout $(( $(left) - 5 )) python3 benchmarks/flux_step.py --variants int4-fused-compiled-graph \
    --batch 1 --attention $a --profile --out $OUT/$a > $OUT/$a/step.log 2>&1; echo "step $a rc=$?"
  grep -E '^int4' $OUT/$a/step.log | cut -c1-400
done
