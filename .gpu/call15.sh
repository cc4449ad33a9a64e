# issue 23, lever 2: the CuTe DSL INT8 GEMM probe (after stash calls carried .cw1-.cw4; this one carries .cw5)
. .gpu/pre.sh "$@"
. .gpu/cwinstall.sh || exit 1
python3 -m pip show cuda-bindings cuda-pathfinder 2>/dev/null | grep -E "^(Name|Version)"
timeout $(( $(left) - 5 )) python3 benchmarks/cutlass_int8_gemm.py --out $OUT --lora > $OUT/cutlass.log 2>&1; echo "cutlass rc=$?"
tail -c 9000 $OUT/cutlass.log
