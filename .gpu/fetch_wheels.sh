# run HERE (not on the device), in the repo root: every wheel a device call needs, in one xz tarball split into
# parts .cb1/, .cb2/, ... (git-ignored), each small enough to ride beside the repo in one carry (64 MiB; the parts
# are sized from the repo's size now, 100 kB to spare: rerun when the repo has grown). The wheels go in re-zipped
# without compression so xz can squeeze them: 84 MB of wheels become ~73 MB, two parts beside a ~30 MB repo (as
# downloaded they took five). .gpu/pre.sh unpacks them there once all have come.
set -e
P="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $P -d "$1" "${@:2}"; }
tmp=$(mktemp -d) && trap 'rm -rf $tmp' EXIT
# whl/: into /tmp/site on every call; cw/: the CUTLASS DSL, flash-attn-4 (on the same DSL) and what it imports, into
# /tmp/cwsite for the calls that use them (.gpu/cwinstall.sh)
get $tmp/dl/whl diffusers==0.42.1 importlib_metadata zipp torchao==0.18.0 ftfy wcwidth sageattention==1.0.6 apache-tvm-ffi==0.1.15.post2
get $tmp/dl/cw nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu12==4.8.1 \
  flash-attn-4==4.0.0b36 quack-kernels==0.6.5 einops==0.8.2 torch-c-dlpack-ext==0.1.5
python3 - $tmp/dl $tmp/pack <<'PY'
import pathlib, sys, zipfile
src, dst = map(pathlib.Path, sys.argv[1:])
for wheel in src.glob("*/*.whl"):
    out = dst / wheel.parent.name / wheel.name
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)  # before the record changes: read decompresses by it
            info.compress_type = zipfile.ZIP_STORED
            zout.writestr(info, data)
PY
tar cf - -C $tmp/pack whl cw | xz -T2 -9e > $tmp/bundle.tar.xz
repo=$( (git ls-files; git ls-files -o --exclude-standard) | tr '\n' '\0' | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
size=$(stat -c %s $tmp/bundle.tar.xz) room=$(( 64 * 1024 * 1024 - repo - 100000 ))  # 100 kB for .gpu/commit and the list
n=$(( (size + room - 1) / room )) && part=$(( (size + n - 1) / n ))  # as few parts as fit, of even sizes
rm -rf .cb? && (cd $tmp && split -b $part -d -a 1 bundle.tar.xz part && sha256sum bundle.tar.xz > sha256 && ls part? > order)
n=0; for f in $tmp/part?; do n=$((n + 1)); mkdir -p .cb$n && cp $f .cb$n/; done
cp $tmp/sha256 $tmp/order .cb$n/
du -b .cb?
