# the pass ahead where it matters most: Qwen-Image (Qwen2.5-VL-7B does not run beside the resident blocks), a short draw
. .gpu/pre.sh "$@"
for a in on off; do
  timeout $(( $(left) / 2 )) python3 benchmarks/quantize_pipeline.py --model qwenimage --prompts 16 --steps 4 --snapshots 16 --max-gpu-memory 24GB --ahead $a --out $OUT/qwen_$a > $OUT/qwen_$a.log 2>&1; echo "qwen ahead=$a rc=$?"; tail -c 2500 $OUT/qwen_$a.log
done
