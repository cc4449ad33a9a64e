# the wide activation passes' remaining lever, its consumer half (no CUTLASS DSL needed; stashes the .cw part it
# carries): GPU tests of the one pass given the rows' maxima, then activation_passes.py at batch 1 and 4 with every
# sweep (given_maxima_us against the two passes and the one-read floor decides whether the producer half is worth it)
. .gpu/pre.sh "$1"
gtest 150 tests/test_kernels.py -k "row_maxima or blocks_by_width" | tail -3
for b in 1 4; do
  T=$(( $(left) - 10 )); [ $b = 1 ] && T=$(( T / 2 ))  # batch 1 gets half of what is left, batch 4 the rest
  timeout $T python3 benchmarks/activation_passes.py --batch $b --out $OUT/b$b > $OUT/act_b$b.log 2>&1
  echo "act b$b rc=$?"; grep -E '^step' $OUT/act_b$b.log
done
