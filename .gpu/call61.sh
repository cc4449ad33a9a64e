# inductor's coordinate-descent tuning for our compiled blocks (optimize.COMPILE_OPTIONS) against inductor's defaults,
# each in its own process (no torchao in either: its quantize_ turns the same flags on process-wide), batch 1;
# carries .cw5 after the four stash calls
. .gpu/pre.sh "$1"
. .gpu/cwinstall.sh || exit 1
for mode in options defaults; do
  flag=""; [ $mode = defaults ] && flag="--inductor-defaults"
  timeout $(( $(left) - 5 )) python3 benchmarks/flux_step.py --variants int4-fused-compiled-graph --batch 1 \
    --attention _native_cudnn --profile $flag --out $OUT/$mode > $OUT/step_$mode.log 2>&1; echo "$mode rc=$?"
  grep -E '^int4' $OUT/step_$mode.log | cut -c1-480
done
