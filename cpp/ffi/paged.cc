// FFI handlers of paged inference (spec §3.7): paged_attention, paged_indexer.
#include <cstdint>
#include <optional>
#include <string>
#include <utility>

#include "ffi/ffi_common.h"
#include "kernels/cpu/cpu_kernels.h"
#ifdef JAX_MSA_WITH_CUDA
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/kernel_family.h"
#endif

namespace jax_msa {
namespace {

std::optional<CacheType> ToCacheType(ffi::DataType type) {
  switch (type) {
    case ffi::DataType::F32:
      return CacheType::kF32;
    case ffi::DataType::BF16:
      return CacheType::kBF16;
    case ffi::DataType::F16:
      return CacheType::kF16;
    case ffi::DataType::F8E4M3FN:
      return CacheType::kE4M3FN;
    default:
      return std::nullopt;
  }
}

// Checks a KV cache [num_pages, heads, kBlock, dim] (with_heads) or an
// index-key cache [num_pages, kBlock, dim], and its float32 scalar scale.
ffi::Error CheckCache(const ffi::AnyBuffer& cache, const ffi::AnyBuffer& scale, bool with_heads,
                      const char* name, const char* scale_name) {
  const size_t rank = with_heads ? 4 : 3;
  if (auto e = FirstError({CheckRank(cache, rank, name), CheckShape(scale, {}, scale_name),
                           CheckType(scale, ffi::DataType::F32, scale_name)});
      e.failure()) {
    return e;
  }
  if (!ToCacheType(cache.element_type())) {
    return ffi::Error::InvalidArgument(std::string("jax_msa: ") + name +
                                       " must be float32, bfloat16, float16 or float8_e4m3fn");
  }
  auto d = cache.dimensions();
  if (with_heads) return CheckShape(cache, {d[0], d[1], cpu::kBlock, d[3]}, name);
  return CheckShape(cache, {d[0], cpu::kBlock, d[2]}, name);
}

// A cache checked by CheckCache, for the CPU kernels: its scale read from host memory.
cpu::PagedCache HostCache(const ffi::AnyBuffer& cache, const ffi::AnyBuffer& scale,
                          bool with_heads) {
  auto d = cache.dimensions();
  return {cache.untyped_data(), *ToCacheType(cache.element_type()), *DataOf<float>(scale), d[0],
          with_heads ? d[1] : 1, d[d.size() - 1]};
}

// q [B, Q, H, D] of a float type, page_table [B, max_pages], lengths [B], int32.
ffi::Error DecodeRequests(const ffi::AnyBuffer& q, const ffi::AnyBuffer& page_table,
                          const ffi::AnyBuffer& q_lengths, const ffi::AnyBuffer& kv_lengths,
                          const char* q_name, DType* dtype) {
  if (auto e = FirstError({CheckRank(q, 4, q_name), CheckRank(page_table, 2, "page_table")});
      e.failure()) {
    return e;
  }
  auto type = ToDType(q.element_type());
  if (!type) {
    return ffi::Error::InvalidArgument(std::string("jax_msa: ") + q_name +
                                       " must be float32, bfloat16 or float16");
  }
  *dtype = *type;
  const int64_t B = q.dimensions()[0];
  return FirstError({CheckShape(page_table, {B, page_table.dimensions()[1]}, "page_table"),
                     CheckShape(q_lengths, {B}, "q_lengths"),
                     CheckShape(kv_lengths, {B}, "kv_lengths"),
                     CheckType(page_table, ffi::DataType::S32, "page_table"),
                     CheckType(q_lengths, ffi::DataType::S32, "q_lengths"),
                     CheckType(kv_lengths, ffi::DataType::S32, "kv_lengths")});
}

// The optional operand after the fixed ones: ids [B, Q, Hkv, topk] int32.
ffi::Error DecodeIds(const ffi::RemainingArgs& rest, const cpu::PagedProblem& p,
                     const int32_t** ids, int64_t* topk) {
  *ids = nullptr;
  *topk = 0;
  if (rest.empty()) return ffi::Error::Success();
  if (rest.size() > 1) return ffi::Error::InvalidArgument("jax_msa: too many operands");
  auto buffer = rest.get<ffi::AnyBuffer>(0);
  if (!buffer.has_value()) return buffer.error();
  if (auto e = FirstError({CheckRank(*buffer, 4, "ids"), CheckType(*buffer, ffi::DataType::S32, "ids")});
      e.failure()) {
    return e;
  }
  *topk = buffer->dimensions()[3];
  *ids = DataOf<int32_t>(*buffer);
  return CheckShape(*buffer, {p.B, p.Q, p.Hkv, *topk}, "ids");
}

// paged_attention's operands and results, checked (both platforms): the
// problem, dtypes and the optional ids.
struct AttentionOperands {
  cpu::PagedProblem p;
  int64_t num_pages;
  DType q_dtype, out_dtype;
  const int32_t* ids;
  int64_t topk;  // 0: dense
};

ffi::Error DecodeAttention(const ffi::AnyBuffer& k_cache, const ffi::AnyBuffer& v_cache,
                           const ffi::AnyBuffer& k_scale, const ffi::AnyBuffer& v_scale,
                           const ffi::AnyBuffer& q, const ffi::AnyBuffer& page_table,
                           const ffi::AnyBuffer& q_lengths, const ffi::AnyBuffer& kv_lengths,
                           const ffi::RemainingArgs& rest, ffi::Result<ffi::AnyBuffer>& out,
                           ffi::Result<ffi::AnyBuffer>& lse, float scale, AttentionOperands* a) {
  if (auto e = FirstError({CheckCache(k_cache, k_scale, true, "k_cache", "k_scale"),
                           CheckCache(v_cache, v_scale, true, "v_cache", "v_scale"),
                           DecodeRequests(q, page_table, q_lengths, kv_lengths, "q", &a->q_dtype)});
      e.failure()) {
    return e;
  }
  auto qd = q.dimensions(), kd = k_cache.dimensions();
  a->p = {qd[0], qd[1], qd[2], kd[1], qd[3], page_table.dimensions()[1], scale};
  a->num_pages = kd[0];
  const cpu::PagedProblem& p = a->p;
  if (p.Hkv == 0 || p.Hq % p.Hkv != 0) {
    return ffi::Error::InvalidArgument("jax_msa: q heads must be a multiple of the cache's kv heads");
  }
  auto out_dtype = ToDType(out->element_type());
  if (!out_dtype) return ffi::Error::InvalidArgument("jax_msa: out must be float32, bfloat16 or float16");
  a->out_dtype = *out_dtype;
  return FirstError({CheckShape(k_cache, {a->num_pages, p.Hkv, cpu::kBlock, p.D}, "k_cache"),
                     CheckShape(v_cache, {a->num_pages, p.Hkv, cpu::kBlock, p.D}, "v_cache"),
                     CheckShape(*out, {p.B, p.Q, p.Hq, p.D}, "out"),
                     CheckShape(*lse, {p.B, p.Q, p.Hq}, "lse"),
                     CheckType(*lse, ffi::DataType::F32, "lse"),
                     DecodeIds(rest, p, &a->ids, &a->topk)});
}

ffi::Error PagedAttentionCpu(ffi::AnyBuffer k_cache, ffi::AnyBuffer v_cache, ffi::AnyBuffer k_scale,
                             ffi::AnyBuffer v_scale, ffi::AnyBuffer q, ffi::AnyBuffer page_table,
                             ffi::AnyBuffer q_lengths, ffi::AnyBuffer kv_lengths,
                             ffi::RemainingArgs rest, ffi::Result<ffi::AnyBuffer> out,
                             ffi::Result<ffi::AnyBuffer> lse, float scale) {
  AttentionOperands a;
  if (auto e = DecodeAttention(k_cache, v_cache, k_scale, v_scale, q, page_table, q_lengths,
                               kv_lengths, rest, out, lse, scale, &a);
      e.failure()) {
    return e;
  }
  cpu::paged_attention(a.q_dtype, a.out_dtype, a.p, HostCache(k_cache, k_scale, true),
                       HostCache(v_cache, v_scale, true), DataOf<int32_t>(page_table),
                       DataOf<int32_t>(q_lengths), DataOf<int32_t>(kv_lengths), a.ids, a.topk,
                       q.untyped_data(), out->untyped_data(), DataOf<float>(lse));
  return ffi::Error::Success();
}

ffi::Error PagedIndexerCpu(ffi::AnyBuffer ki_cache, ffi::AnyBuffer ki_scale, ffi::AnyBuffer qi,
                           ffi::AnyBuffer page_table, ffi::AnyBuffer q_lengths,
                           ffi::AnyBuffer kv_lengths, ffi::Result<ffi::AnyBuffer> ids,
                           int64_t topk, float scale) {
  DType dtype;
  if (auto e = FirstError({CheckCache(ki_cache, ki_scale, false, "ki_cache", "ki_scale"),
                           DecodeRequests(qi, page_table, q_lengths, kv_lengths, "qi", &dtype)});
      e.failure()) {
    return e;
  }
  const cpu::PagedCache ki = HostCache(ki_cache, ki_scale, false);
  auto d = qi.dimensions();
  const int64_t B = d[0], Q = d[1], Hi = d[2], Di = d[3], max_pages = page_table.dimensions()[1];
  if (auto e = FirstError({CheckShape(ki_cache, {ki.num_pages, cpu::kBlock, Di}, "ki_cache"),
                           CheckShape(*ids, {B, Q, Hi, topk}, "ids"),
                           CheckType(*ids, ffi::DataType::S32, "ids")});
      e.failure()) {
    return e;
  }
  cpu::paged_indexer(dtype, qi.untyped_data(), ki, DataOf<int32_t>(page_table),
                     DataOf<int32_t>(q_lengths), DataOf<int32_t>(kv_lengths), DataOf<int32_t>(ids),
                     B, Q, Hi, Di, max_pages, topk, scale);
  return ffi::Error::Success();
}

#ifdef JAX_MSA_WITH_CUDA
// paged_indexer on CUDA is paged_indexer_scores -> indexer_select
// (jax_msa/paged.py), the scores an ordinary XLA buffer between them.
// paged_indexer_scores: paged_indexer's operands -> scores [B, Q, Hi,
// max_pages] float32. ki_scale stays in device memory: the kernel reads it, so
// nothing here waits for the device.
ffi::Error PagedIndexerScoresCuda(cudaStream_t stream, ffi::AnyBuffer ki_cache,
                                  ffi::AnyBuffer ki_scale, ffi::AnyBuffer qi,
                                  ffi::AnyBuffer page_table, ffi::AnyBuffer q_lengths,
                                  ffi::AnyBuffer kv_lengths, ffi::Result<ffi::AnyBuffer> scores,
                                  float scale) {
  DType dtype;
  if (auto e = FirstError({CheckCache(ki_cache, ki_scale, false, "ki_cache", "ki_scale"),
                           DecodeRequests(qi, page_table, q_lengths, kv_lengths, "qi", &dtype)});
      e.failure()) {
    return e;
  }
  auto d = qi.dimensions();
  const cuda::PagedIndexerArgs args{qi.untyped_data(),
                                    ki_cache.untyped_data(),
                                    DataOf<float>(ki_scale),
                                    DataOf<int32_t>(page_table),
                                    DataOf<int32_t>(q_lengths),
                                    DataOf<int32_t>(kv_lengths),
                                    d[0], d[1], d[2], d[3],
                                    ki_cache.dimensions()[0],
                                    page_table.dimensions()[1],
                                    scale};
  // The Python lowering sends other inputs to the reference: this only fires
  // for a direct caller of the target.
  auto cache = ToCacheType(ki_cache.element_type());
  if (!cache || !cuda::paged_indexer_scores_supported(dtype, *cache, args.Di)) {
    return ffi::Error::InvalidArgument(
        "jax_msa: the CUDA paged indexer takes bfloat16/float16 qi with head dim 64 or 128 and "
        "a ki_cache of qi's dtype or float8_e4m3fn");
  }
  if (auto e = FirstError(
          {CheckShape(ki_cache, {args.num_pages, cpu::kBlock, args.Di}, "ki_cache"),
           CheckShape(*scores, {args.B, args.Q, args.Hi, args.max_pages}, "scores"),
           CheckType(*scores, ffi::DataType::F32, "scores")});
      e.failure()) {
    return e;
  }
  cudaError_t status =
      cuda::paged_indexer_scores(dtype, *cache, args, DataOf<float>(scores), stream);
  if (status != cudaSuccess) {
    return ffi::Error::Internal(std::string("jax_msa paged_indexer_scores: ") +
                                cudaGetErrorString(status));
  }
  return ffi::Error::Success();
}

// paged_attention on CUDA: paged_attention's operands -> out, lse and the
// split-KV workspace (an extra result, so nothing is allocated here); the
// scales stay in device memory, read by the kernel.
ffi::Error PagedAttentionCuda(cudaStream_t stream, ffi::AnyBuffer k_cache, ffi::AnyBuffer v_cache,
                              ffi::AnyBuffer k_scale, ffi::AnyBuffer v_scale, ffi::AnyBuffer q,
                              ffi::AnyBuffer page_table, ffi::AnyBuffer q_lengths,
                              ffi::AnyBuffer kv_lengths, ffi::RemainingArgs rest,
                              ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse,
                              ffi::Result<ffi::AnyBuffer> workspace, float scale, int64_t splits) {
  AttentionOperands a;
  if (auto e = DecodeAttention(k_cache, v_cache, k_scale, v_scale, q, page_table, q_lengths,
                               kv_lengths, rest, out, lse, scale, &a);
      e.failure()) {
    return e;
  }
  const cpu::PagedProblem& p = a.p;
  const cuda::PagedAttentionArgs args{q.untyped_data(),         k_cache.untyped_data(),
                                      v_cache.untyped_data(),   DataOf<float>(k_scale),
                                      DataOf<float>(v_scale),   DataOf<int32_t>(page_table),
                                      DataOf<int32_t>(q_lengths), DataOf<int32_t>(kv_lengths),
                                      a.ids,                    p.B,
                                      p.Q,                      p.Hq,
                                      p.Hkv,                    p.D,
                                      a.num_pages,              p.max_pages,
                                      a.topk,                   scale,
                                      splits};
  auto cache = ToCacheType(k_cache.element_type());
  // The Python lowering sends other inputs to the reference: this only fires
  // for a direct caller of the target.
  if (k_cache.element_type() != v_cache.element_type() ||
      !cuda::paged_attention_supported(a.q_dtype, *cache, args)) {
    return ffi::Error::InvalidArgument(
        "jax_msa: the CUDA paged attention takes bfloat16/float16 q with D = 128, "
        "Hq / Hkv <= 128, topk <= 64, and k/v caches both of q's dtype or both float8_e4m3fn");
  }
  if (auto e = FirstError(
          {CheckShape(*workspace, {cuda::paged_attention_workspace_floats(args)}, "workspace"),
           CheckType(*workspace, ffi::DataType::F32, "workspace")});
      e.failure()) {
    return e;
  }
  // The Blackwell family has no paged attention: the portable one serves there.
  const auto attention = cuda::by_family(cuda::paged_attention, cuda::portable_paged_attention,
                                         cuda::portable_paged_attention);
  cudaError_t status = attention(a.q_dtype, *cache, a.out_dtype, args, DataOf<float>(workspace),
                                 out->untyped_data(), DataOf<float>(lse), stream);
  if (status != cudaSuccess) {
    return ffi::Error::Internal(std::string("jax_msa paged_attention: ") +
                                cudaGetErrorString(status));
  }
  return ffi::Error::Success();
}
#endif

}  // namespace

// paged_attention's operands: k_cache, v_cache, k_scale, v_scale, q,
// page_table, q_lengths, kv_lengths, then ids (sparse) or none (dense) ->
// out, lse.
template <class Binding>
auto WithAttentionOperands(Binding binding) {
  return std::move(binding)
      .template Arg<ffi::AnyBuffer>()   // k_cache
      .template Arg<ffi::AnyBuffer>()   // v_cache
      .template Arg<ffi::AnyBuffer>()   // k_scale
      .template Arg<ffi::AnyBuffer>()   // v_scale
      .template Arg<ffi::AnyBuffer>()   // q
      .template Arg<ffi::AnyBuffer>()   // page_table
      .template Arg<ffi::AnyBuffer>()   // q_lengths
      .template Arg<ffi::AnyBuffer>()   // kv_lengths
      .RemainingArgs()                  // ids (sparse) or none (dense)
      .template Ret<ffi::AnyBuffer>()   // out
      .template Ret<ffi::AnyBuffer>();  // lse
}

// paged_indexer's operands: ki_cache, ki_scale, qi, page_table, q_lengths,
// kv_lengths (its result differs by platform: ids, or the CUDA scores).
template <class Binding>
auto WithIndexerOperands(Binding binding) {
  return std::move(binding)
      .template Arg<ffi::AnyBuffer>()   // ki_cache
      .template Arg<ffi::AnyBuffer>()   // ki_scale
      .template Arg<ffi::AnyBuffer>()   // qi
      .template Arg<ffi::AnyBuffer>()   // page_table
      .template Arg<ffi::AnyBuffer>()   // q_lengths
      .template Arg<ffi::AnyBuffer>();  // kv_lengths
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(kPagedAttentionCpu, PagedAttentionCpu,
                              WithAttentionOperands(ffi::Ffi::Bind()).Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(kPagedIndexerCpu, PagedIndexerCpu,
                              WithIndexerOperands(ffi::Ffi::Bind())
                                  .Ret<ffi::AnyBuffer>()  // ids
                                  .Attr<int64_t>("topk")
                                  .Attr<float>("scale"));

#ifdef JAX_MSA_WITH_CUDA
JAX_MSA_CUDA_HANDLER(kPagedAttentionCuda, PagedAttentionCuda,
                     WithAttentionOperands(CudaBind())
                         .Ret<ffi::AnyBuffer>()  // workspace
                         .Attr<float>("scale")
                         .Attr<int64_t>("splits"));

JAX_MSA_CUDA_HANDLER(kPagedIndexerScoresCuda, PagedIndexerScoresCuda,
                     WithIndexerOperands(CudaBind())
                         .Ret<ffi::AnyBuffer>()  // scores
                         .Attr<float>("scale"));
#endif

void AddPagedTargets(TargetTable& table) {
  table.cpu.emplace_back("jax_msa_paged_attention", kPagedAttentionCpu);
  table.cpu.emplace_back("jax_msa_paged_indexer", kPagedIndexerCpu);
#ifdef JAX_MSA_WITH_CUDA
  table.cuda.emplace_back("jax_msa_paged_attention_cuda", kPagedAttentionCuda);
  table.cuda.emplace_back("jax_msa_paged_indexer_scores", kPagedIndexerScoresCuda);
  table.portable.emplace_back("jax_msa_paged_attention_cuda");
  table.portable.emplace_back("jax_msa_paged_indexer_scores");
#endif
}

}  // namespace jax_msa
