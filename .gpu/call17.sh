# a short call: the GPU tests of today's streaming defaults (prefetch, the pass ahead) and an edit pipeline streamed
. .gpu/pre.sh "$@"
gtest $(( $(left) - 5 )) tests/test_edit_models.py tests/test_stream.py 2>&1 | tail -30 | tee $OUT/tests.txt
