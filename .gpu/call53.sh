# issue 23, the activation passes in one launch (stashes the .cw part it carries; no CUTLASS DSL needed): GPU tests,
# activation_passes.py (one launch against two per pass type, the one launch's block sweep), then the FLUX step
# (Triton GEMM) with two launches and with one launch up to the width the passes chose (3,072 if none): the width
# goes to /tmp/one_launch_k for the later calls on this machine
. .gpu/pre.sh "$1"
gtest 150 tests/test_kernels.py -k "one_launch or activation" | tail -3
timeout 240 python3 benchmarks/activation_passes.py --sweep one-launch --out $OUT > $OUT/act.log 2>&1; echo "act rc=$?"
grep -E '^(pass|step)' $OUT/act.log | cut -c1-420
K=$(python3 -c "import json;print(json.load(open('$OUT/activation_passes.json'))['one_launch_max_k'])" 2>/dev/null || echo 0)
echo $K > /tmp/one_launch_k; echo "one launch up to K=$K"
[ "$K" = 0 ] && K=3072
for k in 0 $K; do
  timeout $(( $(left) - 5 )) python3 benchmarks/flux_step.py --variants int4-fused-compiled-graph --batch 1 \
    --attention _native_cudnn --profile --act-one-launch-k $k --out $OUT/step_k$k > $OUT/step_k$k.log 2>&1
  echo "step k=$k rc=$?"; grep -E '^int4' $OUT/step_k$k.log | cut -c1-300
done
