# session 31: stash the .cw part carried, and the W4A16 GPU tests at FLUX's adaLN shape (the GEMV now the default at
# one token)
. .gpu/pre.sh "$1"
gtest 120 tests/test_kernels.py -k "w4a16" | tail -3
