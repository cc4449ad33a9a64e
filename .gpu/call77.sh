# session 38's first call on a fresh machine (carries .cw1 to start the CUTLASS stash): the GPU tests of what
# session 37 changed (optimize's default now fuses norm_rope; the qk op with a text stream) and the models' GPU tests
. .gpu/pre.sh "$1"
gtest $(( $(left) - 10 )) tests/test_optimize.py tests/test_norm_rope.py tests/test_gpu_models.py | tail -15
