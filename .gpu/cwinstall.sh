# installs the CUTLASS DSL and flash-attn-4 from the unpacked bundle (.gpu/fetch_wheels.sh; pre.sh unpacks it) into
# /tmp/cwsite, once a machine (pip --target leaves the wheel's .pth unread, so its dsl_packages folder goes on the path
# by hand)
[ -d /tmp/cwsite/nvidia_cutlass_dsl ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target /tmp/cwsite /tmp/bundle/cw/*.whl \
  && export PYTHONPATH=$PYTHONPATH:/tmp/cwsite:/tmp/cwsite/nvidia_cutlass_dsl/dsl_packages \
  && python3 -c "import cutlass; print('cutlass dsl ok')"
