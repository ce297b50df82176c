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
  return RunCpuForward(p, dtype, DenseSelection(causal), q, k, v, q_lengths, kv_lengths, *out,
                       *lse);
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
  return RunCpuBackward(p, dtype, DenseSelection(causal), q, k, v, out, lse, dout, dlse, q_lengths,
                        kv_lengths, *dq, *dk, *dv);
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
