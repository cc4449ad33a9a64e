# issue 27's remaining seconds (<= 60 s at a 24 GB cap), one machine, the baseline rerun beside each lever: the
# replays set the pace (session 25: replay thread busy 54.5 s beside ~49 s of groups), bound by their launches.
# Levers: each block's replays launched as one captured CUDA graph (REPLAY_GRAPHS), a block's groups queued beside the
# previous block's tail (OVERLAP_BLOCKS), the replays' side stream at a higher CUDA priority (-1).
. .gpu/pre.sh "$@"
gtest 120 tests/test_replay_graph.py tests/test_concurrent_groups.py 2>&1 | tail -4
python3 -c "import torch; print('stream priority range', torch.cuda.Stream.priority_range())"
qf() {  # name, extra flags
  timeout $(( $(left) - 3 )) python3 benchmarks/quantize_flux.py --double 19 --single 38 --snapshots 128 --max-gpu-memory 24GB --batch 1 "${@:2}" --out $OUT/qf_$1 > $OUT/qf_$1.log 2>&1; echo "qf $1 rc=$?"
  python3 - $OUT/qf_$1/quantize_flux.json <<'PY' 2>/dev/null || grep -E 'OutOfMemory|Error' $OUT/qf_$1.log | tail -2
import json, sys; r = json.load(open(sys.argv[1])); s = r["stages"]
print(f'  total {r["seconds_total"]:.1f} s  peak {r["peak_gb"]:.1f}/{r["peak_reserved_gb"]:.1f} GB  graphs {r["replay_graphs"]}')
print("  " + "  ".join(f"{k} {v:.1f}" for k, v in s.items()))
PY
}
qf base --replay-priority 0 --replay-graphs off --overlap-blocks off
qf graphs --replay-priority 0 --replay-graphs on --overlap-blocks off
qf both --replay-priority 0 --replay-graphs on --overlap-blocks on
[ $(left) -gt 100 ] && qf bothprio --replay-priority -1 --replay-graphs on --overlap-blocks on
echo "left $(left) s"
