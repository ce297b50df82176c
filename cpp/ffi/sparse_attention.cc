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
  if (auto e = FirstError({CheckIds(p, ids), CheckForwardOutputs(p, *out, *lse)}); e.failure()) {
    return e;
  }
  cpu::attention_fwd(dtype, p, SelectionOf(ids), q.untyped_data(), k.untyped_data(),
                     v.untyped_data(), DataOf<int32_t>(q_lengths), DataOf<int32_t>(kv_lengths),
                     out->untyped_data(), DataOf<float>(lse));
  return ffi::Error::Success();
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
  if (auto e = FirstError({CheckIds(p, ids), CheckForwardOutputs(p, out, lse),
                           CheckForwardOutputs(p, dout, dlse), CheckGradients(p, *dq, *dk, *dv)});
      e.failure()) {
    return e;
  }
  cpu::attention_bwd(dtype, p, SelectionOf(ids), q.untyped_data(), k.untyped_data(),
                     v.untyped_data(), out.untyped_data(), DataOf<float>(lse),
                     dout.untyped_data(), DataOf<float>(dlse), DataOf<int32_t>(q_lengths),
                     DataOf<int32_t>(kv_lengths), dq->untyped_data(), dk->untyped_data(),
                     dv->untyped_data());
  return ffi::Error::Success();
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
