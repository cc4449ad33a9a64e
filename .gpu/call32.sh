# issue 27: where the quantizer's time goes on the GPU: 6 FLUX.1-dev-size blocks under torch.profiler, three groups
# at once (the default) and one at a time (the GPU's own time per group against the wall)
. .gpu/pre.sh "$@"
for w in 3 1; do
  timeout $(( $(left) / 2 )) python3 benchmarks/quantize_flux.py --double 2 --single 4 --snapshots 128 --max-gpu-memory 24GB --workers $w --profile --out $OUT/w$w > $OUT/qf_w$w.log 2>&1; echo "qf workers=$w rc=$?"; tail -c 3000 $OUT/qf_w$w.log
done
