# stash call 1 of 4 (carries .cw1) with work that needs no CUTLASS DSL: issue 23's activation passes, each pass type
# of the FLUX step timed in a CUDA graph against its floor, then the block sweep and the row chunks (never run yet)
. .gpu/pre.sh "$@"
timeout $(( $(left) - 5 )) python3 benchmarks/activation_passes.py --out $OUT > $OUT/act.log 2>&1; echo "act rc=$?"
grep -E '^(pass|step|best|chunk)' $OUT/act.log | cut -c1-300
tail -c 3000 $OUT/act.log
