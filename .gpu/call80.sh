# Qwen-Image's and Z-Image's q/k RMSNorm + RoPE as one op (session 41, built on the CPU, untimed): GPU tests, the kernel
# against diffusers' math compiled (norm_rope_speed.py's qwenimage case), then the pipeline by default with and
# without it in one run (e2e.py's int4-normrope). Where it wins, add the model to svdquant.modules.norm_rope.OPTIMIZED
# bash .gpu/call80.sh 590 (session 42 ran it with e2e.py's old int4-normrope, since replaced by int4-no-normrope)
. .gpu/pre.sh "$1"
. .gpu/cwinstall.sh || exit 1
gtest 150 tests/test_norm_rope_complex.py | tail -4
timeout 120 python3 benchmarks/norm_rope_speed.py --out $OUT > $OUT/norm_rope.log 2>&1; echo "norm_rope rc=$?"
grep -E "^(qwenimage|double)" $OUT/norm_rope.log
timeout $(( $(left) - 5 )) python3 benchmarks/e2e.py --models zimage qwenimage --variants int4 int4-normrope --batch 1 \
  --repeats 2 --budget-s $(( $(left) - 200 )) --out $OUT > $OUT/e2e.log 2>&1; echo "e2e rc=$?"
grep -E "^(qwenimage|zimage)|^\|" $OUT/e2e.log | cut -c1-400
tail -c 600 $OUT/e2e.log
