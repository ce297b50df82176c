// FFI handlers of dense attention (spec §3.6): forward and backward.
#include <cstdint>
#include <utility>

#include "ffi/attention_common.h"
#ifdef JAX_MSA_WITH_CUDA
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/kernel_family.h"
#endif

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

#ifdef JAX_MSA_WITH_CUDA
cuda::DenseAttentionArgs CudaArgs(const cpu::AttentionProblem& p, const ffi::AnyBuffer& q,
                                  const ffi::AnyBuffer& k, const ffi::AnyBuffer& v,
                                  const ffi::AnyBuffer& q_lengths,
                                  const ffi::AnyBuffer& kv_lengths, bool causal) {
  return {q.untyped_data(),
          k.untyped_data(),
          v.untyped_data(),
          DataOf<int32_t>(q_lengths),
          DataOf<int32_t>(kv_lengths),
          p.B, p.Sq, p.Sk, p.Hq, p.Hkv, p.D, p.scale, causal};
}

// The SM90 forward takes what cuda::dense_attention_args_valid says; the
// Python lowering sends every other case to the pure-JAX reference, so this
// error only reaches a direct caller of the target.
ffi::Error DenseAttentionFwdCuda(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k,
                                 ffi::AnyBuffer v, ffi::AnyBuffer q_lengths,
                                 ffi::AnyBuffer kv_lengths, ffi::Result<ffi::AnyBuffer> out,
                                 ffi::Result<ffi::AnyBuffer> lse, float scale, bool causal) {
  cpu::AttentionProblem p;
  DType dtype;
  if (auto e = DecodeAttentionInputs(q, k, v, q_lengths, kv_lengths, scale, &p, &dtype);
      e.failure()) {
    return e;
  }
  if (auto e = FirstError({CheckForwardOutputs(p, *out, *lse),
                           CheckType(*out, q.element_type(), "out")});
      e.failure()) {
    return e;
  }
  const cuda::DenseAttentionArgs args = CudaArgs(p, q, k, v, q_lengths, kv_lengths, causal);
  if (!cuda::dense_attention_args_valid(dtype, args)) {
    return ffi::Error::InvalidArgument(
        "jax_msa: the CUDA dense-attention forward takes bfloat16/float16 inputs with head dim "
        "128 or 64, 0 < Sk < 2^31 - 256 and ceil(Sq / 128) * B * Hq < 2^31");
  }
  // The Blackwell forward has head dim 128 only.
  const auto forward = cuda::by_family(
      cuda::dense_attention_fwd,
      args.D == 128 ? cuda::sm100_dense_attention_fwd : cuda::portable_dense_attention_fwd,
      cuda::portable_dense_attention_fwd);
  return CudaStatus("dot_product_attention_fwd",
                    forward(dtype, args, out->untyped_data(), DataOf<float>(lse), stream));
}

// The CUDA backward, Hopper or portable family (cuda::dense_attention_bwd_args_valid;
// the Python lowering sends other cases to the reference): dq, dk, dv and the four
// workspaces of cuda::dense_attention_bwd_workspace as extra results, so that
// the handler allocates nothing.
ffi::Error DenseAttentionBwdCuda(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k,
                                 ffi::AnyBuffer v, ffi::AnyBuffer out, ffi::AnyBuffer lse,
                                 ffi::AnyBuffer dout, ffi::AnyBuffer dlse,
                                 ffi::AnyBuffer q_lengths, ffi::AnyBuffer kv_lengths,
                                 ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                                 ffi::Result<ffi::AnyBuffer> dv,
                                 ffi::Result<ffi::AnyBuffer> delta,
                                 ffi::Result<ffi::AnyBuffer> index,
                                 ffi::Result<ffi::AnyBuffer> partial,
                                 ffi::Result<ffi::AnyBuffer> dq_accum, float scale, bool causal,
                                 bool with_dq_accum) {
  cpu::AttentionProblem p;
  DType dtype;
  if (auto e = DecodeAttentionInputs(q, k, v, q_lengths, kv_lengths, scale, &p, &dtype);
      e.failure()) {
    return e;
  }
  if (auto e = FirstError({CheckForwardOutputs(p, out, lse), CheckForwardOutputs(p, dout, dlse),
                           CheckGradients(p, *dq, *dk, *dv),
                           CheckType(out, q.element_type(), "out"),
                           CheckType(dout, q.element_type(), "dout"),
                           CheckType(dlse, ffi::DataType::F32, "dlse")});
      e.failure()) {
    return e;
  }
  const cuda::DenseAttentionArgs args = CudaArgs(p, q, k, v, q_lengths, kv_lengths, causal);
  if (!cuda::dense_attention_bwd_args_valid(dtype, args)) {
    return ffi::Error::InvalidArgument(
        "jax_msa: the CUDA dense-attention backward takes bfloat16/float16 inputs with head dim "
        "128, Hq / Hkv <= 64, 0 < Sk < 2^31 - 256 and B * Hkv * ceil(Sk / 128) < 2^31");
  }
  const cuda::KvOuterBwdWorkspace need = cuda::dense_attention_bwd_workspace(args);
  if (auto e = CheckBwdWorkspaces(*delta, *index, *partial, *dq_accum, need,
                                  with_dq_accum ? need.dq_accum_floats : 0);
      e.failure()) {
    return e;
  }
  if (cuda::kernel_family() != cuda::KernelFamily::kHopper || !with_dq_accum) {
    // The portable family (the Blackwell one has no backward): delta, then
    // its dq and dk / dv, which need no dq_accum. The lowering leaves that
    // workspace out wherever some device of the process runs the portable
    // family, so a Hopper device of such a process takes this way too.
    if (auto e = CudaStatus("dot_product_attention_bwd (delta)",
                            cuda::attention_bwd_delta(dtype, args, out.untyped_data(),
                                                      dout.untyped_data(), DataOf<float>(dlse),
                                                      DataOf<float>(delta), stream));
        e.failure()) {
      return e;
    }
    if (auto e = CudaStatus("dot_product_attention_bwd (dq)",
                            cuda::portable_dense_attention_bwd_dq(
                                dtype, args, DataOf<float>(lse), dout.untyped_data(),
                                DataOf<float>(delta), dq->untyped_data(), stream));
        e.failure()) {
      return e;
    }
    return CudaStatus("dot_product_attention_bwd (dk, dv)",
                      cuda::portable_dense_attention_bwd_dkdv(
                          dtype, args, DataOf<float>(lse), dout.untyped_data(),
                          DataOf<float>(delta), dk->untyped_data(), dv->untyped_data(), stream));
  }
  const cuda::DenseBwdWorkspacePtrs ws{DataOf<float>(delta), DataOf<float>(dq_accum)};
  return CudaStatus("dot_product_attention_bwd",
                    cuda::dense_attention_bwd(dtype, args, out.untyped_data(), DataOf<float>(lse),
                                              dout.untyped_data(), DataOf<float>(dlse), ws,
                                              dq->untyped_data(), dk->untyped_data(),
                                              dv->untyped_data(), stream));
}
#endif

// The forward's operands, results and attributes after what `binding` holds
// already (the CUDA stream or nothing): q, k, v, q_lengths, kv_lengths ->
// out, lse; scale, causal.
template <class Binding>
auto WithFwdOperands(Binding binding) {
  return WithLengthsOutLse(WithQKV(std::move(binding)))
      .template Attr<float>("scale")
      .template Attr<bool>("causal");
}

// The backward's: q, k, v, out, lse, dout, dlse, q_lengths, kv_lengths ->
// dq, dk, dv.
template <class Binding>
auto WithBwdOperands(Binding binding) {
  return WithBwdTail(WithQKV(std::move(binding)));
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kDenseAttentionFwdCpu, DenseAttentionFwdCpu,
                              WithFwdOperands(ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(kDenseAttentionBwdCpu, DenseAttentionBwdCpu,
                              WithBwdOperands(ffi::Ffi::Bind())
                                  .Attr<float>("scale")
                                  .Attr<bool>("causal"));

#ifdef JAX_MSA_WITH_CUDA
JAX_MSA_CUDA_HANDLER(kDenseAttentionFwdCuda, DenseAttentionFwdCuda,
                     WithFwdOperands(CudaBind()));
JAX_MSA_CUDA_HANDLER(kDenseAttentionBwdCuda, DenseAttentionBwdCuda,
                     WithKvOuterWorkspaces(WithBwdOperands(CudaBind()))
                         .Attr<bool>("causal")
                         .Attr<bool>("with_dq_accum"));
#endif

void AddDenseAttentionTargets(TargetTable& table) {
  table.cpu.emplace_back("jax_msa_dot_product_attention_fwd", kDenseAttentionFwdCpu);
  table.cpu.emplace_back("jax_msa_dot_product_attention_bwd", kDenseAttentionBwdCpu);
#ifdef JAX_MSA_WITH_CUDA
  table.cuda.emplace_back("jax_msa_dot_product_attention_fwd", kDenseAttentionFwdCuda);
  table.portable.emplace_back("jax_msa_dot_product_attention_fwd");
  table.blackwell.emplace_back("jax_msa_dot_product_attention_fwd");
  table.cuda.emplace_back("jax_msa_dot_product_attention_bwd_cuda", kDenseAttentionBwdCuda);
  table.portable.emplace_back("jax_msa_dot_product_attention_bwd_cuda");
#endif
}

}  // namespace jax_msa
