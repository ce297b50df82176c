// FFI handlers of block-sparse attention (spec §3.4): forward and backward.
#include <cstdint>

#include "ffi/attention_common.h"

namespace jax_msa {
namespace {

// ids [B, Sq, Hkv, topk] int32.
ffi::Error CheckIds(const cpu::AttentionProblem& p, const ffi::AnyBuffer& ids) {
  if (auto e = FirstError({CheckRank(ids, 4, "ids"), CheckType(ids, ffi::DataType::S32, "ids")});
      e.failure()) {
    return e;
  }
  return CheckShape(ids, {p.B, p.Sq, p.Hkv, ids.dimensions()[3]}, "ids");
}

cpu::KeySelection SelectionOf(const ffi::AnyBuffer& ids) {
  return {DataOf<int32_t>(ids), ids.dimensions()[3], /*causal=*/true};
}

ffi::Error SparseAttentionFwdCpu(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                                 ffi::AnyBuffer ids, ffi::AnyBuffer q_lengths,
                                 ffi::AnyBuffer kv_lengths, ffi::Result<ffi::AnyBuffer> out,
                                 ffi::Result<ffi::AnyBuffer> lse, float scale) {
  cpu::AttentionProblem p;
  DType dtype;
  if (auto e = DecodeAttentionInputs(q, k, v, q_lengths, kv_lengths, scale, &p, &dtype);
      e.failure()) {
    return e;
  }
  if (auto e = CheckIds(p, ids); e.failure()) return e;
  return RunCpuForward(p, dtype, SelectionOf(ids), q, k, v, q_lengths, kv_lengths, *out, *lse);
}

ffi::Error SparseAttentionBwdCpu(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                                 ffi::AnyBuffer ids, ffi::AnyBuffer out, ffi::AnyBuffer lse,
                                 ffi::AnyBuffer dout, ffi::AnyBuffer dlse,
                                 ffi::AnyBuffer q_lengths, ffi::AnyBuffer kv_lengths,
                                 ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                                 ffi::Result<ffi::AnyBuffer> dv, float scale) {
  cpu::AttentionProblem p;
  DType dtype;
  if (auto e = DecodeAttentionInputs(q, k, v, q_lengths, kv_lengths, scale, &p, &dtype);
      e.failure()) {
    return e;
  }
  if (auto e = CheckIds(p, ids); e.failure()) return e;
  return RunCpuBackward(p, dtype, SelectionOf(ids), q, k, v, out, lse, dout, dlse, q_lengths,
                        kv_lengths, *dq, *dk, *dv);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kSparseAttentionFwdCpu, SparseAttentionFwdCpu,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // ids
                                  .Arg<ffi::AnyBuffer>()  // q_lengths
                                  .Arg<ffi::AnyBuffer>()  // kv_lengths
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Ret<ffi::AnyBuffer>()  // lse
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(kSparseAttentionBwdCpu, SparseAttentionBwdCpu,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // ids
                                  .Arg<ffi::AnyBuffer>()  // out
                                  .Arg<ffi::AnyBuffer>()  // lse
                                  .Arg<ffi::AnyBuffer>()  // dout
                                  .Arg<ffi::AnyBuffer>()  // dlse
                                  .Arg<ffi::AnyBuffer>()  // q_lengths
                                  .Arg<ffi::AnyBuffer>()  // kv_lengths
                                  .Ret<ffi::AnyBuffer>()  // dq
                                  .Ret<ffi::AnyBuffer>()  // dk
                                  .Ret<ffi::AnyBuffer>()  // dv
                                  .Attr<float>("scale"));

void AddSparseAttentionTargets(TargetTable& table) {
  table.cpu.emplace_back("jax_msa_sparse_attention_fwd", kSparseAttentionFwdCpu);
  table.cpu.emplace_back("jax_msa_sparse_attention_bwd", kSparseAttentionBwdCpu);
}

}  // namespace jax_msa
