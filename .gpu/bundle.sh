# run HERE (not on the device), after .gpu/fetch_wheels.sh: every wheel a device call needs (.whl/ and the CUTLASS
# DSL's from .cw1-.cw5) in one xz tarball split in two ~35 MB parts, .cb1/ and .cb2/ (git-ignored). The wheels go in
# re-zipped without compression so xz can squeeze them: 84 MB of wheels become ~65 MB, which two calls carry beside
# the ~30 MB repo (a carry holds 64 MiB) where .whl and five .cwN parts took five. .gpu/pre.sh unpacks them there.
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
rm -rf .cb1 .cb2 && mkdir -p .cb1 .cb2
half=$(( ($(stat -c %s $tmp/bundle.tar.xz) + 1) / 2 ))
(cd $tmp && split -b $half -d -a 1 bundle.tar.xz part && sha256sum bundle.tar.xz > sha256)
cp $tmp/part0 .cb1/ && cp $tmp/part1 $tmp/sha256 .cb2/ && rm -rf $tmp
du -b .cb1 .cb2
