# issue 27 at 24 GB on the H200, one machine: today's default (after the calibration's transfer cuts), then the
# refinement capped at 10 steps (random FLUX-width weights take 0-49 per group, 4,607 in all; a cap of 10 keeps 46 %)
. .gpu/pre.sh "$@"
. .gpu/qf.sh
qf 24gb 24GB --replay-graphs off --overlap-blocks off
[ $(left) -gt 120 ] && qf it10 24GB --replay-graphs off --overlap-blocks off --iterations 10
echo "left $(left) s"
