# issue 23: the adaLN modulations ahead (one W4A16 GEMV for all 76; svdquant.fuse(modulations=True)): its GPU test,
# then the step with and without it in one run, batch 1 and 4, profiled (carries .cw5 after the stash calls). If the
# adaLN class falls and nothing else rises: fuse(modulations=True) becomes optimize's default (and the layer choice
# must then time the stack as one candidate, not its members).
. .gpu/pre.sh "$@"
. .gpu/cwinstall.sh || exit 1
gtest 120 tests/test_modulations.py tests/test_kernels.py -k "modulations or w4a16" 2>&1 | tail -4
timeout $(( $(left) - 5 )) python3 benchmarks/flux_step.py --variants int4-fused-compiled-graph,int4-fused-ahead-compiled-graph --batch 1 4 --attention _native_cudnn --profile --out $OUT > $OUT/step.log 2>&1; echo "step rc=$?"
grep -E '^int4|adaLN' $OUT/step.log | cut -c1-220
# the activation passes in row chunks (pass 2 from L2): the fused default again with 24 MB chunks, if call31's
# per-pass chunk timings favour them
timeout $(( $(left) - 5 )) python3 benchmarks/flux_step.py --variants int4-fused-compiled-graph --batch 1 4 --attention _native_cudnn --act-chunk-bytes 25165824 --out $OUT/chunked > $OUT/step_chunked.log 2>&1; echo "step chunked rc=$?"
grep -E '^int4' $OUT/step_chunked.log | cut -c1-220
