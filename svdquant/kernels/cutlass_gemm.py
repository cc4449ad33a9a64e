"""The Hopper (sm_90a) INT8 GEMM in NVIDIA's CuTe DSL: the fused linear's GEMM on H100 / H200.

``Y[M, N] = (A[M, K] · W[N, K]ᵀ, int8 × int8 → int32) · a_scale[M] · w_scale[N] (+ lora_act · lora_upᵀ) (+ bias)``,
then optionally tanh-GELU, in fp32, stored as bf16 / fp16 (or the raw int32 product, to check the main loop
exactly); A and W K-major, as ``torch._int_mm(a, w.t())`` takes them. The rank-R branch's operands are bf16 (this
DSL's warpgroup MMAs take no tf32) and a second wgmma adds them straight into the scaled fp32 accumulators. The
semantics of :func:`svdquant.kernels.int8_gemm.int8_gemm` (Triton), which it replaces on sm_90 where it applies
(:mod:`svdquant.kernels.cutlass_launch`): on an H200 it ran at 1.01-1.25x bare FP8 row-wise ``torch._scaled_mm``
at FLUX.1's shapes with the branch, where the Triton kernel reached 0.76-1.03x (BENCHMARKS.md).

The structure of CUTLASS's sm90 warp-specialized persistent "cooperative" GEMM: warpgroup 0 gives its registers
away and one of its warps issues the TMA loads of A and W k-tiles into a ring of shared-memory stages guarded by
mbarriers (``PipelineTmaAsync``); warpgroups 1 and 2 run ``wgmma.mma_async`` s8 · s8 → s32 on each stage, each
owning half of the tile's rows; a static persistent scheduler hands every CTA (one per SM, or clusters of them)
its output tiles in turn. The epilogue scales the accumulators in registers, stages them in shared memory and
stores them with TMA. Clusters of 2 along M multicast W's tile to both CTAs.

API usage and the epilogue's staging follow NVIDIA's example ``examples/python/CuTeDSL/cute/hopper/kernel/
dense_gemm/dense_gemm_persistent.py``, specialised to K-major int8 operands, int32 accumulators and the scales.
"""

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
import cutlass.utils as utils
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass.cute.nvgpu import cpasync, warpgroup
from cutlass.pipeline import pipeline_init_arrive, pipeline_init_wait
from cutlass.tensor_utils import LayoutEnum

ROW_MAJOR = LayoutEnum.ROW_MAJOR  # A [M, K], W [N, K], Y [M, N], lora [*, R]: the last mode contiguous in all
K_MAJOR = ROW_MAJOR.sm90_mma_major_mode()
K_TILE = 128  # int8 k-tile: one 128-byte swizzle row per operand row, 4 wgmma k-steps of 32
WG_THREADS = 128
MMA_WARPGROUPS = 2
EPI_TILE = (128, 32)  # rows of both consumer warpgroups × 32 columns per TMA store
EPI_STAGES = 4
BARRIER_BYTES = 1024  # mbarriers and the 1 KiB alignment of the operand buffers
LOAD_REGS, MMA_REGS = 40, 232  # setmaxnreg: 128 × 40 + 256 × 232 fits the 64 K registers of an SM
OUT_DTYPES = {"bf16": cutlass.BFloat16, "fp16": cutlass.Float16, "int32": cutlass.Int32}
GELU_C = 0.7978845608028654  # sqrt(2 / pi), diffusers' tanh GELU


def make_mma(ab_dtype, acc_dtype, bn):
    """Both consumer warpgroups stacked along M, each a 64 × bn wgmma; a 256-row tile repeats the pair twice."""
    return sm90_utils.make_trivial_tiled_mma(ab_dtype, ab_dtype, K_MAJOR, K_MAJOR, acc_dtype, (MMA_WARPGROUPS, 1, 1),
                                             tiler_mn=(64, bn))


def make_copy_r2s(tiled_mma, out_dtype):
    """Accumulator registers → a shared-memory sub-tile: stmatrix for 16-bit outputs, plain stores otherwise."""
    return cute.make_tiled_copy_S(
        sm90_utils.get_smem_store_op(ROW_MAJOR, out_dtype, cutlass.Int32),
        cute.make_tiled_copy_C_atom(cute.make_copy_atom(cute.nvgpu.warp.StMatrix8x8x16bOp(False, 4), out_dtype),
                                    tiled_mma))


class Int8GemmSm90:
    """One tile configuration: ``tile_mn`` the CTA's output tile, ``cluster_mn`` CTAs per cluster (2 along M share
    W's tile through TMA multicast), ``out`` ``"bf16"`` / ``"fp16"`` (scaled) or ``"int32"`` (raw product),
    ``rank`` of the low-rank branch (0: none), ``bias``: a bias's dtype name (``"bf16"`` / ``"fp16"``) or None,
    ``gelu``: tanh-GELU last, ``swizzle`` the scheduler's grouping of clusters (1: a plain walk), ``raster_m``
    the walk's order: down M first (the CTAs at work share W's tiles and sweep all of A) or along N first (they
    share A's rows and sweep all of W). Whichever operand is swept should fit L2 (see
    :func:`svdquant.kernels.cutlass_launch.plan`)."""

    def __init__(self, tile_mn=(128, 256), cluster_mn=(1, 1), out="bf16", rank=0, swizzle=1, bias=None,
                 gelu=False, raster_m=True):
        bm, bn = tile_mn
        # Each consumer thread holds bm · bn / 256 int32 accumulators: 128 at 128 × 256 and 256 × 128
        if bm not in (128, 256) or bn not in (128, 256) or bm * bn > 128 * 256:
            raise ValueError(f"tile {tile_mn}: M and N in 128 / 256, at most 128 × 256 elements")
        if cluster_mn not in ((1, 1), (2, 1), (1, 2), (2, 2)):
            raise ValueError(f"cluster {cluster_mn}: 1 or 2 CTAs along M and N")
        if out not in OUT_DTYPES or ((rank or bias or gelu) and out == "int32"):
            raise ValueError(f"out {out!r}: one of {sorted(OUT_DTYPES)}, a 16-bit one with a branch, bias or GELU")
        if bias not in (None, "bf16", "fp16"):
            raise ValueError(f"bias {bias!r}: 'bf16', 'fp16' or None")
        # bf16 wgmma k-steps of 16; 64 bf16 fill one 128-byte swizzle row, a rank of 128 two (its operands take
        # 96 KB of shared memory at 128 x 256, leaving 2 pipeline stages; 64 KB and 4 stages at 128 x 128)
        if rank % 16 or not 0 <= rank <= 128:
            raise ValueError(f"rank {rank}: a multiple of 16 up to 128")
        self.tile_mnk = (bm, bn, K_TILE)
        self.cluster_mn = cluster_mn
        self.out_dtype = OUT_DTYPES[out]
        self.rank = rank
        self.bias_dtype = OUT_DTYPES[bias] if bias else None
        self.gelu = gelu
        self.swizzle = swizzle
        self.raster_m = raster_m
        self.mcast_a = cluster_mn[1]  # the CTAs of one cluster row read the same A (and lora_act) tile
        self.mcast_b = cluster_mn[0]  # those of one cluster column the same W (and lora_up) tile
        self.threads = (1 + MMA_WARPGROUPS) * WG_THREADS
        fixed = BARRIER_BYTES + EPI_TILE[0] * EPI_TILE[1] * self.out_dtype.width // 8 * EPI_STAGES
        fixed += (bm + bn) * rank * 2  # one bf16 buffer of the branch's operands, reloaded per tile
        stage = (bm + bn) * K_TILE
        # 227 KiB per CTA on sm_90, one CTA per SM
        self.ab_stage = (utils.get_smem_capacity_in_bytes("sm_90") - fixed) // stage
        self.smem_bytes = fixed + self.ab_stage * stage
        if self.ab_stage < 2:
            raise ValueError(f"tile {tile_mn}: {self.ab_stage} pipeline stage(s) fit shared memory")

    def problem_error(self, m, n, k):
        """Why this configuration cannot run an [m, k] × [n, k]ᵀ problem, or None. TMA clips partial tiles (loads
        zero-fill, stores drop), but the scales and the bias are read without bounds checks: the launcher pads
        them to whole tiles (:func:`svdquant.kernels.cutlass_launch.pad_to`). Rows must start 16-byte aligned."""
        if k % 16 or n % 8:
            return f"K={k} must be a multiple of 16 and N={n} of 8 (TMA's 16-byte row alignment)"
        # The scheduler hands out whole clusters, and a swizzled walk rounds the grouped cluster count up: the
        # epilogue of a tile past the end would read scales out of bounds
        for dim, size, tile, per_cluster in (("M", m, self.tile_mnk[0], self.cluster_mn[0]),
                                             ("N", n, self.tile_mnk[1], self.cluster_mn[1])):
            tiles = -(-size // tile)
            if tiles % per_cluster:
                return f"cluster {self.cluster_mn}: {dim}={size} is not a whole number of clusters"
            grouped = dim == ("N" if self.raster_m else "M")
            if grouped and self.swizzle > 1 and tiles // per_cluster % self.swizzle:
                return f"swizzle {self.swizzle}: {dim}={size} is not a whole number of groups"
        return None

    @cute.jit
    def __call__(self, a: cute.Tensor, w: cute.Tensor, a_scale: cute.Tensor, w_scale: cute.Tensor, y: cute.Tensor,
                 lora_act, lora_up, bias, max_active_clusters: cutlass.Constexpr, stream: cuda.CUstream):
        """``lora_act`` [M, R] / ``lora_up`` [N, R] bf16 tensors with ``rank`` R, else None; ``bias`` [N] of the
        configured dtype, else None. ``a_scale``, ``w_scale`` and ``bias`` hold whole tiles (padded)."""
        if cutlass.const_expr(a.element_type != cutlass.Int8 or w.element_type != cutlass.Int8):
            raise TypeError(f"A and W must be int8, got {a.element_type} and {w.element_type}")
        if cutlass.const_expr(y.element_type != self.out_dtype):
            raise TypeError(f"Y must be {self.out_dtype}, got {y.element_type}")
        for t in (a, w, y):  # int8 wgmma reads only K-major operands from shared memory
            if cutlass.const_expr(LayoutEnum.from_tensor(t) != ROW_MAJOR):
                raise ValueError("A, W and Y must be row-major (last mode contiguous)")
        bm, bn, bk = self.tile_mnk
        tiled_mma = make_mma(cutlass.Int8, cutlass.Int32, bn)
        a_smem = sm90_utils.make_smem_layout_a(ROW_MAJOR, self.tile_mnk, cutlass.Int8, self.ab_stage)
        b_smem = sm90_utils.make_smem_layout_b(ROW_MAJOR, self.tile_mnk, cutlass.Int8, self.ab_stage)
        epi_smem = sm90_utils.make_smem_layout_epi(self.out_dtype, ROW_MAJOR, EPI_TILE, EPI_STAGES)
        tma_a, tma_ga = self._tma_load(a, a_smem, (bm, bk), self.mcast_a)
        tma_b, tma_gb = self._tma_load(w, b_smem, (bn, bk), self.mcast_b)
        tma_y, tma_gy = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileS2GOp(), y, cute.slice_(epi_smem, (None, None, 0)), EPI_TILE)
        lora = (None,) * 7  # the branch's MMA, shared-memory layouts, TMA atoms and tensors
        if cutlass.const_expr(self.rank > 0):
            lora_tile = (bm, bn, self.rank)
            la_smem = sm90_utils.make_smem_layout_a(ROW_MAJOR, lora_tile, cutlass.BFloat16, 1)
            lu_smem = sm90_utils.make_smem_layout_b(ROW_MAJOR, lora_tile, cutlass.BFloat16, 1)
            lora = (make_mma(cutlass.BFloat16, cutlass.Float32, bn), la_smem, lu_smem,
                    *self._tma_load(lora_act, la_smem, (bm, self.rank), self.mcast_a),
                    *self._tma_load(lora_up, lu_smem, (bn, self.rank), self.mcast_b))
        tiles = cute.zipped_divide(y, tiler=(bm, bn))[(0, (None, None))].shape
        sched = utils.PersistentTileSchedulerParams(
            (tiles[0], tiles[1], 1), (*self.cluster_mn, 1), self.swizzle, self.raster_m)
        grid = utils.StaticPersistentTileScheduler.get_grid_shape(sched, max_active_clusters)
        self.shared_storage = self._shared_storage(a_smem, b_smem, epi_smem, lora[1], lora[2])
        self.kernel(tma_a, tma_ga, tma_b, tma_gb, tma_y, tma_gy, a_scale, w_scale, bias, tiled_mma,
                    cute.make_layout((*self.cluster_mn, 1)), a_smem, b_smem, epi_smem, sched, *lora).launch(
            grid=grid, block=[self.threads, 1, 1], cluster=(*self.cluster_mn, 1), min_blocks_per_mp=1,
            stream=stream)

    @staticmethod
    def _tma_load(t, smem_staged, tile, mcast):
        op = cpasync.CopyBulkTensorTileG2SOp() if mcast == 1 else cpasync.CopyBulkTensorTileG2SMulticastOp()
        return cpasync.make_tiled_tma_atom(op, t, cute.slice_(smem_staged, (None, None, 0)), tile,
                                           num_multicast=mcast)

    def _shared_storage(self, a_smem, b_smem, epi_smem, la_smem, lu_smem):
        """The CTA's shared memory: the rings' mbarriers, then 1 KiB-aligned buffers (swizzle atoms repeat every
        1 KiB at most); the branch's buffers shrink to nothing without it."""
        la_size, lu_size, lora_align = (cute.cosize(la_smem), cute.cosize(lu_smem), 1024) if self.rank else (1, 1, 2)

        @cute.struct
        class SharedStorage:
            ab_barriers: cute.struct.MemRange[cutlass.Int64, self.ab_stage * 2]
            lora_barriers: cute.struct.MemRange[cutlass.Int64, 2]
            sA: cute.struct.Align[cute.struct.MemRange[cutlass.Int8, cute.cosize(a_smem)], 1024]
            sB: cute.struct.Align[cute.struct.MemRange[cutlass.Int8, cute.cosize(b_smem)], 1024]
            sY: cute.struct.Align[cute.struct.MemRange[self.out_dtype, cute.cosize(epi_smem)], 1024]
            sLa: cute.struct.Align[cute.struct.MemRange[cutlass.BFloat16, la_size], lora_align]
            sLu: cute.struct.Align[cute.struct.MemRange[cutlass.BFloat16, lu_size], lora_align]

        self.smem_bytes = SharedStorage.size_in_bytes()
        if self.smem_bytes > utils.get_smem_capacity_in_bytes("sm_90"):
            raise ValueError(f"{self.smem_bytes} bytes of shared memory per CTA, over sm_90's")
        return SharedStorage

    def _tma_pipeline(self, barriers, stages, cta_layout, *smem_stage_layouts):
        """A TMA → wgmma ring; each consumer warp releases a stage to every CTA that multicast into it."""
        mcast = self.mcast_a + self.mcast_b - 1
        return pipeline.PipelineTmaAsync.create(
            barrier_storage=barriers, num_stages=stages,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread),
            consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, mcast * MMA_WARPGROUPS * 4),
            tx_count=sum(cute.size_in_bytes(dt, cute.slice_(sl, (None, None, 0))) for dt, sl in smem_stage_layouts),
            cta_layout_vmnk=cute.make_layout((1, *cta_layout.shape)), defer_sync=True)

    @cute.kernel
    def kernel(self, tma_a: cute.CopyAtom, mA: cute.Tensor, tma_b: cute.CopyAtom, mB: cute.Tensor,
               tma_y: cute.CopyAtom, mY: cute.Tensor, mAs: cute.Tensor, mWs: cute.Tensor, mBias,
               tiled_mma: cute.TiledMma,
               cta_layout: cute.Layout, a_smem: cute.ComposedLayout, b_smem: cute.ComposedLayout,
               epi_smem: cute.ComposedLayout, sched: utils.PersistentTileSchedulerParams, lora_mma, la_smem,
               lu_smem, tma_la, mLa, tma_lu, mLu):
        tidx, _, _ = cute.arch.thread_idx()
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        if warp_idx == 0:
            cpasync.prefetch_descriptor(tma_a)
            cpasync.prefetch_descriptor(tma_b)
            cpasync.prefetch_descriptor(tma_y)
        storage = utils.SmemAllocator().allocate(self.shared_storage)
        ab_pipe = self._tma_pipeline(storage.ab_barriers.data_ptr(), self.ab_stage, cta_layout,
                                     (cutlass.Int8, a_smem), (cutlass.Int8, b_smem))
        bm, bn, bk = self.tile_mnk
        lora = None  # (pipeline, sLa, sLu, gLa, gLu) of the low-rank branch
        if cutlass.const_expr(self.rank > 0):
            lora = (self._tma_pipeline(storage.lora_barriers.data_ptr(), 1, cta_layout,
                                       (cutlass.BFloat16, la_smem), (cutlass.BFloat16, lu_smem)),
                    storage.sLa.get_tensor(la_smem.outer, swizzle=la_smem.inner),
                    storage.sLu.get_tensor(lu_smem.outer, swizzle=lu_smem.inner),
                    cute.local_tile(mLa, (bm, self.rank), (None, None)),
                    cute.local_tile(mLu, (bn, self.rank), (None, None)))
        # The barriers' init must be visible cluster-wide before any CTA's TMA can signal them
        pipeline_init_arrive(cluster_shape_mn=self.cluster_mn, is_relaxed=True)
        sA = storage.sA.get_tensor(a_smem.outer, swizzle=a_smem.inner)
        sB = storage.sB.get_tensor(b_smem.outer, swizzle=b_smem.inner)
        sY = storage.sY.get_tensor(epi_smem.outer, swizzle=epi_smem.inner)
        gA = cute.local_tile(mA, (bm, bk), (None, None))  # (bM, bK, tiles M, tiles K)
        gB = cute.local_tile(mB, (bn, bk), (None, None))
        gY = cute.local_tile(mY, (bm, bn), (None, None))  # (bM, bN, tiles M, tiles N)
        # The scales as [M, N] views with a zero stride, partitioned like the accumulators: every accumulator
        # element meets its own row's and column's scale whatever the wgmma register layout is
        m, n = mAs.shape[0], mWs.shape[0]
        gAs = cute.local_tile(cute.make_tensor(mAs.iterator, cute.make_layout((m, n), stride=(1, 0))),
                              (bm, bn), (None, None))
        gWs = cute.local_tile(cute.make_tensor(mWs.iterator, cute.make_layout((m, n), stride=(0, 1))),
                              (bm, bn), (None, None))
        gBias = None
        if cutlass.const_expr(self.bias_dtype is not None):
            gBias = cute.local_tile(cute.make_tensor(mBias.iterator, cute.make_layout((m, n), stride=(0, 1))),
                                    (bm, bn), (None, None))
        pipeline_init_wait(cluster_shape_mn=self.cluster_mn)
        wg_idx = cute.arch.make_warp_uniform(tidx // WG_THREADS)
        if wg_idx == 0:
            cute.arch.setmaxregister_decrease(LOAD_REGS)
            if warp_idx == 0:
                self.producer(tma_a, tma_b, sA, sB, gA, gB, ab_pipe, cta_layout, sched, tma_la, tma_lu, lora)
        else:
            cute.arch.setmaxregister_increase(MMA_REGS)
            self.consumer(tiled_mma, tma_y, sA, sB, sY, gY, gAs, gWs, gBias, ab_pipe, sched, cute.size(gA, mode=[3]),
                          tidx - WG_THREADS, wg_idx - 1, warp_idx, lora_mma, lora)

    @cute.jit
    def producer(self, tma_a, tma_b, sA, sB, gA, gB, ab_pipe, cta_layout, sched_params, tma_la, tma_lu, lora):
        """The load warp: for each of its tiles every k-tile of A's and W's rows into the next free stage, then the
        tile's low-rank operands into their own one-stage ring."""
        crd = cta_layout.get_flat_coord(cute.arch.make_warp_uniform(cute.arch.block_idx_in_cluster()))
        a_mask = cute.make_layout_image_mask(cta_layout, crd, mode=1)  # the cluster row sharing this A tile
        b_mask = cute.make_layout_image_mask(cta_layout, crd, mode=0)
        a_mask = a_mask if self.mcast_a > 1 else 0
        b_mask = b_mask if self.mcast_b > 1 else 0
        # With multicast each CTA loads its slice of the shared tile and sends it to all of them
        a_cta = (crd[1], cute.make_layout(cute.slice_(cta_layout, (0, None, 0)).shape))
        b_cta = (crd[0], cute.make_layout(cute.slice_(cta_layout, (None, 0, 0)).shape))
        tAsA, tAgA = cpasync.tma_partition(tma_a, *a_cta, cute.group_modes(sA, 0, 2), cute.group_modes(gA, 0, 2))
        tBsB, tBgB = cpasync.tma_partition(tma_b, *b_cta, cute.group_modes(sB, 0, 2), cute.group_modes(gB, 0, 2))
        if cutlass.const_expr(self.rank > 0):
            lora_pipe, sLa, sLu, gLa, gLu = lora
            tLsLa, tLgLa = cpasync.tma_partition(tma_la, *a_cta, cute.group_modes(sLa, 0, 2),
                                                 cute.group_modes(gLa, 0, 2))
            tLsLu, tLgLu = cpasync.tma_partition(tma_lu, *b_cta, cute.group_modes(sLu, 0, 2),
                                                 cute.group_modes(gLu, 0, 2))
            lora_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, 1)
        k_tiles = cute.size(gA, mode=[3])
        tile_sched = utils.StaticPersistentTileScheduler.create(
            sched_params, cute.arch.block_idx(), cute.arch.grid_dim())
        work = tile_sched.initial_work_tile_info()
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.ab_stage)
        while work.is_valid_tile:
            tm, tn = work.tile_idx[0], work.tile_idx[1]
            tAgA_m = tAgA[(None, tm, None)]
            tBgB_n = tBgB[(None, tn, None)]
            state.reset_count()  # count: the k-tile; index / phase: the ring position, carried across tiles
            for _k in range(k_tiles):
                ab_pipe.producer_acquire(state)  # waits for the stage to be empty, arms its tx-count barrier
                bar = ab_pipe.producer_get_barrier(state)
                cute.copy(tma_a, tAgA_m[(None, state.count)], tAsA[(None, state.index)], tma_bar_ptr=bar,
                          mcast_mask=a_mask)
                cute.copy(tma_b, tBgB_n[(None, state.count)], tBsB[(None, state.index)], tma_bar_ptr=bar,
                          mcast_mask=b_mask)
                ab_pipe.producer_commit(state)
                state.advance()
            if cutlass.const_expr(self.rank > 0):  # after the k-tiles: the consumers need it after them too
                lora_pipe.producer_acquire(lora_state)
                bar = lora_pipe.producer_get_barrier(lora_state)
                cute.copy(tma_la, tLgLa[(None, tm, 0)], tLsLa[(None, 0)], tma_bar_ptr=bar, mcast_mask=a_mask)
                cute.copy(tma_lu, tLgLu[(None, tn, 0)], tLsLu[(None, 0)], tma_bar_ptr=bar, mcast_mask=b_mask)
                lora_state.advance()
            tile_sched.advance_to_next_work()
            work = tile_sched.get_current_work()
        ab_pipe.producer_tail(state)  # a CTA must not exit while its multicast peers may still signal it
        if cutlass.const_expr(self.rank > 0):
            lora_pipe.producer_tail(lora_state)

    @cute.jit
    def consumer(self, tiled_mma, tma_y, sA, sB, sY, gY, gAs, gWs, gBias, ab_pipe, sched_params, k_tiles, ctid,
                 mma_wg, warp_idx, lora_mma, lora):
        """The two MMA warpgroups (``ctid`` 0-255 among them): main loop, then the scaled epilogue, per tile."""
        # wgmma operands are shared-memory descriptors per warpgroup; the accumulators are per thread
        wg_mma = tiled_mma.get_slice(mma_wg * WG_THREADS)
        thr_mma = tiled_mma.get_slice(ctid)
        tCrA = tiled_mma.make_fragment_A(wg_mma.partition_A(sA))
        tCrB = tiled_mma.make_fragment_B(wg_mma.partition_B(sB))
        acc = cute.make_rmem_tensor(thr_mma.partition_C(gY).shape[:3], cutlass.Int32)
        copy_r2s = make_copy_r2s(tiled_mma, self.out_dtype)
        store_pipe = pipeline.PipelineTmaStore.create(
            num_stages=EPI_STAGES, producer_group=pipeline.CooperativeGroup(
                pipeline.Agent.Thread, MMA_WARPGROUPS * WG_THREADS))
        tiled_mma.set(warpgroup.Field.ACCUMULATE, True)  # the accumulators are zeroed per tile instead
        if cutlass.const_expr(self.rank > 0):
            lora_pipe, sLa, sLu = lora[0], lora[1], lora[2]
            wg_lora = lora_mma.get_slice(mma_wg * WG_THREADS)
            tCrLa = lora_mma.make_fragment_A(wg_lora.partition_A(sLa))
            tCrLu = lora_mma.make_fragment_B(wg_lora.partition_B(sLu))
            lora_mma.set(warpgroup.Field.ACCUMULATE, True)  # onto the scaled main product
            lora_read = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, 1)
        tile_sched = utils.StaticPersistentTileScheduler.create(
            sched_params, cute.arch.block_idx(), cute.arch.grid_dim())
        work = tile_sched.initial_work_tile_info()
        read = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.ab_stage)
        release = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.ab_stage)
        while work.is_valid_tile:
            tm, tn = work.tile_idx[0], work.tile_idx[1]
            read, release = self.mainloop(tiled_mma, acc, tCrA, tCrB, ab_pipe, read, release, k_tiles)
            if cutlass.const_expr(self.out_dtype == cutlass.Int32):
                out = acc
            else:
                out = self.scale(acc, thr_mma.partition_C(gAs[(None, None, tm, tn)]),
                                 thr_mma.partition_C(gWs[(None, None, tm, tn)]))
            if cutlass.const_expr(self.rank > 0):
                lora_read = self.low_rank(lora_mma, out, tCrLa, tCrLu, lora_pipe, lora_read)
            if cutlass.const_expr(self.bias_dtype is not None):
                self.add_bias(out, thr_mma.partition_C(gBias[(None, None, tm, tn)]))
            if cutlass.const_expr(self.gelu):
                self.apply_gelu(out)
            self.store_tile(out, copy_r2s, copy_r2s.get_slice(ctid), tma_y, sY, gY[(None, None, tm, tn)],
                            store_pipe, tile_sched.num_tiles_executed, warp_idx)
            tile_sched.advance_to_next_work()
            work = tile_sched.get_current_work()
        store_pipe.producer_tail()

    @cute.jit
    def mainloop(self, tiled_mma, acc, tCrA, tCrB, ab_pipe, read, release, k_tiles):
        """All k-tiles of one output tile into ``acc``, one wgmma batch in flight: a stage goes back to the producer
        as soon as the batch that read it has retired."""
        read.reset_count()
        release.reset_count()
        acc.fill(0)
        warpgroup.fence()
        k_blocks = cute.size(tCrA, mode=[2])
        ab_pipe.consumer_wait(read)  # k-tile 0: nothing older to retire (K >= 128)
        for kb in cutlass.range_constexpr(k_blocks):
            cute.gemm(tiled_mma, acc, tCrA[(None, None, kb, read.index)], tCrB[(None, None, kb, read.index)], acc)
        warpgroup.commit_group()
        read.advance()
        for _k in range(1, k_tiles):
            ab_pipe.consumer_wait(read)
            for kb in cutlass.range_constexpr(k_blocks):
                cute.gemm(tiled_mma, acc, tCrA[(None, None, kb, read.index)], tCrB[(None, None, kb, read.index)],
                          acc)
            warpgroup.commit_group()
            warpgroup.wait_group(1)  # the previous k-tile's batch is done reading its stage
            ab_pipe.consumer_release(release)
            release.advance()
            read.advance()
        warpgroup.wait_group(0)
        ab_pipe.consumer_release(release)
        release.advance()
        return read, release

    @cute.jit
    def scale(self, acc, tCgAs, tCgWs):
        """``acc · a_scale[row] · w_scale[col]`` in fp32, in the order of the torch reference (so equal to it bit
        for bit before the bf16 rounding). The compiler merges the repeated loads of a scale: the PTX has one load
        per distinct row and one 8-byte load per column pair."""
        out = cute.make_rmem_tensor(acc.shape, cutlass.Float32)  # the same compact layout as ``acc``
        for i in cutlass.range_constexpr(cute.size(acc)):
            out[i] = cutlass.Float32(acc[i]) * tCgAs[i] * tCgWs[i]
        return out

    @cute.jit
    def add_bias(self, out, tCgBias):
        for i in cutlass.range_constexpr(cute.size(out)):
            out[i] = out[i] + cutlass.Float32(tCgBias[i])

    @cute.jit
    def apply_gelu(self, out):
        """diffusers' tanh GELU, ``0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x³)))``, as the Triton kernel's."""
        for i in cutlass.range_constexpr(cute.size(out)):
            x = out[i]
            out[i] = 0.5 * x * (1.0 + cute.math.tanh(GELU_C * (x + 0.044715 * x * x * x), fastmath=True))

    @cute.jit
    def low_rank(self, lora_mma, out, tCrLa, tCrLu, lora_pipe, lora_read):
        """``out += lora_act · lora_upᵀ`` for the tile: a bf16 wgmma whose fp32 accumulators are ``out`` itself
        (same 64 × bn atoms and warpgroup layout as the main product, so the same register layout)."""
        lora_pipe.consumer_wait(lora_read)
        warpgroup.fence()  # ``out`` was written by ordinary instructions
        for kb in cutlass.range_constexpr(cute.size(tCrLa, mode=[2])):
            cute.gemm(lora_mma, out, tCrLa[(None, None, kb, 0)], tCrLu[(None, None, kb, 0)], out)
        warpgroup.commit_group()
        warpgroup.wait_group(0)
        lora_pipe.consumer_release(lora_read)
        lora_read.advance()
        return lora_read

    @cute.jit
    def store_tile(self, src, copy_r2s, thr_r2s, tma_y, sY, gY_tile, store_pipe, tiles_done, warp_idx):
        """Registers → shared memory (stmatrix for bf16) → global (TMA store), one 128 × 32 sub-tile at a time
        through a ring of ``EPI_STAGES`` buffers, as the CUTLASS example does."""
        tRS_sY = thr_r2s.partition_D(sY)  # (R2S, R2S_M, R2S_N, EPI_STAGES)
        tRS_src = copy_r2s.retile(src)
        rd_shape = cute.shape(thr_r2s.partition_S(sY))[:3]
        tRS_r = cute.make_rmem_tensor(rd_shape, src.element_type)
        tRS_out = cute.make_rmem_tensor(rd_shape, self.out_dtype)
        per_sub = cute.size(tRS_r)
        gY_epi = cute.zipped_divide(gY_tile, EPI_TILE)  # ((128, 32), (sub-tiles M, sub-tiles N))
        bSG_sY, bSG_gY = cpasync.tma_partition(tma_y, 0, cute.make_layout(1), cute.group_modes(sY, 0, 2), gY_epi)
        sub_shape = gY_epi.shape[1]
        # The retiled registers hold the sub-tiles N-fastest within each 128-row band, matching this row-major
        # walk (checked by check_epilogue_mapping)
        sub_order = cute.make_layout(sub_shape, stride=(sub_shape[1], 1))
        bar = pipeline.NamedBarrier(barrier_id=1, num_threads=MMA_WARPGROUPS * WG_THREADS)
        for s in cutlass.range_constexpr(cute.size(sub_shape)):
            for v in cutlass.range_constexpr(per_sub):
                tRS_r[v] = tRS_src[s * per_sub + v]
            tRS_out.store(tRS_r.load().to(self.out_dtype))
            buf = (tiles_done * cute.size(sub_shape) + s) % EPI_STAGES
            cute.copy(copy_r2s, tRS_out, tRS_sY[(None, None, None, buf)])
            # generic-proxy shared-memory writes must be visible to the async proxy (TMA) before it reads them
            cute.arch.fence_proxy("async.shared", space="cta")
            bar.arrive_and_wait()
            if warp_idx == WG_THREADS // 32:  # the first consumer warp issues the store
                cute.copy(tma_y, bSG_sY[(None, buf)], bSG_gY[(None, sub_order.get_hier_coord(s))])
                store_pipe.producer_commit()
                store_pipe.producer_acquire()  # the oldest store in flight has read its buffer: reusable
            bar.arrive_and_wait()
