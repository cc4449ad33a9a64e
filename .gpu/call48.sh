# no CUTLASS DSL (the stash was lost with the machine): issue 23's adaLN modulations ahead against the fused default
# at batch 1 on Triton's GEMM (the lever's delta; the class swap of 1c5bb28 never measured), profiled, one run; then
# issue 27's 24 GB run after the calibration's transfer cuts
. .gpu/pre.sh "$@"
timeout 260 python3 benchmarks/flux_step.py --attention _native_cudnn --variants int4-fused-compiled-graph,int4-fused-ahead-compiled-graph --batch 1 --profile --out $OUT > $OUT/step.log 2>&1; echo "step rc=$?"
grep -E '^int4|adaLN|GEMM|activation|elementwise|attention' $OUT/step.log | cut -c1-220
. .gpu/qf.sh
[ $(left) -gt 100 ] && qf 24gb 24GB --replay-graphs off --overlap-blocks off
echo "left $(left) s"
