# issue 27's stretch (30 s) and the H200 figure, one machine (no DSL; may carry one .cwN part to stash): the 57-block
# run at 24 GB with today's defaults (the 10-step cap), then with replay graphs, which cut the replay thread by 28 %
# in session 26 when the search was the pace; the replays (51 s beside 40 s of groups) are the pace now
. .gpu/pre.sh "$@"
. .gpu/qf.sh
qf 24gb 24GB --replay-graphs off --overlap-blocks off
[ $(left) -gt 130 ] && qf graphs 24GB --replay-graphs on --overlap-blocks off
[ $(left) -gt 130 ] && qf 24gb2 24GB --replay-graphs off --overlap-blocks off
echo "left $(left) s"
