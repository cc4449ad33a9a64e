# optimize(compile="model") on the tiny FLUX under CUDA graphs, with the Triton GEMM (no CUTLASS DSL carried: one call
# on a fresh machine when little device time is left)
. .gpu/pre.sh "$1"
gtest $(( $(left) - 5 )) tests/test_compiling.py | tail -5
