// FFI handlers of block-sparse attention (spec §3.4): forward and backward.
#include <cstdint>
#include <utility>

#include "ffi/attention_common.h"
#ifdef JAX_MSA_WITH_CUDA
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/kernel_family.h"
#endif

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

#ifdef JAX_MSA_WITH_CUDA
// The SM90 kernels take what cuda::sparse_attention_supported says; the Python
// lowering sends every other case to the pure-JAX reference, so this error
// only reaches a direct caller of the target.
ffi::Error CudaArgs(const cpu::AttentionProblem& p, DType dtype, const ffi::AnyBuffer& q,
                    const ffi::AnyBuffer& k, const ffi::AnyBuffer& v, const ffi::AnyBuffer& ids,
                    const ffi::AnyBuffer& q_lengths, const ffi::AnyBuffer& kv_lengths,
                    cuda::SparseAttentionArgs* args) {
  const int64_t topk = ids.dimensions()[3];
  *args = {q.untyped_data(), k.untyped_data(), v.untyped_data(), DataOf<int32_t>(ids),
           DataOf<int32_t>(q_lengths), DataOf<int32_t>(kv_lengths), p.B, p.Sq, p.Sk, p.Hq,
           p.Hkv, p.D, topk, p.scale};
  if (!cuda::sparse_attention_args_valid(dtype, *args)) {
    return ffi::Error::InvalidArgument(
        "jax_msa: the CUDA sparse-attention kernels take bfloat16/float16 inputs with head dim "
        "128, at most 64 query heads per kv head, topk 1..64, 0 < Sk < 2^31 - 256 and "
        "B * Hkv <= 65535");
  }
  return ffi::Error::Success();
}

// Decodes and checks what every CUDA handler takes: q, k, v, ids, lengths and
// (out, lse): the forward's results, or in the backward its saved ones.
ffi::Error DecodeCudaProblem(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                             const ffi::AnyBuffer& v, const ffi::AnyBuffer& ids,
                             const ffi::AnyBuffer& q_lengths, const ffi::AnyBuffer& kv_lengths,
                             const ffi::AnyBuffer& out, const ffi::AnyBuffer& lse, float scale,
                             cpu::AttentionProblem* p, DType* dtype,
                             cuda::SparseAttentionArgs* args) {
  if (auto e = DecodeAttentionInputs(q, k, v, q_lengths, kv_lengths, scale, p, dtype);
      e.failure()) {
    return e;
  }
  if (auto e = FirstError({CheckIds(*p, ids), CheckForwardOutputs(*p, out, lse)}); e.failure()) {
    return e;
  }
  return CudaArgs(*p, *dtype, q, k, v, ids, q_lengths, kv_lengths, args);
}

ffi::Error SparseAttentionFwdCuda(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k,
                                  ffi::AnyBuffer v, ffi::AnyBuffer ids, ffi::AnyBuffer q_lengths,
                                  ffi::AnyBuffer kv_lengths, ffi::Result<ffi::AnyBuffer> out,
                                  ffi::Result<ffi::AnyBuffer> lse, float scale) {
  cpu::AttentionProblem p;
  DType dtype;
  cuda::SparseAttentionArgs args;
  if (auto e = DecodeCudaProblem(q, k, v, ids, q_lengths, kv_lengths, *out, *lse, scale, &p, &dtype,
                                 &args);
      e.failure()) {
    return e;
  }
  const auto forward = cuda::by_family(cuda::sparse_attention_fwd,
                                       cuda::sm100_sparse_attention_fwd,
                                       cuda::portable_sparse_attention_fwd);
  return CudaStatus("sparse_attention_fwd",
                    forward(dtype, args, out->untyped_data(), DataOf<float>(lse), stream));
}

// The KV-outer forward (kAuto: or the query-outer one, picked on the device):
// out, lse plus two workspaces (sized by
// cuda::sparse_attention_fwd_by_block_workspace, asked for by the Python side).
template <bool kAuto>
ffi::Error SparseAttentionFwdByBlockCuda(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k,
                                         ffi::AnyBuffer v, ffi::AnyBuffer ids,
                                         ffi::AnyBuffer q_lengths, ffi::AnyBuffer kv_lengths,
                                         ffi::Result<ffi::AnyBuffer> out,
                                         ffi::Result<ffi::AnyBuffer> lse,
                                         ffi::Result<ffi::AnyBuffer> index,
                                         ffi::Result<ffi::AnyBuffer> partial, float scale) {
  cpu::AttentionProblem p;
  DType dtype;
  cuda::SparseAttentionArgs args;
  if (auto e = DecodeCudaProblem(q, k, v, ids, q_lengths, kv_lengths, *out, *lse, scale, &p, &dtype,
                                 &args);
      e.failure()) {
    return e;
  }
  const cuda::SparseFwdByBlockWorkspace need = cuda::sparse_attention_fwd_by_block_workspace(args);
  if (auto e = FirstError({CheckShape(*index, {need.index_ints}, "index workspace"),
                           CheckShape(*partial, {need.partial_bytes}, "partial workspace"),
                           CheckType(*index, ffi::DataType::S32, "index workspace"),
                           CheckType(*partial, ffi::DataType::U8, "partial workspace")});
      e.failure()) {
    return e;
  }
  const auto run = kAuto ? cuda::sparse_attention_fwd_auto : cuda::sparse_attention_fwd_by_block;
  return CudaStatus(kAuto ? "sparse_attention_fwd_auto" : "sparse_attention_fwd_by_block",
                    run(dtype, args, DataOf<int32_t>(index), partial->untyped_data(),
                        out->untyped_data(), DataOf<float>(lse), stream));
}

// The backward on CUDA: dq, dk, dv plus four workspaces (sized by
// cuda::sparse_attention_bwd_workspace; the Python side asks for them as
// results, so nothing is allocated here): prepare (delta, block index), then
// the KV-outer dK / dV kernel and the query-outer dQ kernel (bitwise
// reproducible on a device), always with `deterministic` (dq_accum is then
// empty), and by default only where the device picks them from the ids
// (small tile unions: window-like ids); otherwise dK / dV with dQ fused
// (float32 atomic sums into the dq_accum workspace). Where the portable
// family serves: the same prepare, then its dQ and dK / dV kernels.
ffi::Error SparseAttentionBwdCuda(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k,
                                  ffi::AnyBuffer v, ffi::AnyBuffer ids, ffi::AnyBuffer out,
                                  ffi::AnyBuffer lse, ffi::AnyBuffer dout, ffi::AnyBuffer dlse,
                                  ffi::AnyBuffer q_lengths, ffi::AnyBuffer kv_lengths,
                                  ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                                  ffi::Result<ffi::AnyBuffer> dv,
                                  ffi::Result<ffi::AnyBuffer> delta,
                                  ffi::Result<ffi::AnyBuffer> index,
                                  ffi::Result<ffi::AnyBuffer> partial,
                                  ffi::Result<ffi::AnyBuffer> dq_accum, float scale,
                                  bool deterministic) {
  cpu::AttentionProblem p;
  DType dtype;
  cuda::SparseAttentionArgs args;
  if (auto e = DecodeCudaProblem(q, k, v, ids, q_lengths, kv_lengths, out, lse, scale, &p, &dtype,
                                 &args);
      e.failure()) {
    return e;
  }
  const cuda::KvOuterBwdWorkspace need = cuda::sparse_attention_bwd_workspace(args);
  if (auto e = FirstError({CheckForwardOutputs(p, dout, dlse), CheckGradients(p, *dq, *dk, *dv),
                           CheckType(out, q.element_type(), "out"),
                           CheckType(dout, q.element_type(), "dout"),
                           CheckBwdWorkspaces(*delta, *index, *partial, *dq_accum, need,
                                              deterministic ? 0 : need.dq_accum_floats)});
      e.failure()) {
    return e;
  }
  if (auto e = CudaStatus("sparse_attention_bwd (prepare)",
                          cuda::sparse_attention_bwd_prepare(
                              dtype, args, out.untyped_data(), dout.untyped_data(),
                              DataOf<float>(dlse), DataOf<float>(delta), DataOf<int32_t>(index),
                              stream));
      e.failure()) {
    return e;
  }
  // Off Hopper (the Blackwell family has no backward): the portable family,
  // dq query-outer, dk / dv over the index, both deterministic (dq_accum and
  // partial unused).
  if (cuda::kernel_family() != cuda::KernelFamily::kHopper) {
    if (auto e = CudaStatus("sparse_attention_bwd (dq)",
                            cuda::portable_sparse_attention_bwd_dq(
                                dtype, args, DataOf<float>(lse), dout.untyped_data(),
                                DataOf<float>(delta), dq->untyped_data(), stream));
        e.failure()) {
      return e;
    }
    return CudaStatus("sparse_attention_bwd (dk, dv)",
                      cuda::portable_sparse_attention_bwd_dkdv(
                          dtype, args, DataOf<float>(lse), dout.untyped_data(),
                          DataOf<float>(delta), DataOf<int32_t>(index), dk->untyped_data(),
                          dv->untyped_data(), stream));
  }
  // The device's choice between the two dQ (none without blocks to visit).
  cuda::ScheduleCosts* costs = nullptr;
  if (!deterministic && need.index_ints > 0) {
    costs = reinterpret_cast<cuda::ScheduleCosts*>(DataOf<int32_t>(index) + need.index_ints -
                                                   cuda::kScheduleCostsInts);
    if (auto e = CudaStatus("sparse_attention_bwd (schedule costs)",
                            cuda::sparse_schedule_costs(dtype, args, costs, stream));
        e.failure()) {
      return e;
    }
  }
  if (auto e = CudaStatus("sparse_attention_bwd (dk, dv)",
                          cuda::sparse_attention_bwd_dkdv(
                              dtype, args, DataOf<float>(lse), dout.untyped_data(),
                              DataOf<float>(delta), DataOf<int32_t>(index), DataOf<float>(partial),
                              deterministic ? nullptr : DataOf<float>(dq_accum),
                              dq->untyped_data(), dk->untyped_data(), dv->untyped_data(), stream,
                              costs));
      e.failure()) {
    return e;
  }
  if (!deterministic && costs == nullptr) return ffi::Error::Success();
  return CudaStatus("sparse_attention_bwd (dq)",
                    cuda::sparse_attention_bwd_dq(dtype, args, DataOf<float>(lse),
                                                  dout.untyped_data(), DataOf<float>(delta),
                                                  dq->untyped_data(), stream, costs));
}
#endif

}  // namespace

namespace {

// The operands and results every forward handler starts with, after what
// `binding` holds already (the CUDA stream or nothing): q, k, v, ids,
// q_lengths, kv_lengths -> out, lse. Bind().To(handler) checks the order
// against each handler's signature at compile time.
template <class Binding>
auto WithFwdOperands(Binding binding) {
  return WithLengthsOutLse(WithQKV(std::move(binding)).template Arg<ffi::AnyBuffer>());  // ids
}

// Likewise for the backward: q, k, v, ids, out, lse, dout, dlse, q_lengths,
// kv_lengths -> dq, dk, dv.
template <class Binding>
auto WithBwdOperands(Binding binding) {
  return WithBwdTail(WithQKV(std::move(binding)).template Arg<ffi::AnyBuffer>());  // ids
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kSparseAttentionFwdCpu, SparseAttentionFwdCpu,
                              WithFwdOperands(ffi::Ffi::Bind()).Attr<float>("scale"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(kSparseAttentionBwdCpu, SparseAttentionBwdCpu,
                              WithBwdOperands(ffi::Ffi::Bind()).Attr<float>("scale"));

#ifdef JAX_MSA_WITH_CUDA
namespace {

// The by-block and auto forwards: the forward plus two workspaces.
auto FwdWithWorkspacesBinding() {
  return WithFwdOperands(CudaBind())
      .Ret<ffi::AnyBuffer>()  // index workspace
      .Ret<ffi::AnyBuffer>()  // partial workspace
      .Attr<float>("scale");
}

}  // namespace

JAX_MSA_CUDA_HANDLER(kSparseAttentionFwdCuda, SparseAttentionFwdCuda,
                     WithFwdOperands(CudaBind()).Attr<float>("scale"));
JAX_MSA_CUDA_HANDLER(kSparseAttentionFwdByBlockCuda, SparseAttentionFwdByBlockCuda<false>,
                     FwdWithWorkspacesBinding());
JAX_MSA_CUDA_HANDLER(kSparseAttentionFwdAutoCuda, SparseAttentionFwdByBlockCuda<true>,
                     FwdWithWorkspacesBinding());
JAX_MSA_CUDA_HANDLER(kSparseAttentionBwdCuda, SparseAttentionBwdCuda,
                     WithKvOuterWorkspaces(WithBwdOperands(CudaBind()))
                         .Attr<bool>("deterministic"));
#endif

void AddSparseAttentionTargets(TargetTable& table) {
  table.cpu.emplace_back("jax_msa_sparse_attention_fwd", kSparseAttentionFwdCpu);
  table.cpu.emplace_back("jax_msa_sparse_attention_bwd", kSparseAttentionBwdCpu);
#ifdef JAX_MSA_WITH_CUDA
  table.cuda.emplace_back("jax_msa_sparse_attention_fwd_query", kSparseAttentionFwdCuda);
  table.portable.emplace_back("jax_msa_sparse_attention_fwd_query");
  table.blackwell.emplace_back("jax_msa_sparse_attention_fwd_query");
  table.cuda.emplace_back("jax_msa_sparse_attention_fwd_by_block", kSparseAttentionFwdByBlockCuda);
  table.cuda.emplace_back("jax_msa_sparse_attention_fwd_auto", kSparseAttentionFwdAutoCuda);
  table.cuda.emplace_back("jax_msa_sparse_attention_bwd_cuda", kSparseAttentionBwdCuda);
  table.portable.emplace_back("jax_msa_sparse_attention_bwd_cuda");
#endif
}

}  // namespace jax_msa
