# issue 23: the FLUX.1-dev step as a checkpoint lays it out (one down projection per q/k/v group: the stacked GEMMs'
# branch at rank 32, on the CUTLASS GEMM), ours with the CUTLASS and the Triton GEMM at batch 1 and 4, memory mode
# (4-bit resident) beside speed mode unfused (target: within 8 %), then torchao FP8 compiled at batch 1 in the time
# left (its compile alone takes ~190 s) (carries .cw5 after the stash calls)
. .gpu/pre.sh "$@"
. .gpu/cwinstall.sh || exit 1
timeout 240 python3 benchmarks/flux_step.py --variants int4-fused-compiled-graph,int4-fused-triton-compiled-graph --batch 1 4 --attention _native_cudnn --profile --out $OUT/ours > $OUT/step_ours.log 2>&1; echo "step rc=$?"
grep -E '^int4' $OUT/step_ours.log | cut -c1-420
timeout 100 python3 benchmarks/flux_step.py --variants int4-memory-compiled-graph,int4-compiled-graph --batch 1 --attention _native_cudnn --out $OUT/memory > $OUT/step_memory.log 2>&1; echo "memory rc=$?"
grep -E '^int4' $OUT/step_memory.log | cut -c1-200
timeout $(( $(left) - 5 )) python3 benchmarks/flux_step.py --variants fp8-torchao-compiled-graph --batch 1 --attention _native_cudnn --out $OUT/fp8 > $OUT/step_fp8.log 2>&1; echo "fp8 rc=$?"
grep -E '^(bf16|fp8)' $OUT/step_fp8.log | cut -c1-200
