// CPU kernel of the indexer's KL loss (spec §3.8) and its gradient wrt the
// index queries and keys, fused: the teacher (attention) and the student
// (index scores) distributions over each selected set are computed once.
//
// Two passes, deterministic without atomics:
//  1. Per query, for each group g: the selected set S (the keys of the
//     selected blocks the query sees, as in sparse attention), the teacher
//     P_t = mean over the G heads of g of softmax(scale <q, k>) on S, the
//     student P_s = softmax(index_scale <qi, ki>) on S, KL(P_t || P_s) and
//     dqi = index_scale * sum_j (P_s - P_t)_j ki[j]. The normalisers (lse)
//     of both softmaxes are kept.
//  2. Per key block c: dki[j] = index_scale * sum of (P_s - P_t)_j qi[i, g]
//     over the (query, group) rows whose S holds block c, with P_t and P_s
//     recomputed on that block from the kept normalisers.
// The loops load the blocks they need on the fly (no float copy of k or ki).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/numeric.h"
#include "kernels/cpu/parallel.h"

namespace jax_msa::cpu {
namespace {

// Shape constants of one call.
struct LossDims {
  int64_t B, Sq, Sk, Hq, Hkv, D, G, Di, topk;
  float scale, index_scale;

  // Element offsets: the G query heads of group g of query i; key j of kv head g;
  // index query (i, g); index key j.
  int64_t q_offset(int64_t b, int64_t i, int64_t g) const { return ((b * Sq + i) * Hq + g * G) * D; }
  int64_t k_offset(int64_t b, int64_t j, int64_t g) const { return ((b * Sk + j) * Hkv + g) * D; }
  int64_t qi_offset(int64_t b, int64_t i, int64_t g) const { return ((b * Sq + i) * Hkv + g) * Di; }
  int64_t ki_offset(int64_t b, int64_t j) const { return (b * Sk + j) * Di; }
  const int32_t* ids_row(const int32_t* ids, int64_t b, int64_t i, int64_t g) const {
    return ids + ((b * Sq + i) * Hkv + g) * topk;
  }
};

// Keys [c*kBlock, c*kBlock + n) are visible to the query at position p; returns n.
int64_t visible(const Lengths& lengths, int64_t b, int64_t p, int64_t c) {
  return std::clamp<int64_t>(std::min(lengths.kv_len(b), p + 1) - c * kBlock, 0, kBlock);
}

// The blocks of S for query i (position p) of group g: the ids in [0, local
// block], ascending, a duplicate counted once. Returns their number.
int64_t selected_blocks(const LossDims& dims, const int32_t* ids, int64_t b, int64_t i, int64_t g,
                        int64_t p, int32_t* list) {
  const int32_t* row = dims.ids_row(ids, b, i, g);
  const int64_t L = local_block(p);
  int64_t n = 0;
  for (int64_t k = 0; k < dims.topk; ++k) {
    if (row[k] >= 0 && row[k] <= L) list[n++] = row[k];
  }
  std::sort(list, list + n);
  return std::unique(list, list + n) - list;
}

// Natural-log logsumexp of x[0, n); -inf when n = 0.
float logsumexp(const float* x, int64_t n) {
  const float m = row_max(x, n);
  if (m == kNegInf || m != m) return m;
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) sum += softmax_exp(x[j] - m);
  return m + std::log(sum);
}

// The G query heads of group g, scaled (teacher), and the index query,
// unscaled (dki needs it as is; the student logits are scaled after the product).
void load_query(DType dtype, DType index_dtype, const LossDims& dims, const void* q,
                const void* qi, int64_t b, int64_t i, int64_t g, float* q_rows, float* qi_row) {
  load_row(dtype, q, dims.q_offset(b, i, g), dims.G * dims.D, q_rows);
  for (int64_t e = 0; e < dims.G * dims.D; ++e) q_rows[e] *= dims.scale;
  load_row(index_dtype, qi, dims.qi_offset(b, i, g), dims.Di, qi_row);
}

// Pass 1 (see the top of the file). kl_rows[b*Sq + i]: the KL summed over
// the groups of query i; teacher_lse [B, Sq, Hq], student_lse [B, Sq, Hkv].
void per_query(DType dtype, DType index_dtype, const LossDims& dims, const Lengths& lengths,
               const int32_t* ids, const void* q, const void* k, const void* qi, const void* ki,
               float* kl_rows, float* teacher_lse, float* student_lse, void* dqi) {
  const int64_t G = dims.G, D = dims.D, Di = dims.Di, slots = dims.topk * kBlock;
  parallel_for(dims.B * dims.Sq, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> list(dims.topk);
    std::vector<int64_t> nvis(dims.topk);
    std::vector<float> q_rows(G * D), qi_row(Di), kt(D * kBlock), panel(G * kBlock);
    std::vector<float> kit(dims.topk * Di * kBlock);  // the ki blocks of S, transposed
    // On S, packed: the visible keys of its blocks one after the other.
    std::vector<float> teacher(G * slots), z(slots), pt(slots), dz(slots), grad(Di);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / dims.Sq, i = item % dims.Sq;
      kl_rows[item] = 0.0f;
      const bool valid_query = i < lengths.q_len(b);
      const int64_t p = lengths.position(b, i);
      for (int64_t g = 0; g < dims.Hkv; ++g) {
        const int64_t n = valid_query ? selected_blocks(dims, ids, b, i, g, p, list.data()) : 0;
        if (n > 0) load_query(dtype, index_dtype, dims, q, qi, b, i, g, q_rows.data(), qi_row.data());
        // Logits of the visible keys of S, packed: K of them.
        int64_t K = 0;
        for (int64_t x = 0; x < n; ++x) {
          const int64_t c = list[x];
          nvis[x] = visible(lengths, b, p, c);
          load_block_transposed(dtype, k, dims.k_offset(b, c * kBlock, g), dims.Hkv * D, nvis[x], D,
                                kt.data());
          std::fill(panel.begin(), panel.end(), 0.0f);
          gemm_acc(G, D, kBlock, q_rows.data(), D, 1, kt.data(), kBlock, panel.data(), kBlock);
          for (int64_t h = 0; h < G; ++h) {
            std::copy_n(panel.data() + h * kBlock, nvis[x], teacher.data() + h * slots + K);
          }
          float* kit_x = kit.data() + x * Di * kBlock;
          load_block_transposed(index_dtype, ki, dims.ki_offset(b, c * kBlock), Di, nvis[x], Di, kit_x);
          std::fill_n(panel.begin(), kBlock, 0.0f);
          gemm_acc(1, Di, kBlock, qi_row.data(), Di, 1, kit_x, kBlock, panel.data(), kBlock);
          for (int64_t j = 0; j < nvis[x]; ++j) z[K + j] = panel[j] * dims.index_scale;
          K += nvis[x];
        }

        float* lse_t = teacher_lse + (b * dims.Sq + i) * dims.Hq + g * G;
        std::fill(pt.begin(), pt.begin() + K, 0.0f);
        for (int64_t h = 0; h < G; ++h) {
          const float* row = teacher.data() + h * slots;
          lse_t[h] = logsumexp(row, K);
          for (int64_t j = 0; j < K; ++j) pt[j] += softmax_exp(row[j] - lse_t[h]) / G;
        }
        const float lse_s = logsumexp(z.data(), K);
        student_lse[(b * dims.Sq + i) * dims.Hkv + g] = lse_s;
        float kl = 0.0f;
        for (int64_t j = 0; j < K; ++j) {
          const float log_ps = z[j] - lse_s;
          // P_t = 0 (underflow) contributes nothing, not 0 * -inf.
          if (pt[j] > 0.0f) kl += pt[j] * (std::log(pt[j]) - log_ps);
          dz[j] = softmax_exp(log_ps) - pt[j];
        }
        kl_rows[item] += kl;

        if (dqi == nullptr) continue;
        std::fill(grad.begin(), grad.end(), 0.0f);
        for (int64_t x = 0, at = 0; x < n; at += nvis[x], ++x) {
          // grad[d] += sum_j kit[x][d][j] * dz[at + j]
          gemm_acc(Di, nvis[x], 1, kit.data() + x * Di * kBlock, kBlock, 1, dz.data() + at, 1,
                   grad.data(), 1);
        }
        for (int64_t d = 0; d < Di; ++d) grad[d] *= dims.index_scale;
        store_row(index_dtype, grad.data(), Di, dqi, dims.qi_offset(b, i, g));
      }
    }
  }, 4);
}

// Pass 2: dki, per key block (see the top of the file).
void per_key_block(DType dtype, DType index_dtype, const LossDims& dims, const Lengths& lengths,
                   const int32_t* ids, const void* q, const void* k, const void* qi,
                   const void* ki, const float* teacher_lse, const float* student_lse,
                   void* dki) {
  const int64_t G = dims.G, D = dims.D, Di = dims.Di, NB = num_blocks(dims.Sk);
  parallel_for(dims.B * NB, [&](int64_t begin, int64_t end) {
    std::vector<float> q_rows(G * D), qi_row(Di), kt(D * kBlock), kit(Di * kBlock);
    std::vector<float> s(G * kBlock), z(kBlock), dz(kBlock), acc(kBlock * Di);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / NB, c = item % NB;
      const int64_t q_len = lengths.q_len(b), kv_len = lengths.kv_len(b);
      const int64_t stored = std::clamp<int64_t>(kv_len - c * kBlock, 0, kBlock);
      std::fill(acc.begin(), acc.end(), 0.0f);
      if (stored > 0 && q_len > 0) {
        load_block_transposed(index_dtype, ki, dims.ki_offset(b, c * kBlock), Di, stored, Di,
                              kit.data());
        // Queries from `first` on sit at positions >= c * kBlock: their local
        // block is >= c, so block c is in S exactly when they selected it.
        const int64_t first = std::max<int64_t>(0, c * kBlock - (kv_len - q_len));
        for (int64_t g = 0; g < dims.Hkv; ++g) {
          bool k_loaded = false;
          for (int64_t i = first; i < q_len; ++i) {
            const int32_t* row = dims.ids_row(ids, b, i, g);
            if (std::find(row, row + dims.topk, c) == row + dims.topk) continue;
            if (!k_loaded) {
              load_block_transposed(dtype, k, dims.k_offset(b, c * kBlock, g), dims.Hkv * D,
                                    stored, D, kt.data());
              k_loaded = true;
            }
            const int64_t nvis = visible(lengths, b, lengths.position(b, i), c);
            load_query(dtype, index_dtype, dims, q, qi, b, i, g, q_rows.data(), qi_row.data());
            std::fill(s.begin(), s.end(), 0.0f);
            gemm_acc(G, D, kBlock, q_rows.data(), D, 1, kt.data(), kBlock, s.data(), kBlock);
            std::fill(z.begin(), z.end(), 0.0f);
            gemm_acc(1, Di, kBlock, qi_row.data(), Di, 1, kit.data(), kBlock, z.data(), kBlock);
            for (int64_t j = 0; j < nvis; ++j) z[j] *= dims.index_scale;
            const float* lse_t = teacher_lse + (b * dims.Sq + i) * dims.Hq + g * G;
            const float lse_s = student_lse[(b * dims.Sq + i) * dims.Hkv + g];
            for (int64_t j = 0; j < nvis; ++j) {
              float pt = 0.0f;
              for (int64_t h = 0; h < G; ++h) pt += softmax_exp(s[h * kBlock + j] - lse_t[h]) / G;
              dz[j] = softmax_exp(z[j] - lse_s) - pt;
            }
            // acc[j][d] += dz[j] * qi[d]; index_scale is applied once, below.
            gemm_acc(nvis, 1, Di, dz.data(), 1, 1, qi_row.data(), Di, acc.data(), Di);
          }
        }
      }
      const int64_t rows = std::min(kBlock, dims.Sk - c * kBlock);
      for (int64_t e = 0; e < rows * Di; ++e) acc[e] *= dims.index_scale;
      store_row(index_dtype, acc.data(), rows * Di, dki, dims.ki_offset(b, c * kBlock));
    }
  });
}

void run(DType dtype, DType index_dtype, const LossDims& dims, const Lengths& lengths,
         const int32_t* ids, const void* q, const void* k, const void* qi, const void* ki,
         float* kl, void* dqi, void* dki) {
  std::vector<float> kl_rows(dims.B * dims.Sq), teacher_lse(dims.B * dims.Sq * dims.Hq),
      student_lse(dims.B * dims.Sq * dims.Hkv);
  per_query(dtype, index_dtype, dims, lengths, ids, q, k, qi, ki, kl_rows.data(),
            teacher_lse.data(), student_lse.data(), dqi);
  for (int64_t b = 0; b < dims.B; ++b) {  // fixed order: deterministic
    kl[b] = 0.0f;
    for (int64_t i = 0; i < dims.Sq; ++i) kl[b] += kl_rows[b * dims.Sq + i];
  }
  if (dki != nullptr) {
    per_key_block(dtype, index_dtype, dims, lengths, ids, q, k, qi, ki, teacher_lse.data(),
                  student_lse.data(), dki);
  }
}

}  // namespace

void indexer_kl_loss(DType dtype, DType index_dtype, const AttentionProblem& problem,
                     const int32_t* ids, int64_t topk, int64_t Di, float index_scale,
                     const void* q, const void* k, const void* qi, const void* ki,
                     const int32_t* q_lengths, const int32_t* kv_lengths, float* kl, void* dqi,
                     void* dki) {
  const AttentionProblem& p = problem;
  if (p.B < 0 || p.Sq < 0 || p.Sk < 0 || p.Hq < 0 || p.D < 0 || Di < 0) return;
  const bool grads = dqi != nullptr && dki != nullptr;
  try {
    if (p.Hkv > 0 && p.Hq % p.Hkv == 0 && topk >= 0) {
      const LossDims dims{p.B, p.Sq, p.Sk, p.Hq, p.Hkv, p.D, p.Hq / p.Hkv, Di, topk,
                          p.scale, index_scale};
      run(dtype, index_dtype, dims, Lengths{q_lengths, kv_lengths, p.Sq, p.Sk}, ids, q, k, qi, ki,
          kl, grads ? dqi : nullptr, grads ? dki : nullptr);
      return;
    }
  } catch (...) {
  }
  // No error channel (see attention.cc): a failure leaves NaN outputs.
  std::fill_n(kl, p.B, std::nanf(""));
  if (grads) {
    fill_row(index_dtype, std::nanf(""), p.B * p.Sq * p.Hkv * Di, dqi, 0);
    fill_row(index_dtype, std::nanf(""), p.B * p.Sk * Di, dki, 0);
  }
}

}  // namespace jax_msa::cpu
