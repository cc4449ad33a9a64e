# installs the CUTLASS DSL into /tmp/cwsite: from the unpacked bundle (.gpu/bundle.sh's parts, see pre.sh), or
# else from the five stashed .cwN parts (after every part has been carried once)
# (pip --target leaves the wheel's .pth unread, so its dsl_packages folder goes on the path by hand)
if [ -d /tmp/bundle/cw ]; then
  [ -d /tmp/cwsite/nvidia_cutlass_dsl ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/cwsite /tmp/bundle/cw/*.whl
else
  (cd /tmp/cwstash && cat part0 part1 part2 part3 part4 > nvidia_cutlass_dsl_libs_cu12-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl && md5sum -c md5) && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/cwsite /tmp/cwstash/*.whl
fi && export PYTHONPATH=$PYTHONPATH:/tmp/cwsite:/tmp/cwsite/nvidia_cutlass_dsl/dsl_packages && python3 -c "import cutlass; print('cutlass dsl ok')"
