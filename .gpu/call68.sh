# session 33's review mends on a GPU (carries .cw5 after the four stash calls; flash-attn-4 installs with the DSL):
# the attention GPU tests (flash-attn-4's op and optimize's choice in CUDA graphs, INT8 attention, optimize), then
# what optimize's attention="auto" picks at FLUX's shape
. .gpu/pre.sh "$1"
. .gpu/cwinstall.sh || exit 1
gtest 300 tests/test_flash4_attention.py tests/test_int8_attention.py tests/test_optimize.py | tail -4
python3 -c "
import torch
from svdquant.pipelines.optimize import _time_attention
for graphs in (True, False):
    print('graphs', graphs, _time_attention(24, 128, 4096, torch.bfloat16, torch.device('cuda'), True, graphs))
"
