# session 31: stash the .cw part carried, and the GPU tests of the W4A16 kernels at FLUX's adaLN shape (the GEMV now
# the default at one token) and of the one pass given row maxima (32-row blocks since 5b48d72)
. .gpu/pre.sh "$1"
gtest 150 tests/test_kernels.py -k "w4a16 or row_maxima" | tail -3
