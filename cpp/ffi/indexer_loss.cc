// FFI handler of the indexer's KL loss (spec §3.8): per-row KL sums and,
// optionally, their gradients wrt qi and ki.
#include <algorithm>
#include <cstdint>
#include <string>

#include "ffi/ffi_common.h"
#include "kernels/cpu/cpu_kernels.h"

namespace jax_msa {
namespace {

// q [B, Sq, Hq, D], k [B, Sk, Hkv, D] of one float type; qi [B, Sq, Hkv, Di],
// ki [B, Sk, Di] of one float type; ids [B, Sq, Hkv, topk], lengths [B] int32.
ffi::Error DecodeLossInputs(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                            const ffi::AnyBuffer& qi, const ffi::AnyBuffer& ki,
                            const ffi::AnyBuffer& ids, const ffi::AnyBuffer& q_lengths,
                            const ffi::AnyBuffer& kv_lengths, float scale,
                            cpu::AttentionProblem* problem, DType* dtype, DType* index_dtype) {
  if (auto e = FirstError({CheckRank(q, 4, "q"), CheckRank(k, 4, "k"), CheckRank(qi, 4, "qi"),
                           CheckRank(ki, 3, "ki"), CheckRank(ids, 4, "ids"),
                           CheckType(ids, ffi::DataType::S32, "ids")});
      e.failure()) {
    return e;
  }
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  *problem = {qd[0], qd[1], kd[1], qd[2], kd[2], qd[3], scale};
  auto type = ToDType(q.element_type());
  auto index_type = ToDType(qi.element_type());
  if (!type || k.element_type() != q.element_type() || !index_type ||
      ki.element_type() != qi.element_type()) {
    return ffi::Error::InvalidArgument(
        "jax_msa: q and k, and qi and ki, must share a float32/bfloat16/float16 type");
  }
  *dtype = *type;
  *index_dtype = *index_type;
  const auto& p = *problem;
  if (p.Hkv == 0 || p.Hq % p.Hkv != 0) {
    return ffi::Error::InvalidArgument("jax_msa: q heads must be a multiple of kv heads");
  }
  const int64_t Di = qi.dimensions()[3];
  return FirstError({CheckShape(k, {p.B, p.Sk, p.Hkv, p.D}, "k"),
                     CheckShape(qi, {p.B, p.Sq, p.Hkv, Di}, "qi"),
                     CheckShape(ki, {p.B, p.Sk, Di}, "ki"),
                     CheckShape(ids, {p.B, p.Sq, p.Hkv, ids.dimensions()[3]}, "ids"),
                     CheckShape(q_lengths, {p.B}, "q_lengths"),
                     CheckShape(kv_lengths, {p.B}, "kv_lengths"),
                     CheckType(q_lengths, ffi::DataType::S32, "q_lengths"),
                     CheckType(kv_lengths, ffi::DataType::S32, "kv_lengths")});
}

// A gradient result: the dimensions and element type of its operand.
ffi::Error CheckLike(const ffi::AnyBuffer& result, const ffi::AnyBuffer& operand, const char* name) {
  auto r = result.dimensions();
  auto o = operand.dimensions();
  if (result.element_type() == operand.element_type() && r.size() == o.size() &&
      std::equal(r.begin(), r.end(), o.begin())) {
    return ffi::Error::Success();
  }
  return ffi::Error::InvalidArgument(std::string("jax_msa: ") + name + " has shape " +
                                     ShapeString(result) + ", expected " + ShapeString(operand) +
                                     " and the same element type");
}

// Results: kl [B] float32, then either nothing or dqi (like qi), dki (like ki).
ffi::Error IndexerKlLossCpu(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer qi,
                            ffi::AnyBuffer ki, ffi::AnyBuffer ids, ffi::AnyBuffer q_lengths,
                            ffi::AnyBuffer kv_lengths, ffi::Result<ffi::AnyBuffer> kl,
                            ffi::RemainingRets grads, float scale, float index_scale) {
  cpu::AttentionProblem p;
  DType dtype, index_dtype;
  if (auto e = DecodeLossInputs(q, k, qi, ki, ids, q_lengths, kv_lengths, scale, &p, &dtype,
                                &index_dtype);
      e.failure()) {
    return e;
  }
  if (auto e = FirstError({CheckShape(*kl, {p.B}, "kl"), CheckType(*kl, ffi::DataType::F32, "kl")});
      e.failure()) {
    return e;
  }
  void* dqi = nullptr;
  void* dki = nullptr;
  if (!grads.empty()) {
    if (grads.size() != 2) return ffi::Error::InvalidArgument("jax_msa: expected dqi and dki");
    auto dqi_buffer = grads.get<ffi::AnyBuffer>(0);
    auto dki_buffer = grads.get<ffi::AnyBuffer>(1);
    if (!dqi_buffer.has_value()) return dqi_buffer.error();
    if (!dki_buffer.has_value()) return dki_buffer.error();
    if (auto e = FirstError({CheckLike(**dqi_buffer, qi, "dqi"), CheckLike(**dki_buffer, ki, "dki")});
        e.failure()) {
      return e;
    }
    dqi = (*dqi_buffer)->untyped_data();
    dki = (*dki_buffer)->untyped_data();
  }
  cpu::indexer_kl_loss(dtype, index_dtype, p, DataOf<int32_t>(ids), ids.dimensions()[3],
                       qi.dimensions()[3], index_scale, q.untyped_data(), k.untyped_data(),
                       qi.untyped_data(), ki.untyped_data(), DataOf<int32_t>(q_lengths),
                       DataOf<int32_t>(kv_lengths), DataOf<float>(kl), dqi, dki);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kIndexerKlLossCpu, IndexerKlLossCpu,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // qi
                                  .Arg<ffi::AnyBuffer>()  // ki
                                  .Arg<ffi::AnyBuffer>()  // ids
                                  .Arg<ffi::AnyBuffer>()  // q_lengths
                                  .Arg<ffi::AnyBuffer>()  // kv_lengths
                                  .Ret<ffi::AnyBuffer>()  // kl
                                  .RemainingRets()        // dqi, dki (with_grads) or none
                                  .Attr<float>("scale")
                                  .Attr<float>("index_scale"));

void AddIndexerLossTargets(TargetTable& table) {
  table.cpu.emplace_back("jax_msa_indexer_kl_loss", kIndexerKlLossCpu);
}

}  // namespace jax_msa
