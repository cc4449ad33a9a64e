# session 29's CPU-built changes on the GPU (stashes the .cw part it carries; no CUTLASS DSL needed): GPU tests of the
# activation blocks by width, the W4A16 defaults and the modulations ahead; then the FLUX step with the modulations
# ahead (one row through a one-element index since 457dc42) against the fused default, batch 1, profiled (the
# adaLN W4A16 class shows the new GEMV defaults: 2.6-2.8 ms before)
. .gpu/pre.sh "$1"
gtest 200 tests/test_kernels.py tests/test_modulations.py -k "blocks_by_width or w4a16 or modulations" | tail -4
timeout $(( $(left) - 5 )) python3 benchmarks/flux_step.py --variants int4-fused-compiled-graph,\
int4-fused-ahead-compiled-graph --batch 1 --attention _native_cudnn --profile --out $OUT > $OUT/step.log 2>&1
echo "step rc=$?"; grep -E '^int4' $OUT/step.log | cut -c1-420
