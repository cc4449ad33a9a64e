# issue 27: the quantizer's profile per stage, snapshots recorded one image a call, then four
. .gpu/pre.sh "$@"
for b in 1 4; do
  timeout $(( $(left) / 2 )) python3 benchmarks/quantize_flux.py --double 2 --single 4 --snapshots 128 --batch $b --max-gpu-memory 24GB --profile --out $OUT/b$b > $OUT/qf_b$b.log 2>&1; echo "qf b=$b rc=$?"; tail -c 2500 $OUT/qf_b$b.log
done
