# issue 27 at 24 GB, one machine: today's default, the refinement capped at 10 steps, the cap with overlapped blocks
# (the landing between blocks: ~9.5 s of session 26's 81.8 were outside the groups' wall and the calibration), then
# that with the GIL's switch interval at 0.5 ms (three search workers and the replay thread share the interpreter)
. .gpu/pre.sh "$@"
. .gpu/qf.sh
qf 24gb 24GB --replay-graphs off --overlap-blocks off
[ $(left) -gt 130 ] && qf it10 24GB --replay-graphs off --overlap-blocks off --iterations 10
[ $(left) -gt 130 ] && qf it10ov 24GB --replay-graphs off --overlap-blocks on --iterations 10
[ $(left) -gt 130 ] && qf it10ovsi 24GB --replay-graphs off --overlap-blocks on --iterations 10 --switch-interval 0.5
echo "left $(left) s"
