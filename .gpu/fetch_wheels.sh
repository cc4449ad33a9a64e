# run HERE (not on the device), in the repo root: the wheels the device calls carry (.whl/), and the CUTLASS DSL's
# in five ~20 MB parts (.cw1/-.cw5/; a call carries 64 MiB with the ~29 MB repo). Both folders are git-ignored.
# Then `bash .gpu/bundle.sh` packs them all into the two parts a fresh machine takes (.cb1/, .cb2/).
set -e
P="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $P -d "$1" "${@:2}"; }
mkdir -p .whl && get .whl diffusers==0.42.1 importlib_metadata zipp torchao==0.18.0 ftfy wcwidth sageattention==1.0.6 apache-tvm-ffi==0.1.15.post2
tmp=$(mktemp -d) && get $tmp nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu12==4.8.1
(cd $tmp && split -b 20000000 -d -a 1 nvidia_cutlass_dsl_libs_cu12-*.whl part && md5sum nvidia_cutlass_dsl_libs_cu12-*.whl > md5)
for i in 0 1 2 3 4; do mkdir -p .cw$((i+1)) && cp $tmp/part$i .cw$((i+1))/; done
cp $tmp/nvidia_cutlass_dsl-*.whl $tmp/nvidia_cutlass_dsl_libs_base-*.whl $tmp/nvidia_cutlass_dsl_libs_core-*.whl $tmp/md5 .cw5/
# flash-attn-4 (CuTe DSL, on the same DSL) and what it imports: installed with the DSL (.gpu/cwinstall.sh)
get .cw5 flash-attn-4==4.0.0b36 quack-kernels==0.6.5 einops==0.8.2 torch-c-dlpack-ext==0.1.5
du -sh .whl .cw?
