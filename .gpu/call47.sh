# a stash call with nothing else (carries one .cwN part of the CUTLASS DSL)
. .gpu/pre.sh "$@"
