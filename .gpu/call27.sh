# README's "Fast by default" FLUX.1-dev row again, as a checkpoint lays out its q/k/v branch (rank 32, so the CUTLASS
# GEMM runs the stacked projections on H100 / H200) with BF16 compiled in the same run (carries .cw5 after stashes)
. .gpu/pre.sh "$@"
. .gpu/cwinstall.sh || exit 1
timeout $(( $(left) - 5 )) python3 benchmarks/e2e.py --models flux --variants bf16-compiled int4 --batch 1 --repeats 1 --out $OUT > $OUT/e2e.log 2>&1; echo "e2e rc=$?"
tail -c 3000 $OUT/e2e.log
