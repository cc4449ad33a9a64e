# qf NAME CAP FLAGS...: the 57-block FLUX.1-dev-size quantization (int4, GPTQ, one-image records) under a memory cap,
# its JSON summarized (sourced after pre.sh)
qf() {
  timeout $(( $(left) - 3 )) python3 benchmarks/quantize_flux.py --double 19 --single 38 --snapshots 128 --max-gpu-memory $2 --batch 1 "${@:3}" --out $OUT/qf_$1 > $OUT/qf_$1.log 2>&1; echo "qf $1 rc=$?"
  python3 - $OUT/qf_$1/quantize_flux.json <<'PY' 2>/dev/null || grep -E 'OutOfMemory|Error' $OUT/qf_$1.log | tail -2
import json, sys; r = json.load(open(sys.argv[1])); s = r["stages"]
print(f'  total {r["seconds_total"]:.1f} s  peak {r["peak_gb"]:.1f}/{r["peak_reserved_gb"]:.1f} GB  snapshots_on_device {r.get("snapshots_on_device")}')
print("  " + "  ".join(f"{k} {v:.1f}" for k, v in s.items()))
PY
}
