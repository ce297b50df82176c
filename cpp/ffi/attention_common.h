// Decoding shared by the sparse and dense attention handlers.
#pragma once

#include <utility>

#include "ffi/ffi_common.h"
#include "kernels/cpu/cpu_kernels.h"

namespace jax_msa {

// q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] of one float type, lengths [B] int32.
inline ffi::Error DecodeAttentionInputs(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                                        const ffi::AnyBuffer& v,
                                        const ffi::AnyBuffer& q_lengths,
                                        const ffi::AnyBuffer& kv_lengths, float scale,
                                        cpu::AttentionProblem* problem, DType* dtype) {
  if (auto e = FirstError({CheckRank(q, 4, "q"), CheckRank(k, 4, "k")}); e.failure()) return e;
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  *problem = {qd[0], qd[1], kd[1], qd[2], kd[2], qd[3], scale};
  auto type = ToDType(q.element_type());
  if (!type || k.element_type() != q.element_type() || v.element_type() != q.element_type()) {
    return ffi::Error::InvalidArgument(
        "jax_msa: q, k and v must share a float32/bfloat16/float16 type");
  }
  *dtype = *type;
  if (problem->Hkv == 0 || problem->Hq % problem->Hkv != 0) {
    return ffi::Error::InvalidArgument("jax_msa: q heads must be a multiple of kv heads");
  }
  const auto& p = *problem;
  return FirstError({CheckShape(k, {p.B, p.Sk, p.Hkv, p.D}, "k"),
                     CheckShape(v, {p.B, p.Sk, p.Hkv, p.D}, "v"),
                     CheckShape(q_lengths, {p.B}, "q_lengths"),
                     CheckShape(kv_lengths, {p.B}, "kv_lengths"),
                     CheckType(q_lengths, ffi::DataType::S32, "q_lengths"),
                     CheckType(kv_lengths, ffi::DataType::S32, "kv_lengths")});
}

// out/dout/dq like q, lse/dlse [B, Sq, Hq] float32, dk/dv like k.
inline ffi::Error CheckForwardOutputs(const cpu::AttentionProblem& p, const ffi::AnyBuffer& out,
                                      const ffi::AnyBuffer& lse) {
  return FirstError({CheckShape(out, {p.B, p.Sq, p.Hq, p.D}, "out"),
                     CheckShape(lse, {p.B, p.Sq, p.Hq}, "lse"),
                     CheckType(lse, ffi::DataType::F32, "lse")});
}

inline ffi::Error CheckGradients(const cpu::AttentionProblem& p, const ffi::AnyBuffer& dq,
                                 const ffi::AnyBuffer& dk, const ffi::AnyBuffer& dv) {
  return FirstError({CheckShape(dq, {p.B, p.Sq, p.Hq, p.D}, "dq"),
                     CheckShape(dk, {p.B, p.Sk, p.Hkv, p.D}, "dk"),
                     CheckShape(dv, {p.B, p.Sk, p.Hkv, p.D}, "dv")});
}

// Checks the outputs and runs the CPU forward for selection `keys`.
inline ffi::Error RunCpuForward(const cpu::AttentionProblem& p, DType dtype,
                                const cpu::KeySelection& keys, const ffi::AnyBuffer& q,
                                const ffi::AnyBuffer& k, const ffi::AnyBuffer& v,
                                const ffi::AnyBuffer& q_lengths, const ffi::AnyBuffer& kv_lengths,
                                ffi::AnyBuffer out, ffi::AnyBuffer lse) {
  if (auto e = CheckForwardOutputs(p, out, lse); e.failure()) return e;
  cpu::attention_fwd(dtype, p, keys, q.untyped_data(), k.untyped_data(), v.untyped_data(),
                     DataOf<int32_t>(q_lengths), DataOf<int32_t>(kv_lengths), out.untyped_data(),
                     static_cast<float*>(lse.untyped_data()));
  return ffi::Error::Success();
}

// Checks the forward results, cotangents and gradients, and runs the CPU
// backward for selection `keys`.
inline ffi::Error RunCpuBackward(const cpu::AttentionProblem& p, DType dtype,
                                 const cpu::KeySelection& keys, const ffi::AnyBuffer& q,
                                 const ffi::AnyBuffer& k, const ffi::AnyBuffer& v,
                                 const ffi::AnyBuffer& out, const ffi::AnyBuffer& lse,
                                 const ffi::AnyBuffer& dout, const ffi::AnyBuffer& dlse,
                                 const ffi::AnyBuffer& q_lengths,
                                 const ffi::AnyBuffer& kv_lengths, ffi::AnyBuffer dq,
                                 ffi::AnyBuffer dk, ffi::AnyBuffer dv) {
  if (auto e = FirstError({CheckForwardOutputs(p, out, lse), CheckForwardOutputs(p, dout, dlse),
                           CheckGradients(p, dq, dk, dv)});
      e.failure()) {
    return e;
  }
  cpu::attention_bwd(dtype, p, keys, q.untyped_data(), k.untyped_data(), v.untyped_data(),
                     out.untyped_data(), DataOf<float>(lse), dout.untyped_data(),
                     DataOf<float>(dlse), DataOf<int32_t>(q_lengths), DataOf<int32_t>(kv_lengths),
                     dq.untyped_data(), dk.untyped_data(), dv.untyped_data());
  return ffi::Error::Success();
}

// The four workspaces of a CUDA attention backward (float32 delta, int32
// index, float32 partial and dq_accum), whose sizes in elements XLA was told
// by the Python lowering: delta_floats, index_ints, partial_floats of `need`
// and dq_accum_floats.
template <class Need>
ffi::Error CheckBwdWorkspaces(const ffi::AnyBuffer& delta, const ffi::AnyBuffer& index,
                              const ffi::AnyBuffer& partial, const ffi::AnyBuffer& dq_accum,
                              const Need& need, int64_t dq_accum_floats) {
  return FirstError({CheckType(delta, ffi::DataType::F32, "delta workspace"),
                     CheckType(index, ffi::DataType::S32, "index workspace"),
                     CheckType(partial, ffi::DataType::F32, "partial workspace"),
                     CheckType(dq_accum, ffi::DataType::F32, "dq_accum workspace"),
                     CheckShape(delta, {need.delta_floats}, "delta workspace"),
                     CheckShape(index, {need.index_ints}, "index workspace"),
                     CheckShape(partial, {need.partial_floats}, "partial workspace"),
                     CheckShape(dq_accum, {dq_accum_floats}, "dq_accum workspace")});
}

// Handler bindings, after what `binding` holds already (the CUDA stream or
// nothing): the operands q, k, v ...
template <class Binding>
auto WithQKV(Binding&& binding) {  // by reference: a Binding cannot be moved
  return std::move(binding)
      .template Arg<ffi::AnyBuffer>()   // q
      .template Arg<ffi::AnyBuffer>()   // k
      .template Arg<ffi::AnyBuffer>();  // v
}

// ... and q_lengths, kv_lengths -> out, lse, which end every forward's operands.
template <class Binding>
auto WithLengthsOutLse(Binding&& binding) {
  return std::move(binding)
      .template Arg<ffi::AnyBuffer>()   // q_lengths
      .template Arg<ffi::AnyBuffer>()   // kv_lengths
      .template Ret<ffi::AnyBuffer>()   // out
      .template Ret<ffi::AnyBuffer>();  // lse
}

// ... and out, lse, dout, dlse, q_lengths, kv_lengths -> dq, dk, dv, which end
// every backward's operands.
template <class Binding>
auto WithBwdTail(Binding&& binding) {
  return std::move(binding)
      .template Arg<ffi::AnyBuffer>()   // out
      .template Arg<ffi::AnyBuffer>()   // lse
      .template Arg<ffi::AnyBuffer>()   // dout
      .template Arg<ffi::AnyBuffer>()   // dlse
      .template Arg<ffi::AnyBuffer>()   // q_lengths
      .template Arg<ffi::AnyBuffer>()   // kv_lengths
      .template Ret<ffi::AnyBuffer>()   // dq
      .template Ret<ffi::AnyBuffer>()   // dk
      .template Ret<ffi::AnyBuffer>();  // dv
}

// ... and the KV-outer CUDA backward's workspaces (extra results, so that the
// handler allocates nothing) and its logit scale.
template <class Binding>
auto WithKvOuterWorkspaces(Binding&& binding) {
  return std::move(binding)
      .template Ret<ffi::AnyBuffer>()  // delta workspace
      .template Ret<ffi::AnyBuffer>()  // index workspace
      .template Ret<ffi::AnyBuffer>()  // partial workspace
      .template Ret<ffi::AnyBuffer>()  // dq_accum workspace
      .template Attr<float>("scale");
}

}  // namespace jax_msa
