# issue 23: where the activation passes' 12.8 ms go (each pass type in a CUDA graph, against its floor, a block
# sweep), then kernel_speed with the tvm-ffi launch and the W4A16 sweep (carries .cw5 after the stash calls)
. .gpu/pre.sh "$@"
. .gpu/cwinstall.sh || exit 1
timeout 200 python3 benchmarks/activation_passes.py --out $OUT > $OUT/act.log 2>&1; echo "act rc=$?"
grep -E '^(pass|step)' $OUT/act.log | cut -c1-400
timeout $(( $(left) - 5 )) python3 benchmarks/kernel_speed.py --out $OUT > $OUT/kernels.log 2>&1; echo "kernel_speed rc=$?"
tail -c 5000 $OUT/kernels.md
