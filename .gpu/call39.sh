# session 25's last call (~260 s): issue 23's adaLN modulations ahead under the regional compile (the norms' classes
# swapped, not their forwards: call37's run hit dynamo's recompile limit), batch 1 against the fused default in one
# run, profiled; then issue 27's joined replays at two images a call under the 24 GB cap (call38's first half).
. .gpu/pre.sh "$@"
timeout 130 python3 benchmarks/flux_step.py --attention _native_cudnn --variants int4-fused-compiled-graph,int4-fused-ahead-compiled-graph --batch 1 --profile --out $OUT > $OUT/step.log 2>&1; echo "step rc=$?"
grep -E '^int4|adaLN|GEMM|activation|elementwise' $OUT/step.log | cut -c1-200
timeout $(( $(left) - 3 )) python3 benchmarks/quantize_flux.py --double 19 --single 38 --snapshots 128 --max-gpu-memory 24GB --batch 1 --replay-images 2 --out $OUT/qf_join2 > $OUT/qf_join2.log 2>&1; echo "qf join2 rc=$?"
grep -E '"(seconds_total|peak_gb|peak_reserved_gb)"|groups at once|"replays"|waiting|OutOfMemory' $OUT/qf_join2.log | head -8
