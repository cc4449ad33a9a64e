# run HERE (not on the device), after .gpu/fetch_wheels.sh: every wheel a device call needs (.whl/ and the CUTLASS
# DSL's from .cw1-.cw5) in one xz tarball, split into parts .cb1/, .cb2/, ... (git-ignored) each small enough to
# ride beside the repo (a carry holds 64 MiB; the parts are sized from the repo's size now, 100 kB to spare). The
# wheels go in re-zipped without compression so xz can squeeze them: 84 MB of wheels become ~73 MB, two parts with
# a ~30 MB repo, where .whl and five .cwN parts took five calls. .gpu/pre.sh unpacks them there once all have come.
set -e
tmp=$(mktemp -d) && mkdir -p $tmp/whl $tmp/cw
cat .cw1/part0 .cw2/part1 .cw3/part2 .cw4/part3 .cw5/part4 > $tmp/nvidia_cutlass_dsl_libs_cu12-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
(cd $tmp && md5sum -c --quiet $OLDPWD/.cw5/md5)
restore() { python3 - "$@" <<'PY'
import sys, zipfile
for src in sys.argv[2:]:
    out = f"{sys.argv[1]}/{src.rsplit('/', 1)[-1]}"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)  # before the record changes: read decompresses by it
            info.compress_type = zipfile.ZIP_STORED
            zout.writestr(info, data)
PY
}
restore $tmp/whl .whl/*.whl
restore $tmp/cw .cw5/*.whl $tmp/nvidia_cutlass_dsl_libs_cu12-*.whl
tar cf - -C $tmp whl cw | xz -T2 -9e > $tmp/bundle.tar.xz
repo=$( (git ls-files; git ls-files -o --exclude-standard) | tr '\n' '\0' | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
size=$(stat -c %s $tmp/bundle.tar.xz) room=$(( 64 * 1024 * 1024 - repo - 100000 ))  # 100 kB for .gpu/commit and the list
n=$(( (size + room - 1) / room )) && part=$(( (size + n - 1) / n ))  # as few parts as fit, of even sizes
rm -rf .cb? && (cd $tmp && split -b $part -d -a 1 bundle.tar.xz part && sha256sum bundle.tar.xz > sha256 && ls part? > order)
n=0; for f in $tmp/part?; do n=$((n + 1)); mkdir -p .cb$n && cp $f .cb$n/; done
cp $tmp/sha256 $tmp/order .cb$n/ && rm -rf $tmp
du -b .cb?
