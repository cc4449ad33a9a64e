# session 30's first call (stashes the .cw part it carries; no CUTLASS DSL needed): GPU tests of session 29's
# CPU-built changes (blocks by width, W4A16 defaults, modulations ahead, the one pass given row maxima), then
# activation_passes.py at batch 1 and 4 with every sweep (given_maxima_us against the floors; the batch-4 blocks)
. .gpu/pre.sh "$1"
gtest 200 tests/test_kernels.py tests/test_modulations.py -k "blocks_by_width or w4a16 or modulations or row_maxima" \
  | tail -4
for b in 1 4; do
  T=$(( $(left) - 10 )); [ $b = 1 ] && T=$(( T * 2 / 5 ))  # batch 1 gets 2/5 of what is left, batch 4 the rest
  timeout $T python3 benchmarks/activation_passes.py --batch $b --out $OUT/b$b > $OUT/act_b$b.log 2>&1
  echo "act b$b rc=$?"; grep -E '^step' $OUT/act_b$b.log
  grep -E '^pass' $OUT/act_b$b.log | python3 -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l[5:]); print(r['name'], r['m'], r['k'], 'us', round(r['us'],1), 'given', r['given_maxima_us'] if isinstance(r['given_maxima_us'],str) else round(r['given_maxima_us'],1), 'two', round(r['two_reads_us'],1), 'one', round(r.get('one_read_us',0),1), 'best', r.get('best'), r.get('best_us') and round(r['best_us'],1))"
done
