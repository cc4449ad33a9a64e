# issue 27: the joined replays under the 24 GB cap. call36 showed four images a call running out of memory there
# (the replay thread's forward beside three search workers); the recorder's max|x| now takes no |x| copy. Two
# images a call, then four, against call36's 66.3 s as recorded (TF32 scoring, now the default).
. .gpu/pre.sh "$@"
Q="python3 benchmarks/quantize_flux.py --double 19 --single 38 --snapshots 128 --max-gpu-memory 24GB --batch 1"
for n in 2 4; do
  [ $(left) -gt 100 ] || break
  timeout $(( $(left) - 5 )) $Q --replay-images $n --out $OUT/qf_join$n > $OUT/qf_join$n.log 2>&1; echo "qf join$n rc=$?"
  grep -E '"(seconds_total|peak_gb|peak_reserved_gb)"|groups at once|"replays"|waiting|"transfers"|OutOfMemory' $OUT/qf_join$n.log | head -8
done
echo done
