# sourced by every .gpu/callNN.sh: the carried bundle's wheels into /tmp/site, the repo on the path, timing helpers
export PYTHONPATH=/tmp/site:$PWD SVDQUANT_COMMIT=$(cat .gpu/commit) PYTHONUNBUFFERED=1
T0=$(date +%s); LIMIT=${1:-590}
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt 2>&1
echo "commit $SVDQUANT_COMMIT; $(python3 -c 'import torch,triton;print(torch.__version__,triton.__version__)')"
# the whole pytest output goes to $OUT/pytest.log too (callers keep only its tail: a failure's reason stays readable)
gtest() { timeout $1 python3 -m pytest -p no:logging -p no:cacheprovider -o addopts="" -m gpu -q "${@:2}" 2>&1 | tee -a $OUT/pytest.log; echo "pytest rc=${PIPESTATUS[0]}"; }
# every wheel in one xz tarball in parts (.gpu/fetch_wheels.sh), one a call: stashed, then unpacked once all are here (the
# last part carries the list of parts and the checksum)
mkdir -p /tmp/cbstash; for d in .cb?; do [ -d "$d" ] && cp -n $d/* /tmp/cbstash/ 2>/dev/null; done; echo "bundle parts stashed: $(ls /tmp/cbstash | tr "\n" " ")"
if [ -f /tmp/cbstash/order ] && (cd /tmp/cbstash && ls $(cat order) >/dev/null 2>&1) && [ ! -d /tmp/bundle/cw ]; then
  (cd /tmp/cbstash && cat $(cat order) > bundle.tar.xz && sha256sum -c --quiet sha256) \
    && python3 -c "import tarfile; tarfile.open('/tmp/cbstash/bundle.tar.xz', 'r:xz').extractall('/tmp/bundle', filter='data')" \
    && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      /tmp/bundle/whl/*.whl >/dev/null 2>&1 && echo "bundle unpacked" || echo "bundle unpack failed"
fi
