# carries one part of the CUTLASS DSL wheel to the warm machine (pre.sh stashes it); nothing else
. .gpu/pre.sh "$@"
