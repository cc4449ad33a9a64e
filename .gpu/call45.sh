# issue 27, after call41 if the budget allows: a real FLUX.1-dev-size pipeline's calibration and quantization at a
# 24 GB cap (<= 3 min, met at 94f7bfa in 154.0 s): which way the snapshots go (snapshots_on_device) with the
# resident blocks loaded, and the total after the calibration's transfer cuts
. .gpu/pre.sh "$@"
timeout $(( $(left) - 3 )) python3 benchmarks/quantize_pipeline.py --max-gpu-memory 24GB --out $OUT/qp > $OUT/qp.log 2>&1; echo "qp rc=$?"
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print({k: v for k, v in r.items() if not isinstance(v, (list, dict))}); print(r.get('stages'))" $OUT/qp/quantize_pipeline.json 2>/dev/null || tail -c 1500 $OUT/qp.log
