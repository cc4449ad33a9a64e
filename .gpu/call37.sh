# issue 23 (session 25's short budget): the adaLN modulations ahead against the fused default in one run, batch 1
# and 4, profiled, then the activation passes in 24 MB row chunks. With the CUTLASS DSL where every part has been
# stashed (stash.sh), else with Triton's INT8 GEMM (the A/B's difference is the adaLN and pass classes, which do not
# use the GEMM; the absolute figures are then not the shipped path's, and the log says so).
. .gpu/pre.sh "$@"
if [ $(ls /tmp/cwstash 2>/dev/null | grep -c '^part') = 5 ]; then R=$PWD; . .gpu/cwinstall.sh || { cd "$R"; echo "DSL install failed: Triton GEMM"; }
else echo "CUTLASS DSL not stashed: Triton GEMM"; fi
gtest 120 tests/test_modulations.py tests/test_kernels.py -k "modulations or w4a16" 2>&1 | tail -3
S="python3 benchmarks/flux_step.py --attention _native_cudnn"
timeout $(( $(left) * 2 / 3 )) $S --variants int4-fused-compiled-graph,int4-fused-ahead-compiled-graph --batch 1 4 --profile --out $OUT > $OUT/step.log 2>&1; echo "step rc=$?"
grep -E '^int4|adaLN|GEMM|activation' $OUT/step.log | cut -c1-220
timeout $(( $(left) - 5 )) $S --variants int4-fused-compiled-graph --batch 1 4 --act-chunk-bytes 25165824 --out $OUT/chunked > $OUT/step_chunked.log 2>&1; echo "step chunked rc=$?"
grep -E '^int4' $OUT/step_chunked.log | cut -c1-220
echo done
