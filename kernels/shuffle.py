"""Warp shuffles, with a twin for the CUDA simulator (which has none).

    shuffle_xor(mask, value, lane_mask) -> the `value` held by lane (laneid ^ lane_mask) of this warp

On a GPU this is Numba's `cuda.shfl_xor_sync` (PTX `shfl.sync.bfly.b32`, SASS `SHFL.BFLY`): a register
read from another lane of the warp, no shared memory and no barrier. `mask` names the lanes taking part
(every one of them must execute the call). A butterfly over lane masks w/2, w/4, ..., 1 leaves every
lane of an aligned group of w lanes holding the group's max or sum: kernels/flash_attention.py
reduces a row split across thread_cols lanes that way.

Under the simulator (NUMBA_ENABLE_CUDASIM=1, one Python thread per CUDA thread) the same name is a
device function with the same result, through a shared scratch row: barrier (every thread has read
the previous exchange), write own value, barrier, read the partner's. It therefore needs every thread
of the *block* to make the same sequence of calls (the hardware needs it of the lanes in `mask`),
which is how the kernels call it: from code every thread reaches. The scratch holds the simulator's
own (float64) values, so the partner's value arrives unrounded, as a shuffle moves its bits.
"""
from numba import config, cuda

if config.ENABLE_CUDASIM:
    from numba import float64

    @cuda.jit(device=True)
    def shuffle_xor(mask, value, lane_mask):
        lane = cuda.threadIdx.x % 32
        partner = cuda.threadIdx.x ^ lane_mask
        assert lane_mask < 32 and (mask >> lane) & 1 and (mask >> (partner % 32)) & 1, \
            "shuffle_xor: this lane or its partner is not in mask"
        scratch = cuda.shared.array(1024, float64)      # one slot per thread of the block
        cuda.syncthreads()
        scratch[cuda.threadIdx.x] = value
        cuda.syncthreads()
        return scratch[partner]

else:
    shuffle_xor = cuda.shfl_xor_sync
