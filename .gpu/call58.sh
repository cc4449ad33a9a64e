# the fused linear against cuBLAS BF16, eager and in CUDA graphs (carries .cw5 and .whl after the four stash calls,
# or runs on a machine where call56 installed the DSL): issue 23's "≥ 1.5× on every shape"
. .gpu/pre.sh "$1"
. .gpu/cwinstall.sh || exit 1
timeout $(( $(left) - 5 )) python3 benchmarks/kernel_speed.py --no-check --out $OUT > $OUT/ks.log 2>&1
echo "ks rc=$?"; tail -c 5000 $OUT/ks.log
