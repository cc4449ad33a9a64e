# issue 27: the 57-block FLUX.1-dev-size quantization at a 24 GB cap, again at this commit (target <= 60 s)
. .gpu/pre.sh "$@"
timeout $(( $(left) - 5 )) python3 benchmarks/quantize_flux.py --double 19 --single 38 --snapshots 128 --max-gpu-memory 24GB --out $OUT/qf > $OUT/qf.log 2>&1; echo "qf rc=$?"
tail -c 3000 $OUT/qf.log
