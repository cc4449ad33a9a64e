# session 31: the W4A16 multiply-add GEMV rewritten (int32 words, no int-to-float conversions): call62 again (its GPU
# tests, then kernel_speed.py's W4A16 table and sweep in CUDA graphs; its summary names the best GEMV config too)
. .gpu/call62.sh "$1"
