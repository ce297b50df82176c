// FFI handlers of dense attention (spec §3.6): forward and backward.
#include <cstdint>

#include "ffi/attention_common.h"

namespace jax_msa {
namespace {

cpu::KeySelection DenseSelection(bool causal) { return {nullptr, 0, causal}; }

ffi::Error DenseAttentionFwdCpu(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                                ffi::AnyBuffer q_lengths, ffi::AnyBuffer kv_lengths,
                                ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse,
                                float scale, bool causal) {
  cpu::AttentionProblem p;
  DType dtype;
  if (auto e = DecodeAttentionInputs(q, k, v, q_lengths, kv_lengths, scale, &p, &dtype);
      e.failure()) {
    return e;
  }
  if (auto e = CheckForwardOutputs(p, *out, *lse); e.failure()) return e;
  cpu::attention_fwd(dtype, p, DenseSelection(causal), q.untyped_data(), k.untyped_data(),
                     v.untyped_data(), DataOf<int32_t>(q_lengths), DataOf<int32_t>(kv_lengths),
                     out->untyped_data(), DataOf<float>(lse));
  return ffi::Error::Success();
}

ffi::Error DenseAttentionBwdCpu(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                                ffi::AnyBuffer out, ffi::AnyBuffer lse, ffi::AnyBuffer dout,
                                ffi::AnyBuffer dlse, ffi::AnyBuffer q_lengths,
                                ffi::AnyBuffer kv_lengths, ffi::Result<ffi::AnyBuffer> dq,
                                ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                                float scale, bool causal) {
  cpu::AttentionProblem p;
  DType dtype;
  if (auto e = DecodeAttentionInputs(q, k, v, q_lengths, kv_lengths, scale, &p, &dtype);
      e.failure()) {
    return e;
  }
  if (auto e = FirstError({CheckForwardOutputs(p, out, lse), CheckForwardOutputs(p, dout, dlse),
                           CheckGradients(p, *dq, *dk, *dv)});
      e.failure()) {
    return e;
  }
  cpu::attention_bwd(dtype, p, DenseSelection(causal), q.untyped_data(), k.untyped_data(),
                     v.untyped_data(), out.untyped_data(), DataOf<float>(lse),
                     dout.untyped_data(), DataOf<float>(dlse), DataOf<int32_t>(q_lengths),
                     DataOf<int32_t>(kv_lengths), dq->untyped_data(), dk->untyped_data(),
                     dv->untyped_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kDenseAttentionFwdCpu, DenseAttentionFwdCpu,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // q_lengths
                                  .Arg<ffi::AnyBuffer>()  // kv_lengths
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Ret<ffi::AnyBuffer>()  // lse
                                  .Attr<float>("scale")
                                  .Attr<bool>("causal"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(kDenseAttentionBwdCpu, DenseAttentionBwdCpu,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // out
                                  .Arg<ffi::AnyBuffer>()  // lse
                                  .Arg<ffi::AnyBuffer>()  // dout
                                  .Arg<ffi::AnyBuffer>()  // dlse
                                  .Arg<ffi::AnyBuffer>()  // q_lengths
                                  .Arg<ffi::AnyBuffer>()  // kv_lengths
                                  .Ret<ffi::AnyBuffer>()  // dq
                                  .Ret<ffi::AnyBuffer>()  // dk
                                  .Ret<ffi::AnyBuffer>()  // dv
                                  .Attr<float>("scale")
                                  .Attr<bool>("causal"));

void AddDenseAttentionTargets(TargetTable& table) {
  table.cpu.emplace_back("jax_msa_dot_product_attention_fwd", kDenseAttentionFwdCpu);
  table.cpu.emplace_back("jax_msa_dot_product_attention_bwd", kDenseAttentionBwdCpu);
}

}  // namespace jax_msa
