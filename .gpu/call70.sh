# session 34's checks (carries .cw5 on a machine that has stashed .cw1-.cw4): the flash-attn-4 GPU tests (optimize's
# flash-attn-4 route now counts its calls) and optimize(compile="model") on the tiny FLUX under CUDA graphs
. .gpu/pre.sh "$1"
. .gpu/cwinstall.sh || exit 1
gtest $(( $(left) - 10 )) tests/test_flash4_attention.py tests/test_compiling.py | tail -5
