# stash call 3 of 4 (carries .cw3): issue 27 at 24 GB after the calibration's transfer cuts (keep_rest, record_first):
# the default, then overlapped blocks now that GPTQ holds half as much (ran out of memory in session 26)
. .gpu/pre.sh "$@"
. .gpu/qf.sh
qf 24gb 24GB --replay-graphs off --overlap-blocks off
[ $(left) -gt 110 ] && qf overlap 24GB --replay-graphs off --overlap-blocks on
echo "left $(left) s"
