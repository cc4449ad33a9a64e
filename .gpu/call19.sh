# issue 23's table in one run: BF16 compiled, torchao FP8 compiled, ours (CUTLASS GEMM) and ours with the Triton GEMM,
# batch 1 and 4, compiled + CUDA graph (carries .cw5 after the stash calls)
. .gpu/pre.sh "$@"
. .gpu/cwinstall.sh || exit 1
timeout $(( $(left) - 5 )) python3 benchmarks/flux_step.py --variants bf16-compiled-graph,fp8-torchao-compiled-graph,int4-fused-compiled-graph,int4-fused-triton-compiled-graph --batch 1 4 --attention _native_cudnn --profile --out $OUT > $OUT/step.log 2>&1; echo "step rc=$?"
python3 - <<'PY'
import json, os
d = json.load(open(os.environ["OUT"] + "/flux_step.json"))
for k, v in d.items():
    if isinstance(v, dict) and "b1" in v:
        print(k, {b: (round(v[b]["ms_per_image"], 2), v[b].get("breakdown", {}).get("classes")) for b in v if b.startswith("b")})
PY
tail -c 1500 $OUT/step.log
