"""128-bit loads and stores, which Numba has no API for: four float32 words moved by one instruction
(`LDG.E.128` from global memory, `LDS.128` / `STS.128` in shared memory).

    load4_global(array, offset) -> (x0, x1, x2, x3)    array's elements offset .. offset+3
    load4_shared(array, offset) -> (x0, x1, x2, x3)
    store4_shared(array, offset, x0, x1, x2, x3)
    store_shared(array, offset, x)                     one word, at a flat offset like the others
    load_global(array, offset) -> x                    one word

`offset` counts float32 elements from the array's first one (row-major, any rank), an integer, and must
be a multiple of 4 from a 16-byte-aligned start (CuPy allocations are 256-byte aligned; a shared row
of a multiple of 4 words keeps every row aligned). Each helper is a Numba intrinsic that writes the
LLVM IR directly: the address is the array's data pointer cast to the global (1) or shared (3) address space (so NVVM
emits the specific load) plus the offset (the caller computes it, in 32 bits where it multiplies:
not Numba's 64-bit index arithmetic), then one aligned <4 x float> access. Under the CUDA simulator the same names are
plain Python with the same meaning, so the simulator runs the kernels that use them unchanged.
"""
from numba import config


def _element(array, offset, e):
    """The index of element offset+e of a row-major array of any rank (the simulator's twin)."""
    index, flat = [], int(offset) + e
    for size in reversed(array.shape):
        flat, i = divmod(flat, size)
        index.append(i)
    return tuple(reversed(index))


if config.ENABLE_CUDASIM:
    def load4_global(array, offset):
        return tuple(array[_element(array, offset, e)] for e in range(4))

    load4_shared = load4_global

    def store4_shared(array, offset, x0, x1, x2, x3):
        for e, x in enumerate((x0, x1, x2, x3)):
            array[_element(array, offset, e)] = x

    def store_shared(array, offset, x):
        array[_element(array, offset, 0)] = x

    def load_global(array, offset):
        return array[_element(array, offset, 0)]

else:
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.cuda.extending import intrinsic

    GLOBAL, SHARED = 1, 3                       # NVPTX address spaces
    FLOAT4 = ir.VectorType(ir.FloatType(), 4)

    def _vector_pointer(context, builder, array_type, offset_type, array, offset, address_space):
        """The array's data pointer cast to the address space first, then offset (in 64 bits, so a
        constant part of the offset folds into the load's immediate)."""
        data = context.make_array(array_type)(context, builder, array).data
        data = builder.addrspacecast(data, ir.PointerType(data.type.pointee, address_space))
        element = builder.gep(data, [context.cast(builder, offset, offset_type, types.int64)])
        return builder.bitcast(element, FLOAT4.as_pointer(address_space))

    def _load4(address_space):
        def load4(typingctx, array, offset):
            signature = types.UniTuple(types.float32, 4)(array, offset)

            def codegen(context, builder, sig, args):
                pointer = _vector_pointer(context, builder, sig.args[0], sig.args[1], args[0], args[1], address_space)
                vector = builder.load(pointer, align=16)
                words = [builder.extract_element(vector, cgutils.int32_t(e)) for e in range(4)]
                return context.make_tuple(builder, sig.return_type, words)
            return signature, codegen
        return intrinsic(load4)

    load4_global, load4_shared = _load4(GLOBAL), _load4(SHARED)

    @intrinsic
    def store4_shared(typingctx, array, offset, x0, x1, x2, x3):
        signature = types.void(array, offset, x0, x1, x2, x3)

        def codegen(context, builder, sig, args):
            pointer = _vector_pointer(context, builder, sig.args[0], sig.args[1], args[0], args[1], SHARED)
            vector = ir.Constant(FLOAT4, ir.Undefined)
            for e, x in enumerate(args[2:]):
                vector = builder.insert_element(vector, x, cgutils.int32_t(e))
            builder.store(vector, pointer, align=16)
            return context.get_dummy_value()
        return signature, codegen

    @intrinsic
    def store_shared(typingctx, array, offset, x):
        signature = types.void(array, offset, x)

        def codegen(context, builder, sig, args):
            data = context.make_array(sig.args[0])(context, builder, args[0]).data
            data = builder.addrspacecast(data, ir.PointerType(data.type.pointee, SHARED))
            element = builder.gep(data, [context.cast(builder, args[1], sig.args[1], types.int64)])
            builder.store(args[2], element, align=4)
            return context.get_dummy_value()
        return signature, codegen


    @intrinsic
    def load_global(typingctx, array, offset):
        signature = types.float32(array, offset)

        def codegen(context, builder, sig, args):
            data = context.make_array(sig.args[0])(context, builder, args[0]).data
            data = builder.addrspacecast(data, ir.PointerType(data.type.pointee, GLOBAL))
            element = builder.gep(data, [context.cast(builder, args[1], sig.args[1], types.int64)])
            return builder.load(element, align=4)
        return signature, codegen
