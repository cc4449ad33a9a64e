# stash call 2 of 4 (carries .cw2): issue 27's 16 GB cap after GPTQ's smaller peak and the snapshots-fit rule
# (session 26: out of memory in GPTQ's inverse). Completes? time, peak, snapshots_on_device (expected False)
. .gpu/pre.sh "$@"
. .gpu/qf.sh
qf 16gb 16GB --replay-graphs off --overlap-blocks off
echo "left $(left) s"
