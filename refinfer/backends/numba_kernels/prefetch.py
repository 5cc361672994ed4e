"""A software prefetch for Numba kernels: `prefetch(a, i)` asks the CPU to bring the cache
line holding a[i] (a 1-D array) towards L1, without waiting for it and without faulting.

Why: the decode kernels stream every weight once per token (about 110 MB for SmolLM2) in
short per-matrix runs, and on the machines measured the hardware prefetchers did not keep
up: with a prefetch 2 KiB ahead the q4_1 matrices of one decode step took 10.5 ms instead of
27 ms on one thread (bench/bench_kernels.py has the cold-weights case).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic


@intrinsic
def prefetch(typingctx, arr, idx):
    sig = types.void(arr, idx)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = builder.module.declare_intrinsic(
            "llvm.prefetch", [i8p], ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]))
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), i8p)
        builder.call(fn, [ptr, i32(0), i32(3), i32(1)])   # read, keep in all levels, data
        return context.get_dummy_value()

    return sig, codegen
