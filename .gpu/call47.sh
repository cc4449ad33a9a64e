# a stash call with nothing else (carries one .cbN part of the wheel bundle: .gpu/fetch_wheels.sh)
. .gpu/pre.sh "$@"
