// The nanobind module: exports the FFI targets of every op family, by
// platform, as capsules for jax.ffi.register_ffi_target.
#include <optional>
#include <string>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include "ffi/ffi_common.h"
#include "kernels/family_state.h"
#ifdef JAX_MSA_WITH_CUDA
#include "kernels/cuda/cuda_kernels.h"
#endif

namespace nb = nanobind;

namespace {

const jax_msa::TargetTable& Targets() {
  static const jax_msa::TargetTable table = [] {
    jax_msa::TargetTable t;
    jax_msa::AddIndexerTargets(t);
    jax_msa::AddSparseAttentionTargets(t);
    jax_msa::AddDenseAttentionTargets(t);
    jax_msa::AddPagedTargets(t);
    jax_msa::AddIndexerLossTargets(t);
    return t;
  }();
  return table;
}

nb::list Names(const std::vector<std::string>& targets) {
  nb::list names;
  for (const auto& name : targets) names.append(nb::str(name.c_str()));
  return names;
}

constexpr const char* kRequestNames[] = {"by_device", "native", "portable"};
constexpr const char* kCheckNames[] = {"unchecked", "passed", "failed"};

// The index of `name` in `names`, or a ValueError.
template <size_t N>
int IndexOf(const char* const (&names)[N], const std::string& name) {
  for (size_t i = 0; i < N; ++i) {
    if (name == names[i]) return static_cast<int>(i);
  }
  throw nb::value_error(("jax_msa: unknown value " + name).c_str());
}

nb::dict ToDict(const std::vector<std::pair<std::string, XLA_FFI_Handler*>>& targets) {
  nb::dict d;
  for (const auto& [name, handler] : targets) {
    d[name.c_str()] = nb::capsule(reinterpret_cast<void*>(handler));
  }
  return d;
}

#ifdef JAX_MSA_WITH_CUDA
// The shape of a sparse-attention problem (no data): what workspace sizes depend on.
jax_msa::cuda::SparseAttentionArgs SparseProblem(int64_t B, int64_t Sq, int64_t Sk, int64_t Hq,
                                                 int64_t Hkv, int64_t D, int64_t topk) {
  jax_msa::cuda::SparseAttentionArgs a{};
  a.B = B, a.Sq = Sq, a.Sk = Sk, a.Hq = Hq, a.Hkv = Hkv, a.D = D, a.topk = topk;
  return a;
}

// A KV-outer backward's workspace sizes as Python sees them.
nb::tuple WorkspaceCounts(const jax_msa::cuda::KvOuterBwdWorkspace& w) {
  return nb::make_tuple(w.delta_floats, w.index_ints, w.partial_floats, w.dq_accum_floats);
}
#endif

}  // namespace

NB_MODULE(_jax_msa, m) {
  m.doc() = "XLA FFI targets of jax_msa";
  m.def("cpu_targets", [] { return ToDict(Targets().cpu); },
        "Target name -> FFI handler capsule for platform 'cpu'.");
  m.def("cuda_targets", [] { return ToDict(Targets().cuda); },
        "Target name -> FFI handler capsule for platform 'CUDA' (empty without CUDA).");
  m.def("portable_cuda_targets", [] { return Names(Targets().portable); },
        "The CUDA targets that also serve on any GPU since sm_80 (the portable family).");
  m.def("blackwell_cuda_targets", [] { return Names(Targets().blackwell); },
        "The CUDA targets with a Blackwell-family kernel (sm_100a).");
  // kernels/family_state.h, for jax_msa/_self_check.py and the lowering's gate.
  m.def("family_request",
        [] { return kRequestNames[static_cast<int>(jax_msa::requested_family())]; },
        "The kernel family asked for: 'by_device', 'native' or 'portable' (the self-check's "
        "override, else JAX_MSA_KERNELS).");
  m.def(
      "set_family_override",
      [](std::optional<std::string> request) {
        jax_msa::family_request_override().store(request ? IndexOf(kRequestNames, *request) : -1);
      },
      nb::arg("request").none(),
      "Asks for a family ('by_device', 'native', 'portable') ahead of JAX_MSA_KERNELS; None: "
      "JAX_MSA_KERNELS decides again.");
  m.def("native_check",
        [] { return kCheckNames[jax_msa::native_check_state().load()]; },
        "The native family's self-check: 'unchecked', 'passed' or 'failed'.");
  m.def(
      "set_native_check",
      [](const std::string& state) {
        jax_msa::native_check_state().store(IndexOf(kCheckNames, state));
      },
      "Records the native family's self-check ('unchecked', 'passed' or 'failed').");
#ifdef JAX_MSA_WITH_CUDA
  m.attr("with_cuda") = true;
  m.attr("cuda_architectures") = JAX_MSA_CUDA_ARCHITECTURES;  // e.g. "90a" or "90a,100a"
  m.def(
      "sparse_bwd_workspace",
      [](int64_t B, int64_t Sq, int64_t Sk, int64_t Hq, int64_t Hkv, int64_t D, int64_t topk) {
        return WorkspaceCounts(jax_msa::cuda::sparse_attention_bwd_workspace(
            SparseProblem(B, Sq, Sk, Hq, Hkv, D, topk)));
      },
      "Workspace element counts (delta floats, index ints, partial floats, dq_accum floats) of "
      "the CUDA sparse attention backward.");
  m.def(
      "dense_bwd_workspace",
      [](int64_t B, int64_t Sq, int64_t Sk, int64_t Hq, int64_t Hkv, int64_t D) {
        jax_msa::cuda::DenseAttentionArgs a{};
        a.B = B, a.Sq = Sq, a.Sk = Sk, a.Hq = Hq, a.Hkv = Hkv, a.D = D;
        return WorkspaceCounts(jax_msa::cuda::dense_attention_bwd_workspace(a));
      },
      "Workspace element counts (delta floats, index ints, partial floats, dq_accum floats) of "
      "the CUDA dense attention backward.");
  m.def(
      "sparse_fwd_by_block_workspace",
      [](int64_t B, int64_t Sq, int64_t Sk, int64_t Hq, int64_t Hkv, int64_t D, int64_t topk) {
        const auto w = jax_msa::cuda::sparse_attention_fwd_by_block_workspace(
            SparseProblem(B, Sq, Sk, Hq, Hkv, D, topk));
        return nb::make_tuple(w.index_ints, w.partial_bytes);
      },
      "Workspace sizes (index ints, partial bytes) of the CUDA KV-outer sparse attention forward.");
  m.def(
      "paged_attention_workspace",
      [](int64_t B, int64_t Q, int64_t Hq, int64_t D, int64_t splits) {
        jax_msa::cuda::PagedAttentionArgs a{};
        a.B = B, a.Q = Q, a.Hq = Hq, a.D = D, a.splits = splits;
        return jax_msa::cuda::paged_attention_workspace_floats(a);
      },
      "Float32 elements of the CUDA paged attention's split-KV workspace.");
  m.def(
      "paged_attention_splits",
      [](int64_t B, int64_t Q, int64_t Hq, int64_t Hkv, int64_t max_pages, int64_t topk) {
        jax_msa::cuda::PagedAttentionArgs a{};
        a.B = B, a.Q = Q, a.Hq = Hq, a.Hkv = Hkv, a.max_pages = max_pages, a.topk = topk;
        return jax_msa::cuda::paged_attention_splits(a);
      },
      "CTAs per tile of the CUDA paged attention (split-KV) for these shapes on this device.");
#else
  m.attr("with_cuda") = false;
  m.attr("cuda_architectures") = "";
#endif
}
