# issue 27's real pipeline, the ablations: no pass ahead, then none of the streaming changes (defaults are call14's)
. .gpu/pre.sh "$@"
timeout $(( $(left) - 5 )) python3 benchmarks/quantize_pipeline.py --max-gpu-memory 24GB --ahead off --out $OUT/noahead > $OUT/qp_noahead.log 2>&1; echo "qp rc=$?"
tail -c 3000 $OUT/qp_noahead.log
if [ $(left) -gt 240 ]; then timeout $(( $(left) - 5 )) python3 benchmarks/quantize_pipeline.py --max-gpu-memory 24GB --ahead off --prefetch off --beside off --out $OUT/ablation > $OUT/qp_ablation.log 2>&1; echo "qp rc=$?"; tail -c 3000 $OUT/qp_ablation.log; fi
