# session 32 (no CUTLASS DSL needed): GPU tests of the W4A16 kernels, the one pass given row maxima and the Triton INT8
# GEMM (its branch pointer no longer specialized on alignment), then kernel_speed.py's W4A16 table and sweep in
# CUDA graphs (the GEMV at 8 and 16 groups a step among the options)
bash .gpu/call62.sh "$1" "w4a16 or row_maxima or int8_gemm" 80
