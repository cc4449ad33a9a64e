# issue 23: the CUTLASS GEMM in the engine (H100 / H200): its GPU tests, then the FLUX step with it and without it
# (after stash calls carried .cw1-.cw4; this one carries .cw5)
. .gpu/pre.sh "$@"
. .gpu/cwinstall.sh || exit 1
gtest 240 tests/test_cutlass_gemm.py tests/test_compile.py tests/test_edit_models.py 2>&1 | tail -30 | tee $OUT/tests.txt
echo "left $(left) s"
timeout $(( $(left) - 5 )) python3 benchmarks/flux_step.py --variants int4-fused-compiled-graph,int4-fused-triton-compiled-graph --batch 1 --attention _native_cudnn --profile --out $OUT > $OUT/step.log 2>&1; echo "step rc=$?"
python3 - <<'PY'
import json, os
d = json.load(open(os.environ["OUT"] + "/flux_step.json"))
for k, v in d.items():
    if isinstance(v, dict) and "b1" in v:
        print(k, {b: (round(v[b]["ms"], 2), v[b].get("breakdown", {}).get("classes")) for b in v if b.startswith("b")})
print({k: d.get(k) for k in ("sm90_gemm_layers", "fused", "commit")})
PY
tail -c 1500 $OUT/step.log
