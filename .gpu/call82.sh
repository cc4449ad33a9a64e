# Qwen-Image's pipeline by default (q/k RMSNorm + RoPE as one op since session 42) against the same with that left to
# diffusers (e2e.py's int4-no-normrope), one run; Qwen-Image's 20B transformer (41 GB in BF16) may not fit an H100
# beside its text encoder while it is quantized: ask for an H200
# bash .gpu/call82.sh 590
. .gpu/pre.sh "$1"
. .gpu/cwinstall.sh || exit 1
timeout $(( $(left) - 5 )) python3 benchmarks/e2e.py --models qwenimage --variants int4 int4-no-normrope --batch 1 \
  --repeats 2 --budget-s $(( $(left) - 200 )) --out $OUT > $OUT/e2e.log 2>&1; echo "e2e rc=$?"
grep -E "^qwenimage|^\|" $OUT/e2e.log | cut -c1-400
tail -c 600 $OUT/e2e.log
