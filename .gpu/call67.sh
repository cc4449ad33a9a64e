# session 33 (carries .cw5 and .whl after the four stash calls): flash-attn-4's BF16 forward (CuTe DSL, installed
# with the DSL from .cw5) beside cuDNN / flash SDPA at FLUX's attention shapes, eager and in CUDA graphs
. .gpu/pre.sh "$1"
. .gpu/cwinstall.sh || exit 1
python3 -c "import flash_attn.cute as f; print('flash-attn-4', f.flash_attn_func.__module__)" 2>&1 | tail -2
timeout $(( $(left) - 5 )) python3 benchmarks/attention_speed.py --shapes FLUX --out $OUT > $OUT/att.log 2>&1
echo "attention rc=$?"; cat $OUT/attention.md 2>/dev/null || tail -c 2000 $OUT/att.log
