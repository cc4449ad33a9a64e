# issue 23: the CUTLASS GEMM's variants and partial tiles one case per process, then its GPU tests (whole tiles)
. .gpu/pre.sh "$@"
. .gpu/cwinstall.sh || exit 1
timeout 200 python3 .gpu/diag_cutlass.py
gtest $(( $(left) - 5 )) tests/test_cutlass_gemm.py tests/test_edit_models.py 2>&1 | grep -E "^(E  |FAILED|[0-9]+ (passed|failed))|passed|rc=" | head -40 | tee $OUT/tests.txt
