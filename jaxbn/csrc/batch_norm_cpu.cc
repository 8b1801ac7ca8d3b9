// One-sweep per-channel reductions of batch normalization for XLA:CPU (XLA FFI).
//
// Why this exists: XLA:CPU computes each reduction in its own sweep over memory
// (its reductions have one output and do not share an input with a sibling), so
// the exact two-pass statistics Σx, Σ(x - mean)² read x twice, and the backward's
// Σdy, Σdy·(x - mean) read dy twice. These kernels read each input once:
//
//   jaxbn_moments(x[G, R, C])           -> mean[G, C], m2[G, C]     (M2 = Σ (x - mean)²)
//   jaxbn_masked_moments(x[G, R, C], keep[G, R]) -> the same over the rows where keep
//   jaxbn_dy_sums(x[G, R, C], dy, mean)  -> s1[G, C] = Σ dy, s2[G, C] = Σ dy·(x - mean)
//
// reducing the R rows of each of the G groups, C channels contiguous. Rows left out
// by `keep` are never read: they may hold anything (NaN, inf). For features that are
// not the trailing axes (NCHW: x[N, C, H, W] is x[A = N, C, S = H·W]), the same
// results from slabs of S contiguous elements per (a, c):
//
//   jaxbn_slab_moments(x[G, A, C, S])            -> mean[G, C], m2[G, C]
//   jaxbn_masked_slab_moments(x[G, A, C, S], keep[G, A]) -> the same over the kept slabs
//   jaxbn_slab_dy_sums(x[G, A, C, S], dy, mean)   -> s1[G, C], s2[G, C] Float32
// training moves 32 bytes per element instead of 40, bfloat16 16 instead of 20
// (benchmarks/bn_layer.py counts and times both).
//
// Exactness: the moments are two-pass *within a block* of rows small enough to
// stay in L1/L2 (its block mean first, then Σ (x - block mean)² reread from cache,
// with the corrected two-pass term for the block mean's rounding),
// and blocks are merged in float64 with Chan, Golub & LeVeque's rule
//   n = n_a + n_b,  d = m_b - m_a,  m = m_a + d·n_b/n,  M2 = M2_a + M2_b + d²·n_a·n_b/n,
// so there is no E[x²] - E[x]² cancellation. Sums inside a block (at most 64 rows)
// are float32, everything across blocks float64. Work is split into chunks of rows
// whose count depends only on the shape, and partial results are merged in chunk
// order: results do not depend on the number of threads or their timing.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline float Load(const float* p, int64_t i) { return p[i]; }
inline float Load(const uint16_t* p, int64_t i) {  // bfloat16: the high half of a float32
  uint32_t u = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Eight lanes of float32 (one AVX register; two SSE/NEON registers elsewhere), with
// GCC/Clang vector extensions: portable, and the compiler keeps them in registers.
typedef float V8 __attribute__((vector_size(32)));
typedef uint16_t U16x8 __attribute__((vector_size(16)));
typedef uint32_t U32x8 __attribute__((vector_size(32)));

inline V8 Load8(const float* p) {
  V8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline V8 Load8(const uint16_t* p) {
  U16x8 h;
  std::memcpy(&h, p, sizeof h);
  U32x8 w = __builtin_convertvector(h, U32x8) << 16;
  V8 v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

// Runs f(0), ..., f(n - 1) on the calling thread and the pool. The caller claims
// chunks too and waits only for chunks that were claimed, so it never waits for a
// pool thread that is busy elsewhere (8 virtual devices share the pool).
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const F& f) {
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  if (helpers <= 0) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto st = std::make_shared<State>();
  auto run = [n](State* s, const F* fn) {
    for (int64_t i; (i = s->next.fetch_add(1)) < n;) {
      (*fn)(i);
      if (s->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(s->mu);
        s->cv.notify_all();
      }
    }
  };
  // A helper that starts after all chunks are claimed touches only `st` (kept
  // alive by its shared_ptr), never `f`.
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([st, run, fp = &f] { run(st.get(), fp); });
  run(st.get(), &f);
  std::unique_lock<std::mutex> lock(st->mu);
  st->cv.wait(lock, [&] { return st->done.load() == n; });
}

struct Plan {
  int64_t groups, rows, channels, chunks_per_group, chunk_rows, block_rows;
};

Plan MakePlan(ffi::Span<const int64_t> dims) {
  Plan p;
  int64_t rank = dims.size();
  p.channels = rank >= 1 ? dims[rank - 1] : 1;
  p.rows = rank >= 2 ? dims[rank - 2] : 1;
  p.groups = 1;
  for (int64_t i = 0; i + 2 < rank; ++i) p.groups *= dims[i];
  // Blocks of ~4096 elements (16 KiB of float32) stay in L1; at least 8 rows so that
  // the float64 merge is amortized, at most 64 so float32 block sums stay accurate
  // (float32 accumulators run twice as wide as float64 and were measured ~1.4x faster).
  p.block_rows = std::clamp<int64_t>(4096 / std::max<int64_t>(p.channels, 1), 8, 64);
  // Chunks of ~128K elements: enough to split DRAM-sized inputs across threads,
  // few enough that per-chunk partials are negligible.
  int64_t per_group = p.rows * p.channels;
  p.chunks_per_group = std::clamp<int64_t>(per_group / (1 << 17), 1, 64);
  p.chunk_rows = (p.rows + p.chunks_per_group - 1) / std::max<int64_t>(p.chunks_per_group, 1);
  p.chunk_rows = std::max<int64_t>(p.chunk_rows, 1);
  p.chunks_per_group = std::max<int64_t>((p.rows + p.chunk_rows - 1) / p.chunk_rows, 1);
  return p;
}

// Rows of 8 or 16 channels are too short for a loop over channels to pay; they are
// processed 8 channels at a time with the accumulators in registers. (Timed against
// the row loop, interleaved in one process on 2 cores: faster at C = 16, slower at
// C >= 32, where walking a block column by column defeats the hardware prefetcher at
// DRAM sizes; benchmarks/bn_layer.py's resnet-s1 shape shows the net effect.)
// Wider rows are read row by row, which the prefetcher follows: with all sums in
// registers for C = 24..64 (RowSumsK, DyRowSumsK), through small arrays above; only
// the moments' second pass, on a block already in L1, walks it 8 channels at a time.
// Against row loops with array sums for every C (`python benchmarks/studies/kernel_ab.py
// --base <revision before>`, both builds in one process, 15 interleaved rounds):
// moments ×1.23–×1.63 at C = 32..128 (×1.29 at 64×56×56×64), dy sums ×1.45 at
// 16×26×26×32, ×1.0–×1.1 elsewhere; the unchanged C = 8 path ×1.04–×1.06 (noise).
inline bool Narrow(int64_t C) { return C % 8 == 0 && C <= 16; }

// Chan's merge of a block (nb rows; float32 mean m, Σd and Σd² with d = x - m) into
// the running float64 (n, mean, M2) of one channel. m is the block mean rounded to
// float32; the corrected two-pass formula (Chan, Golub & LeVeque) removes that
// rounding to first order: mean_b = m + Σd/nb, M2_b = Σd² - (Σd)²/nb.
inline void MergeBlock(double n, double nb, float m, float e, float q, double* mean, double* m2) {
  const double nn = n + nb, ib = 1.0 / nb;
  const double eb = e, mb = m + eb * ib;
  const double d = mb - *mean;
  *mean += d * (nb / nn);
  *m2 += (q - eb * eb * ib) + d * d * (n * nb / nn);
}

// Σ (x - m) and Σ (x - m)² down a column of 8 channels (row stride C) of nb rows.
template <typename T>
inline void Deviations8(const T* col, int64_t nb, int64_t C, V8 m, V8* e, V8* q) {
  V8 e0{}, e1{}, q0{}, q1{};
  int64_t r = 0;
  for (; r + 2 <= nb; r += 2) {
    const V8 d0 = Load8(col + r * C) - m, d1 = Load8(col + (r + 1) * C) - m;
    e0 += d0;
    e1 += d1;
    q0 += d0 * d0;
    q1 += d1 * d1;
  }
  if (r < nb) {
    const V8 d0 = Load8(col + r * C) - m;
    e0 += d0;
    q0 += d0 * d0;
  }
  *e = e0 + e1;
  *q = q0 + q1;
}

// One block of nb rows, 8 channels at a time, accumulators in registers: the first
// pass brings the 8-channel column of the block into L1, the second rereads it there.
template <typename T>
void MomentsBlock8(const T* blk, int64_t nb, int64_t C, double n, double* mean, double* m2) {
  const float inv = 1.0f / static_cast<float>(nb);
  for (int64_t t = 0; t < C; t += 8) {
    const T* col = blk + t;
    V8 a0{}, a1{}, a2{}, a3{};
    int64_t r = 0;
    for (; r + 4 <= nb; r += 4) {
      a0 += Load8(col + r * C);
      a1 += Load8(col + (r + 1) * C);
      a2 += Load8(col + (r + 2) * C);
      a3 += Load8(col + (r + 3) * C);
    }
    for (; r < nb; ++r) a0 += Load8(col + r * C);
    const V8 m = ((a0 + a1) + (a2 + a3)) * inv;
    V8 e, q;
    Deviations8(col, nb, C, m, &e, &q);
    for (int j = 0; j < 8; ++j) MergeBlock(n, nb, m[j], e[j], q[j], mean + t + j, m2 + t + j);
  }
}

// Σ over nb rows of K·8 channels, row by row (the order the prefetcher follows best)
// with all K accumulators in registers.
template <int K, typename T>
void RowSumsK(const T* blk, int64_t nb, float* s) {
  V8 a[K] = {};
  for (int64_t r = 0; r < nb; ++r)
    for (int k = 0; k < K; ++k) a[k] += Load8(blk + r * K * 8 + k * 8);
  for (int k = 0; k < K; ++k) std::memcpy(s + 8 * k, &a[k], sizeof(V8));
}

// RowSumsK for C = 24, 32, ..., 64; false (nothing done) for other C.
template <typename T>
bool RowSumsInRegisters(const T* blk, int64_t nb, int64_t C, float* s) {
  switch (C % 8 == 0 ? C / 8 : 0) {
    case 3: RowSumsK<3>(blk, nb, s); return true;
    case 4: RowSumsK<4>(blk, nb, s); return true;
    case 5: RowSumsK<5>(blk, nb, s); return true;
    case 6: RowSumsK<6>(blk, nb, s); return true;
    case 7: RowSumsK<7>(blk, nb, s); return true;
    case 8: RowSumsK<8>(blk, nb, s); return true;
    default: return false;
  }
}

// Rows [r0, r1) of one group, those with keep[r] only when `keep` is given (a block
// with some rows left out is first packed into `packed`, a block-sized buffer that
// stays in L1: the two passes then run on contiguous kept rows as without a mask).
template <typename T>
void MomentsChunk(const T* x, const bool* keep, int64_t r0, int64_t r1, const Plan& p, double* n_out,
                  double* mean, double* m2) {
  const int64_t C = p.channels;
  std::vector<float> bsum(C), bmean(C), bsq(C), bdev(C);
  std::vector<T> packed(keep ? p.block_rows * C : 0);
  double n = 0;
  std::fill(mean, mean + C, 0.0);
  std::fill(m2, m2 + C, 0.0);
  for (int64_t b = r0; b < r1; b += p.block_rows) {
    int64_t nb = std::min(p.block_rows, r1 - b);
    const T* blk = x + b * C;
    if (keep) {
      int64_t nk = 0;
      for (int64_t r = 0; r < nb; ++r) nk += keep[b + r];
      if (nk == 0) continue;
      if (nk < nb) {
        T* dst = packed.data();
        for (int64_t r = 0; r < nb; ++r)
          if (keep[b + r]) dst = std::copy(blk + r * C, blk + (r + 1) * C, dst);
        blk = packed.data();
        nb = nk;
      }
    }
    if (Narrow(C)) {
      MomentsBlock8(blk, nb, C, n, mean, m2);
      n += nb;
      continue;
    }
    float* __restrict s = bsum.data();
    float* __restrict m = bmean.data();
    float* __restrict q = bsq.data();
    float* __restrict e = bdev.data();
    if (!RowSumsInRegisters(blk, nb, C, s)) {
      std::fill(s, s + C, 0.0f);
      for (int64_t r = 0; r < nb; ++r) {
        const T* row = blk + r * C;
        for (int64_t c = 0; c < C; ++c) s[c] += Load(row, c);
      }
    }
    const float inv = 1.0f / static_cast<float>(nb);
    for (int64_t c = 0; c < C; ++c) m[c] = s[c] * inv;
    // The block is in L1 now: the second pass walks it 8 channels at a time with the
    // accumulators in registers (a row-wise walk would load and store e and q for every
    // row: 5 memory operations per element instead of 1).
    int64_t c0 = 0;
    for (; c0 + 8 <= C; c0 += 8) {
      V8 ev, qv;
      Deviations8(blk + c0, nb, C, Load8(m + c0), &ev, &qv);
      for (int j = 0; j < 8; ++j) {
        e[c0 + j] = ev[j];
        q[c0 + j] = qv[j];
      }
    }
    for (int64_t c = c0; c < C; ++c) {  // the last C % 8 channels
      float ec = 0, qc = 0;
      for (int64_t r = 0; r < nb; ++r) {
        const float d = Load(blk + r * C, c) - m[c];
        ec += d;
        qc += d * d;
      }
      e[c] = ec;
      q[c] = qc;
    }
    for (int64_t c = 0; c < C; ++c) MergeBlock(n, nb, m[c], e[c], q[c], mean + c, m2 + c);
    n += nb;
  }
  *n_out = n;
}

template <typename T>
void Moments(ffi::ThreadPool& pool, const T* x, const bool* keep, const Plan& p, float* mean_out,
             float* m2_out) {
  const int64_t C = p.channels, K = p.chunks_per_group, total = p.groups * K;
  std::vector<double> n(total), mean(total * C), m2(total * C);
  ParallelFor(pool, total, [&](int64_t i) {
    const int64_t g = i / K, k = i % K;
    const int64_t r0 = k * p.chunk_rows, r1 = std::min(p.rows, r0 + p.chunk_rows);
    MomentsChunk(x + g * p.rows * C, keep ? keep + g * p.rows : nullptr, r0, std::max(r0, r1), p, &n[i],
                 &mean[i * C], &m2[i * C]);
  });
  for (int64_t g = 0; g < p.groups; ++g) {
    double na = 0;
    std::vector<double> ma(C, 0.0), qa(C, 0.0);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t i = g * K + k;
      if (n[i] == 0) continue;
      const double nn = na + n[i], wb = n[i] / nn, wab = na * n[i] / nn;
      for (int64_t c = 0; c < C; ++c) {
        double d = mean[i * C + c] - ma[c];
        ma[c] += d * wb;
        qa[c] += m2[i * C + c] + d * d * wab;
      }
      na = nn;
    }
    for (int64_t c = 0; c < C; ++c) {
      mean_out[g * C + c] = static_cast<float>(ma[c]);
      m2_out[g * C + c] = static_cast<float>(qa[c]);
    }
  }
}

// Σdy and Σdy·(x - μ) over nb rows of K·8 channels, row by row, 2K accumulators in registers.
template <int K, typename T>
void DyRowSumsK(const T* x, const T* dy, const float* mu, int64_t nb, float* a1, float* a2) {
  V8 g[K] = {}, h[K] = {}, m[K];
  for (int k = 0; k < K; ++k) m[k] = Load8(mu + 8 * k);
  for (int64_t r = 0; r < nb; ++r)
    for (int k = 0; k < K; ++k) {
      const V8 d = Load8(dy + r * K * 8 + k * 8);
      g[k] += d;
      h[k] += d * (Load8(x + r * K * 8 + k * 8) - m[k]);
    }
  for (int k = 0; k < K; ++k) {
    std::memcpy(a1 + 8 * k, &g[k], sizeof(V8));
    std::memcpy(a2 + 8 * k, &h[k], sizeof(V8));
  }
}

// DyRowSumsK for C = 24, 32, ..., 64; false (nothing done) for other C.
template <typename T>
bool DyRowSumsInRegisters(const T* x, const T* dy, const float* mu, int64_t nb, int64_t C, float* a1, float* a2) {
  switch (C % 8 == 0 ? C / 8 : 0) {
    case 3: DyRowSumsK<3>(x, dy, mu, nb, a1, a2); return true;
    case 4: DyRowSumsK<4>(x, dy, mu, nb, a1, a2); return true;
    case 5: DyRowSumsK<5>(x, dy, mu, nb, a1, a2); return true;
    case 6: DyRowSumsK<6>(x, dy, mu, nb, a1, a2); return true;
    case 7: DyRowSumsK<7>(x, dy, mu, nb, a1, a2); return true;
    case 8: DyRowSumsK<8>(x, dy, mu, nb, a1, a2); return true;
    default: return false;
  }
}

template <typename T>
void DySumsChunk(const T* x, const T* dy, const float* mu, int64_t r0, int64_t r1, const Plan& p,
                 double* s1, double* s2) {
  const int64_t C = p.channels;
  std::vector<float> b1(C), b2(C);
  std::fill(s1, s1 + C, 0.0);
  std::fill(s2, s2 + C, 0.0);
  for (int64_t b = r0; b < r1; b += p.block_rows) {
    const int64_t nb = std::min(p.block_rows, r1 - b);
    if (Narrow(C)) {  // 8 channels at a time, accumulators in registers
      for (int64_t t = 0; t < C; t += 8) {
        const T* xc = x + b * C + t;
        const T* gc = dy + b * C + t;
        const V8 m = Load8(mu + t);
        V8 g0{}, g1{}, h0{}, h1{};
        int64_t r = 0;
        for (; r + 2 <= nb; r += 2) {
          const V8 ga = Load8(gc + r * C), gb = Load8(gc + (r + 1) * C);
          g0 += ga;
          g1 += gb;
          h0 += ga * (Load8(xc + r * C) - m);
          h1 += gb * (Load8(xc + (r + 1) * C) - m);
        }
        if (r < nb) {
          const V8 ga = Load8(gc + r * C);
          g0 += ga;
          h0 += ga * (Load8(xc + r * C) - m);
        }
        const V8 g = g0 + g1, h = h0 + h1;
        for (int j = 0; j < 8; ++j) {
          s1[t + j] += g[j];
          s2[t + j] += h[j];
        }
      }
      continue;
    }
    float* __restrict a1 = b1.data();
    float* __restrict a2 = b2.data();
    if (DyRowSumsInRegisters(x + b * C, dy + b * C, mu, nb, C, a1, a2)) {
      for (int64_t c = 0; c < C; ++c) {
        s1[c] += a1[c];
        s2[c] += a2[c];
      }
      continue;
    }
    std::fill(a1, a1 + C, 0.0f);
    std::fill(a2, a2 + C, 0.0f);
    for (int64_t r = 0; r < nb; ++r) {
      const T* xr = x + (b + r) * C;
      const T* gr = dy + (b + r) * C;
      for (int64_t c = 0; c < C; ++c) {
        float g = Load(gr, c);
        a1[c] += g;
        a2[c] += g * (Load(xr, c) - mu[c]);
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      s1[c] += a1[c];
      s2[c] += a2[c];
    }
  }
}

template <typename T>
void DySums(ffi::ThreadPool& pool, const T* x, const T* dy, const float* mu, const Plan& p,
            float* s1_out, float* s2_out) {
  const int64_t C = p.channels, K = p.chunks_per_group, total = p.groups * K;
  std::vector<double> s1(total * C), s2(total * C);
  ParallelFor(pool, total, [&](int64_t i) {
    const int64_t g = i / K, k = i % K;
    const int64_t r0 = k * p.chunk_rows, r1 = std::min(p.rows, r0 + p.chunk_rows);
    const int64_t off = g * p.rows * C;
    DySumsChunk(x + off, dy + off, mu + g * C, r0, std::max(r0, r1), p, &s1[i * C], &s2[i * C]);
  });
  for (int64_t g = 0; g < p.groups; ++g) {
    for (int64_t c = 0; c < C; ++c) {
      double t1 = 0, t2 = 0;
      for (int64_t k = 0; k < K; ++k) {
        t1 += s1[(g * K + k) * C + c];
        t2 += s2[(g * K + k) * C + c];
      }
      s1_out[g * C + c] = static_cast<float>(t1);
      s2_out[g * C + c] = static_cast<float>(t2);
    }
  }
}

// ---------------------------------------------------------------------------
// Slabs: x[G, A, C, S], each (g, a, c) a run of S contiguous elements. One task per
// (g, c): it walks that channel's A slabs in order (deterministic), two-pass within
// blocks of at most kSlabBlock elements of a slab (in L1; float32 sums over at most 16
// values per lane, as accurate as the row kernel's 64-row blocks), Chan's merge across blocks.

constexpr int64_t kSlabBlock = 512;

struct SlabPlan {
  int64_t groups, a, channels, s;
};

SlabPlan MakeSlabPlan(ffi::Span<const int64_t> dims) {
  SlabPlan p{1, 1, 1, 1};
  const int64_t rank = dims.size();
  if (rank >= 1) p.s = dims[rank - 1];
  if (rank >= 2) p.channels = dims[rank - 2];
  if (rank >= 3) p.a = dims[rank - 3];
  for (int64_t i = 0; i + 3 < rank; ++i) p.groups *= dims[i];
  return p;
}

// Σ v[0..n) in float32 with 4 vector accumulators (n ≤ kSlabBlock).
template <typename T>
inline float SumRun(const T* v, int64_t n) {
  V8 a0{}, a1{}, a2{}, a3{};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 += Load8(v + i);
    a1 += Load8(v + i + 8);
    a2 += Load8(v + i + 16);
    a3 += Load8(v + i + 24);
  }
  for (; i + 8 <= n; i += 8) a0 += Load8(v + i);
  const V8 t = (a0 + a1) + (a2 + a3);
  float r = 0;
  for (int j = 0; j < 8; ++j) r += t[j];
  for (; i < n; ++i) r += Load(v, i);
  return r;
}

// (Σ (v - m), Σ (v - m)²) over v[0..n).
template <typename T>
inline void DevRun(const T* v, int64_t n, float m, float* e_out, float* q_out) {
  const V8 mv = V8{} + m;
  V8 e0{}, e1{}, q0{}, q1{};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const V8 d0 = Load8(v + i) - mv, d1 = Load8(v + i + 8) - mv;
    e0 += d0;
    e1 += d1;
    q0 += d0 * d0;
    q1 += d1 * d1;
  }
  for (; i + 8 <= n; i += 8) {
    const V8 d0 = Load8(v + i) - mv;
    e0 += d0;
    q0 += d0 * d0;
  }
  const V8 ev = e0 + e1, qv = q0 + q1;
  float e = 0, q = 0;
  for (int j = 0; j < 8; ++j) {
    e += ev[j];
    q += qv[j];
  }
  for (; i < n; ++i) {
    const float d = Load(v, i) - m;
    e += d;
    q += d * d;
  }
  *e_out = e;
  *q_out = q;
}

// (Σ g, Σ g·(v - m)) over n elements of g and v.
template <typename T>
inline void DyRun(const T* v, const T* g, int64_t n, float m, float* s1_out, float* s2_out) {
  const V8 mv = V8{} + m;
  V8 a0{}, a1{}, b0{}, b1{};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const V8 g0 = Load8(g + i), g1 = Load8(g + i + 8);
    a0 += g0;
    a1 += g1;
    b0 += g0 * (Load8(v + i) - mv);
    b1 += g1 * (Load8(v + i + 8) - mv);
  }
  for (; i + 8 <= n; i += 8) {
    const V8 g0 = Load8(g + i);
    a0 += g0;
    b0 += g0 * (Load8(v + i) - mv);
  }
  const V8 av = a0 + a1, bv = b0 + b1;
  float s1 = 0, s2 = 0;
  for (int j = 0; j < 8; ++j) {
    s1 += av[j];
    s2 += bv[j];
  }
  for (; i < n; ++i) {
    const float gi = Load(g, i);
    s1 += gi;
    s2 += gi * (Load(v, i) - m);
  }
  *s1_out = s1;
  *s2_out = s2;
}

// `keep` (optional, [G, A]): the slabs a with keep[g, a] false are never read.
template <typename T>
void SlabMoments(ffi::ThreadPool& pool, const T* x, const bool* keep, const SlabPlan& p, float* mean_out,
                 float* m2_out) {
  const int64_t C = p.channels, S = p.s, A = p.a;
  ParallelFor(pool, p.groups * C, [&](int64_t i) {
    const int64_t g = i / C, c = i % C;
    double n = 0, mean = 0, m2 = 0;
    for (int64_t a = 0; a < A; ++a) {
      if (keep && !keep[g * A + a]) continue;
      const T* slab = x + ((g * A + a) * C + c) * S;
      for (int64_t b = 0; b < S; b += kSlabBlock) {
        const int64_t nb = std::min(kSlabBlock, S - b);
        const float m = SumRun(slab + b, nb) / static_cast<float>(nb);
        float e, q;
        DevRun(slab + b, nb, m, &e, &q);
        MergeBlock(n, nb, m, e, q, &mean, &m2);
        n += nb;
      }
    }
    mean_out[i] = static_cast<float>(mean);
    m2_out[i] = static_cast<float>(m2);
  });
}

template <typename T>
void SlabDySums(ffi::ThreadPool& pool, const T* x, const T* dy, const float* mu, const SlabPlan& p,
                float* s1_out, float* s2_out) {
  const int64_t C = p.channels, S = p.s, A = p.a;
  ParallelFor(pool, p.groups * C, [&](int64_t i) {
    const int64_t g = i / C, c = i % C;
    double t1 = 0, t2 = 0;
    for (int64_t a = 0; a < A; ++a) {
      const int64_t off = ((g * A + a) * C + c) * S;
      for (int64_t b = 0; b < S; b += kSlabBlock) {
        float s1, s2;
        DyRun(x + off + b, dy + off + b, std::min(kSlabBlock, S - b), mu[i], &s1, &s2);
        t1 += s1;
        t2 += s2;
      }
    }
    s1_out[i] = static_cast<float>(t1);
    s2_out[i] = static_cast<float>(t2);
  });
}

// Calls f(T{}) with T the element type of x's data (float32, or bfloat16 as uint16_t).
template <typename F>
ffi::Error ByDtype(const std::string& name, ffi::DataType dtype, F&& f) {
  switch (dtype) {
    case ffi::F32:
      f(float{});
      return ffi::Error::Success();
    case ffi::BF16:
      f(uint16_t{});
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument(name + ": x must be float32 or bfloat16, got XLA dtype " +
                                         std::to_string(static_cast<int>(dtype)));
  }
}

// The statistics' size: `features` = groups × channels, expected of every result.
ffi::Error CheckMoments(const std::string& name, size_t got, int64_t features, const char* which) {
  if (got == static_cast<size_t>(features)) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(name + ": mean has " + std::to_string(got) + " elements, expected " +
                                     which + " = " + std::to_string(features));
}

ffi::Error CheckDySums(const std::string& name, const ffi::AnyBuffer& x, const ffi::AnyBuffer& dy,
                       const ffi::Buffer<ffi::F32>& mean, int64_t features) {
  if (dy.element_type() == x.element_type() && dy.element_count() == x.element_count() &&
      mean.element_count() == static_cast<size_t>(features))
    return ffi::Error::Success();
  return ffi::Error::InvalidArgument(name + ": expected dy of x's dtype and " + std::to_string(x.element_count()) +
                                     " elements and mean of " + std::to_string(features) + ", got dy of " +
                                     std::to_string(dy.element_count()) + " and mean of " +
                                     std::to_string(mean.element_count()));
}

ffi::Error MomentsImpl(ffi::ThreadPool& pool, ffi::AnyBuffer x, const bool* keep, const std::string& name,
                       ffi::Result<ffi::Buffer<ffi::F32>> mean, ffi::Result<ffi::Buffer<ffi::F32>> m2) {
  Plan p = MakePlan(x.dimensions());
  ffi::Error err = CheckMoments(name, mean->element_count(), p.groups * p.channels, "x.shape[:-2] + x.shape[-1:]");
  if (err.failure()) return err;
  return ByDtype(name, x.element_type(), [&](auto t) {
    Moments(pool, x.reinterpret_data<decltype(t)>(), keep, p, mean->typed_data(), m2->typed_data());
  });
}

ffi::Error UnmaskedMomentsImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::Buffer<ffi::F32>> mean,
                               ffi::Result<ffi::Buffer<ffi::F32>> m2) {
  return MomentsImpl(pool, x, nullptr, "jaxbn_moments", mean, m2);
}

ffi::Error MaskedMomentsImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::PRED> keep,
                             ffi::Result<ffi::Buffer<ffi::F32>> mean, ffi::Result<ffi::Buffer<ffi::F32>> m2) {
  const size_t rows = x.element_count() / std::max<int64_t>(MakePlan(x.dimensions()).channels, 1);
  if (keep.element_count() != rows)
    return ffi::Error::InvalidArgument("jaxbn_masked_moments: keep has " + std::to_string(keep.element_count()) +
                                       " elements, expected one per row of x: " + std::to_string(rows));
  return MomentsImpl(pool, x, keep.typed_data(), "jaxbn_masked_moments", mean, m2);
}

ffi::Error DySumsImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Buffer<ffi::F32> mean,
                      ffi::Result<ffi::Buffer<ffi::F32>> s1, ffi::Result<ffi::Buffer<ffi::F32>> s2) {
  Plan p = MakePlan(x.dimensions());
  ffi::Error err = CheckDySums("jaxbn_dy_sums", x, dy, mean, p.groups * p.channels);
  if (err.failure()) return err;
  return ByDtype("jaxbn_dy_sums", x.element_type(), [&](auto t) {
    using T = decltype(t);
    DySums(pool, x.reinterpret_data<T>(), dy.reinterpret_data<T>(), mean.typed_data(), p, s1->typed_data(),
           s2->typed_data());
  });
}

ffi::Error SlabMomentsImpl(ffi::ThreadPool& pool, ffi::AnyBuffer x, const bool* keep, const std::string& name,
                           ffi::Result<ffi::Buffer<ffi::F32>> mean, ffi::Result<ffi::Buffer<ffi::F32>> m2) {
  SlabPlan p = MakeSlabPlan(x.dimensions());
  ffi::Error err = CheckMoments(name, mean->element_count(), p.groups * p.channels, "x.shape[:-3] + x.shape[-2:-1]");
  if (err.failure()) return err;
  return ByDtype(name, x.element_type(), [&](auto t) {
    SlabMoments(pool, x.reinterpret_data<decltype(t)>(), keep, p, mean->typed_data(), m2->typed_data());
  });
}

ffi::Error UnmaskedSlabMomentsImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::Buffer<ffi::F32>> mean,
                                   ffi::Result<ffi::Buffer<ffi::F32>> m2) {
  return SlabMomentsImpl(pool, x, nullptr, "jaxbn_slab_moments", mean, m2);
}

ffi::Error MaskedSlabMomentsImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::PRED> keep,
                                 ffi::Result<ffi::Buffer<ffi::F32>> mean, ffi::Result<ffi::Buffer<ffi::F32>> m2) {
  const SlabPlan p = MakeSlabPlan(x.dimensions());
  if (keep.element_count() != static_cast<size_t>(p.groups * p.a))
    return ffi::Error::InvalidArgument("jaxbn_masked_slab_moments: keep has " + std::to_string(keep.element_count()) +
                                       " elements, expected one per slab row x.shape[:-2]: " +
                                       std::to_string(p.groups * p.a));
  return SlabMomentsImpl(pool, x, keep.typed_data(), "jaxbn_masked_slab_moments", mean, m2);
}

ffi::Error SlabDySumsImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Buffer<ffi::F32> mean,
                          ffi::Result<ffi::Buffer<ffi::F32>> s1, ffi::Result<ffi::Buffer<ffi::F32>> s2) {
  SlabPlan p = MakeSlabPlan(x.dimensions());
  ffi::Error err = CheckDySums("jaxbn_slab_dy_sums", x, dy, mean, p.groups * p.channels);
  if (err.failure()) return err;
  return ByDtype("jaxbn_slab_dy_sums", x.element_type(), [&](auto t) {
    using T = decltype(t);
    SlabDySums(pool, x.reinterpret_data<T>(), dy.reinterpret_data<T>(), mean.typed_data(), p, s1->typed_data(),
               s2->typed_data());
  });
}

}  // namespace

// The bindings: moments (x) -> (mean, m2); dy sums (x, dy, mean) -> (s1, s2).
static auto MomentsBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

static auto DySumsBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnMoments, UnmaskedMomentsImpl, MomentsBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnSlabMoments, UnmaskedSlabMomentsImpl, MomentsBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnDySums, DySumsImpl, DySumsBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnSlabDySums, SlabDySumsImpl, DySumsBinding());
static auto MaskedMomentsBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::Buffer<ffi::PRED>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnMaskedMoments, MaskedMomentsImpl, MaskedMomentsBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnMaskedSlabMoments, MaskedSlabMomentsImpl, MaskedMomentsBinding());
