# issue 27 at 24 GB, one machine: today's default, the refinement capped at 10 steps, then the cap with the GIL's
# switch interval at 0.5 ms (three search workers and the replay thread share the interpreter; Python's default 5 ms)
. .gpu/pre.sh "$@"
. .gpu/qf.sh
qf 24gb 24GB --replay-graphs off --overlap-blocks off
[ $(left) -gt 130 ] && qf it10 24GB --replay-graphs off --overlap-blocks off --iterations 10
[ $(left) -gt 120 ] && qf it10si 24GB --replay-graphs off --overlap-blocks off --iterations 10 --switch-interval 0.5
echo "left $(left) s"
