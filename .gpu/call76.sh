# the q/k RMSNorm + RoPE kernel alone, when little device time is left (call72 without the step): its GPU tests and
# its speed beside inductor's at FLUX's two cases (no CUTLASS DSL needed)
. .gpu/pre.sh "$1"
gtest 120 tests/test_norm_rope.py | tail -3
timeout $(( $(left) - 3 )) python3 benchmarks/norm_rope_speed.py --out $OUT 2>&1 | tail -24
