"""Fixed-width SIMD values for the ideal-mode kernels: f32x16 (16 float32 lanes) and f64x8 (8
float64 lanes), and a scalar fma.

Why explicit vectors: a batch-invariant matmul needs each output element to be one chain of
fused multiply-adds in a fixed order, the same for one token and for 512, and a prefill needs
register-resident accumulators to be fast. LLVM's auto-vectorizer gives neither reliably: it
keeps a loop's accumulators in memory (it cannot prove they alias nothing), and whether
`a * b + c` becomes one FMA is its choice (fastmath "contract"). Here every vfma/fma is
llvm.fma (one rounding, on every CPU: the instruction where the CPU has it, libm's fma where
not), a loop-carried vector stays in registers, and the lanes never mix except in vsum's
fixed tree. On AVX-512 an f32x16 is one zmm register; on AVX2 LLVM splits it into two ymm.

    vload(a, i)       a[i : i + W] of a contiguous float32 (-> f32x16) or float64 (-> f64x8) array
    vload_f64(a, i)   a[i : i + 8] of a float32 array, widened (exactly) to f64x8
    vweights(a, i, shift, off)   16 weights as f32x16, exactly: a[i : i + 16] of a float32 array,
                      of an int8 array (8-bit codes), or ((a[i : i + 16] >> shift) & 15) + off of a
                      uint8 array (4-bit codes, two to a byte)
    vstore(a, i, v)   a[i : i + W] = v
    vsplat(x)         every lane = x (float32 -> f32x16, float64 -> f64x8); vsplat(np.float32(0)) is a zero
    vfma(a, b, c)     a * b + c per lane, rounded once
    vsum(v)           the 8 lanes of an f64x8 added in a fixed tree: ((0+4)+(2+6))+((1+5)+(3+7))
    fma(a, b, c)      a * b + c for scalars, rounded once

f32x8 (8 float32 lanes, one __m256) serves ggml mode, whose lane orders are those of ggml's
AVX2 kernels (ggml_emulation.py describes each):
    vload8(a, i)      a[i : i + 8] of a float32 array; vload8_f16(a, i) of a uint16 array of
                      IEEE binary16 bits, widened exactly (vcvtph2ps)
    vsplat8(x)        every lane = x (float32)
    vadd(a, b)        a + b per lane (any of the vector types)
    vround_f16(v)     each lane rounded to binary16 (nearest even, subnormals, overflow to inf)
                      and back to float32, as GGML_FP32_TO_FP16 then GGML_FP16_TO_FP32
    hsum8(v)          ((v0+v4) + (v2+v6)) + ((v1+v5) + (v3+v7)): hsum_float_8 and tinyBLAS's hsum
    hsum8_reduce(v)   ((v0+v4) + (v1+v5)) + ((v2+v6) + (v3+v7)): GGML_F32x8_REDUCE's tail
    lane8(v, i)       lane i of an f32x8
    round_f16_s(x), f32_bits(x), f32_of_bits(i)   the scalar F16 rounding and float32 <-> int32 bit casts
No bounds checks: callers index within their arrays.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

_I32 = ir.IntType(32)


class _Vec(types.Type):
    def __init__(self, name, elem, lanes):
        self.elem, self.lanes = elem, lanes
        super().__init__(name=name)


f32x16 = _Vec("f32x16", types.float32, 16)
f64x8 = _Vec("f64x8", types.float64, 8)
f32x8 = _Vec("f32x8", types.float32, 8)
_LLVM = {f32x16: ir.VectorType(ir.FloatType(), 16), f64x8: ir.VectorType(ir.DoubleType(), 8),
         f32x8: ir.VectorType(ir.FloatType(), 8)}
_OF = {types.float32: f32x16, types.float64: f64x8}


@register_model(_Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _LLVM[fe_type])


def _elem_ptr(context, builder, arrty, arr, idx):
    ary = context.make_array(arrty)(context, builder, arr)
    return builder.gep(ary.data, [idx])


def _fma_fn(builder, ty):
    name = {"<16 x float>": "llvm.fma.v16f32", "<8 x double>": "llvm.fma.v8f64", "<8 x float>": "llvm.fma.v8f32",
            "float": "llvm.fma.f32", "double": "llvm.fma.f64"}[str(ty)]
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty, ty, ty]), name)


@intrinsic
def vload(typingctx, arr, i):
    if not isinstance(arr, types.Array) or arr.dtype not in _OF:
        return None
    vt = _OF[arr.dtype]

    def codegen(context, builder, sig, args):
        p = _elem_ptr(context, builder, sig.args[0], args[0], args[1])
        return builder.load(builder.bitcast(p, _LLVM[vt].as_pointer()), align=arr.dtype.bitwidth // 8)
    return vt(arr, i), codegen


@intrinsic
def vload_f64(typingctx, arr, i):
    if not isinstance(arr, types.Array) or arr.dtype != types.float32:
        return None

    def codegen(context, builder, sig, args):
        p = _elem_ptr(context, builder, sig.args[0], args[0], args[1])
        v = builder.load(builder.bitcast(p, ir.VectorType(ir.FloatType(), 8).as_pointer()), align=4)
        return builder.fpext(v, _LLVM[f64x8])
    return f64x8(arr, i), codegen


@intrinsic
def vweights(typingctx, arr, i, shift, off):
    if not isinstance(arr, types.Array) or arr.dtype not in (types.float32, types.uint8, types.int8):
        return None
    signed = arr.dtype == types.int8

    def codegen(context, builder, sig, args):
        i32x16 = ir.VectorType(_I32, 16)
        p = _elem_ptr(context, builder, sig.args[0], args[0], args[1])
        if arr.dtype == types.float32:
            return builder.load(builder.bitcast(p, _LLVM[f32x16].as_pointer()), align=4)
        raw = builder.load(builder.bitcast(p, ir.VectorType(ir.IntType(8), 16).as_pointer()), align=1)
        if signed:
            return builder.sitofp(builder.sext(raw, i32x16), _LLVM[f32x16])
        splat = lambda v: builder.shuffle_vector(builder.insert_element(ir.Constant(i32x16, ir.Undefined), v, _I32(0)),
                                                 ir.Constant(i32x16, ir.Undefined), ir.Constant(i32x16, [0] * 16))
        shift_, off_ = (context.cast(builder, v, t, types.int32) for v, t in zip(args[2:], sig.args[2:]))
        q = builder.and_(builder.lshr(builder.zext(raw, i32x16), splat(shift_)), ir.Constant(i32x16, [15] * 16))
        return builder.sitofp(builder.add(q, splat(off_)), _LLVM[f32x16])
    if not (isinstance(shift, types.Integer) and isinstance(off, types.Integer)):
        return None
    return f32x16(arr, i, shift, off), codegen


@intrinsic
def vstore(typingctx, arr, i, v):
    if not isinstance(arr, types.Array) or _OF.get(arr.dtype) != v:
        return None

    def codegen(context, builder, sig, args):
        p = _elem_ptr(context, builder, sig.args[0], args[0], args[1])
        builder.store(args[2], builder.bitcast(p, _LLVM[v].as_pointer()), align=arr.dtype.bitwidth // 8)
        return context.get_dummy_value()
    return types.void(arr, i, v), codegen


@intrinsic
def vsplat(typingctx, x):
    if x not in _OF:
        return None
    vt = _OF[x]

    def codegen(context, builder, sig, args):
        lt = _LLVM[vt]
        one = builder.insert_element(ir.Constant(lt, ir.Undefined), args[0], _I32(0))
        return builder.shuffle_vector(one, ir.Constant(lt, ir.Undefined),
                                      ir.Constant(ir.VectorType(_I32, vt.lanes), [0] * vt.lanes))
    return vt(x), codegen


@intrinsic
def vfma(typingctx, a, b, c):
    if not (a == b == c and a in _LLVM):
        return None

    def codegen(context, builder, sig, args):
        return builder.call(_fma_fn(builder, _LLVM[a]), args)
    return a(a, b, c), codegen


@intrinsic
def vsum(typingctx, v):
    if v != f64x8:
        return None

    def codegen(context, builder, sig, args):
        lane = [builder.extract_element(args[0], _I32(i)) for i in range(8)]
        return builder.fadd(builder.fadd(builder.fadd(lane[0], lane[4]), builder.fadd(lane[2], lane[6])),
                            builder.fadd(builder.fadd(lane[1], lane[5]), builder.fadd(lane[3], lane[7])))
    return types.float64(v), codegen


@intrinsic
def fma(typingctx, a, b, c):
    if not (a == b == c and a in _OF):
        return None

    def codegen(context, builder, sig, args):
        return builder.call(_fma_fn(builder, context.get_value_type(a)), args)
    return a(a, b, c), codegen


# ---- f32x8: ggml mode ------------------------------------------------------------------------
_F8 = _LLVM[f32x8]
_H8 = ir.VectorType(ir.HalfType(), 8)


@intrinsic
def vload8(typingctx, arr, i):
    if not isinstance(arr, types.Array) or arr.dtype != types.float32:
        return None

    def codegen(context, builder, sig, args):
        p = _elem_ptr(context, builder, sig.args[0], args[0], args[1])
        return builder.load(builder.bitcast(p, _F8.as_pointer()), align=4)
    return f32x8(arr, i), codegen


@intrinsic
def vload8_f16(typingctx, arr, i):
    if not isinstance(arr, types.Array) or arr.dtype != types.uint16:
        return None

    def codegen(context, builder, sig, args):
        p = _elem_ptr(context, builder, sig.args[0], args[0], args[1])
        return builder.fpext(builder.load(builder.bitcast(p, _H8.as_pointer()), align=2), _F8)
    return f32x8(arr, i), codegen


@intrinsic
def vstore8(typingctx, arr, i, v):
    if not isinstance(arr, types.Array) or arr.dtype != types.float32 or v != f32x8:
        return None

    def codegen(context, builder, sig, args):
        p = _elem_ptr(context, builder, sig.args[0], args[0], args[1])
        builder.store(args[2], builder.bitcast(p, _F8.as_pointer()), align=4)
        return context.get_dummy_value()
    return types.void(arr, i, v), codegen


@intrinsic
def vsplat8(typingctx, x):
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        one = builder.insert_element(ir.Constant(_F8, ir.Undefined), args[0], _I32(0))
        return builder.shuffle_vector(one, ir.Constant(_F8, ir.Undefined), ir.Constant(ir.VectorType(_I32, 8), [0] * 8))
    return f32x8(x), codegen


@intrinsic
def vadd(typingctx, a, b):
    if not (a == b and a in _LLVM):
        return None

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1])
    return a(a, b), codegen


@intrinsic
def vround_f16(typingctx, v):
    if v != f32x8:
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.fptrunc(args[0], _H8), _F8)
    return f32x8(v), codegen


@intrinsic
def lane8(typingctx, v, i):
    if v != f32x8 or not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.extract_element(args[0], context.cast(builder, args[1], sig.args[1], types.int32))
    return types.float32(v, i), codegen


def _tree(builder, v, pairs):
    lane = [builder.extract_element(v, _I32(i)) for i in range(8)]
    (a, b), (c, d), (e, f), (g, h) = pairs
    return builder.fadd(builder.fadd(builder.fadd(lane[a], lane[b]), builder.fadd(lane[c], lane[d])),
                        builder.fadd(builder.fadd(lane[e], lane[f]), builder.fadd(lane[g], lane[h])))


@intrinsic
def hsum8(typingctx, v):
    if v != f32x8:
        return None

    def codegen(context, builder, sig, args):
        return _tree(builder, args[0], ((0, 4), (2, 6), (1, 5), (3, 7)))
    return types.float32(v), codegen


@intrinsic
def hsum8_reduce(typingctx, v):
    if v != f32x8:
        return None

    def codegen(context, builder, sig, args):
        return _tree(builder, args[0], ((0, 4), (1, 5), (2, 6), (3, 7)))
    return types.float32(v), codegen


@intrinsic
def round_f16_s(typingctx, x):
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(x), codegen


@intrinsic
def f32_bits(typingctx, x):
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], _I32)
    return types.int32(x), codegen


@intrinsic
def f32_of_bits(typingctx, i):
    if i != types.int32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(i), codegen
