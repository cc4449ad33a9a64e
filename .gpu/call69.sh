# the flash-attn-4 GPU tests after session 34's change to the optimize test (flash-attn-4's calls counted: at the
# tiny shape exact attention rounds to SDPA's bits, so session 34's first run failed `0 < rel`); carries .cw5 on a
# machine that has stashed .cw1-.cw4
. .gpu/pre.sh "$1"
. .gpu/cwinstall.sh || exit 1
gtest $(( $(left) - 10 )) tests/test_flash4_attention.py | tail -4
