// The small-matrix products of a chain, written once for both schedules:
//
//   out[i, c] +-= sum_k a(i, k) b(k, c)    i < n, c < C, k < K, k in increasing order
//   a(i, k) = A[i, k] (or A[k, i] with kTA) times sc[k] (kScale = kPerK) or sc[i] (kPerRow);
//   b(k, c) = B[k, c] (or B[c, k] with kTB); the sign is kSign
//
// Each output element is the same sequence of operations on both schedules (start from out, then
// s = s + a(i, k) * b(k, c), or s - a(i, k) * b(k, c) for kSign < 0, for k = 0, 1, ...), so their
// results are bit-identical:
// - GPU (and the CPU block check): TTT_PAR_FOR spreads the elements over the block's threads, the
//   k loop inside, as the kernels always did;
// - CPU: register tiles of kMR rows x kNR columns; the k loop runs over a packed panel of B and the
//   kNR-wide column loop is innermost and contiguous, so the compiler vectorises it. Vectorising
//   across columns never reorders a sum (no -ffast-math, and the CPU library is built with
//   -ffp-contract=off), so any ISA (SSE2, AVX2) gives the same bits.
// Include it after the schedule macros (TTT_HD, TTT_PAR_FOR: ttt_linear_chain.h defines them).
#pragma once

#include "ttt_params.h"

#if defined(__CUDA_ARCH__) || defined(TTT_EMULATE_BLOCK) || defined(__CUDACC__)
#define TTT_ROW_SCHEDULE 0
#else
#define TTT_ROW_SCHEDULE 1
#endif

namespace ttt {

enum MMScale : int { kNoScale = 0, kPerK = 1, kPerRow = 2 };

template <bool kTA, int kScale, typename acc_t>
TTT_HD acc_t mm_a(const acc_t* A, int lda, const acc_t* sc, int i, int k) {
  acc_t a = kTA ? A[static_cast<int64_t>(k) * lda + i] : A[static_cast<int64_t>(i) * lda + k];
  if (kScale == kPerK) a = a * sc[k];
  if (kScale == kPerRow) a = a * sc[i];
  return a;
}

// s + a b, or s - a b for kSign < 0 (the same bits as s + (-a) b: negation is exact)
template <int kSign, typename T, typename S>
TTT_HD T mm_step(T s, S a, T b) {
  return kSign < 0 ? s - a * b : s + a * b;
}

template <bool kTB, typename acc_t>
TTT_HD acc_t mm_b(const acc_t* B, int ldb, int k, int c) {
  return kTB ? B[static_cast<int64_t>(c) * ldb + k] : B[static_cast<int64_t>(k) * ldb + c];
}

#if TTT_ROW_SCHEDULE
#if defined(__AVX__)
constexpr int kVecBytes = 32;  // one AVX register
#else
constexpr int kVecBytes = 16;  // one SSE register
#endif
// Vectors of acc_t (GCC/Clang vector extension): a vector op applies the scalar op to each lane,
// so every lane rounds exactly as scalar code does.
template <typename acc_t>
struct Vec {
  typedef acc_t type __attribute__((vector_size(kVecBytes)));
  static constexpr int kLanes = kVecBytes / static_cast<int>(sizeof(acc_t));
};
constexpr int kMR = 4;                    // rows per register tile
constexpr int kNR = 2 * kVecBytes / 4;    // columns per register tile (two fp32 vectors)
constexpr int kKC = 64;                   // depth of a packed panel of B

// One register tile of out: rows i0 .. i0+kMR (a row past n reads A's row n-1; the caller does
// not store it), depth k0 .. k0+nk, columns from the kNR-wide rows of `bp` (row k - k0 of the
// panel at bp + (k - k0) * ldp: B itself where its rows are contiguous, else a packed copy).
// The register tile: kMR rows of kNR columns, as vectors.
template <typename acc_t>
using Tile = typename Vec<acc_t>::type[kMR][kNR / Vec<acc_t>::kLanes];

// body(tile) on the tile of `out` at o (ni <= kMR rows, nc <= kNR columns, row stride ldo), read
// from and written back to out one vector at a time: a whole tile straight, an edge tile lane by
// lane where a vector runs past nc, zero past ni / nc, and only its ni x nc elements written
// back. (A whole row's copy into the tile went through the stack in 16-byte pieces that the
// product's vector loads could not forward from: a stall per vector, as much as the product itself
// for the n-deep products, the end updates and weight-gradient carries.)
template <typename acc_t, typename Body>
inline __attribute__((always_inline)) void on_out_tile(acc_t* o, int ldo, int ni, int nc, Body body) {
  using V = typename Vec<acc_t>::type;
  constexpr int kLanes = Vec<acc_t>::kLanes, kNV = kNR / kLanes;
  Tile<acc_t> tile;
  auto at = [&](int r, int v) { return o + static_cast<int64_t>(r) * ldo + v * kLanes; };
  if (ni == kMR && nc == kNR) {
    for (int r = 0; r < kMR; ++r)
      for (int v = 0; v < kNV; ++v) {
        V x;
        __builtin_memcpy(&x, at(r, v), sizeof(V));
        tile[r][v] = x;
      }
    body(tile);
    for (int r = 0; r < kMR; ++r)
      for (int v = 0; v < kNV; ++v) {
        const V x = tile[r][v];
        __builtin_memcpy(at(r, v), &x, sizeof(V));
      }
    return;
  }
  auto lanes = [&](int r, int v) {  // the lanes of vector (r, v) inside out
    const int m = nc - v * kLanes;
    return r >= ni || m <= 0 ? 0 : (m < kLanes ? m : kLanes);
  };
  for (int r = 0; r < kMR; ++r)
    for (int v = 0; v < kNV; ++v) {
      V x = {};
      const int m = lanes(r, v);
      if (m == kLanes) __builtin_memcpy(&x, at(r, v), sizeof(V));
      else
        for (int l = 0; l < m; ++l) x[l] = at(r, v)[l];
      tile[r][v] = x;
    }
  body(tile);
  for (int r = 0; r < ni; ++r)
    for (int v = 0; v < kNV; ++v) {
      const V x = tile[r][v];
      const int m = lanes(r, v);
      if (m == kLanes) __builtin_memcpy(at(r, v), &x, sizeof(V));
      else
        for (int l = 0; l < m; ++l) at(r, v)[l] = x[l];
    }
}

template <int kSign, bool kTA, int kScale, typename acc_t>
inline void mm_tile(Tile<acc_t>& tile, int n, int i0,
                    int k0, int nk, const acc_t* A, int lda, const acc_t* bp, int ldp,
                    const acc_t* sc) {
  using V = typename Vec<acc_t>::type;
  constexpr int kNV = kNR / Vec<acc_t>::kLanes;
  int ir[kMR];
  for (int r = 0; r < kMR; ++r) ir[r] = i0 + r < n ? i0 + r : n - 1;
  for (int k = 0; k < nk; ++k) {
    V b[kNV];  // one vector load each (a single copy of the whole row stalls on the stack)
    for (int v = 0; v < kNV; ++v)
      __builtin_memcpy(&b[v], bp + static_cast<int64_t>(k) * ldp + v * Vec<acc_t>::kLanes, sizeof(V));
    for (int r = 0; r < kMR; ++r) {
      const acc_t a = mm_a<kTA, kScale>(A, lda, sc, ir[r], k0 + k);
      for (int v = 0; v < kNV; ++v) tile[r][v] = mm_step<kSign>(tile[r][v], a, b[v]);
    }
  }
}

// The packed panel of B^T: panel[k][c] = Bt[c, k] for c < nc, k < nk (row stride kNR), element
// by element; fp32 below moves whole square blocks through registers instead.
template <typename acc_t>
inline void pack_transposed(int nc, int nk, const acc_t* Bt, int ldb, acc_t* panel) {
  for (int c = 0; c < nc; ++c)
    for (int k = 0; k < nk; ++k) panel[k * kNR + c] = Bt[static_cast<int64_t>(c) * ldb + k];
}

// An L x L block (L = lanes of one fp32 vector) held as L row vectors, transposed in registers:
// the usual unpack / in-lane shuffle (/ 128-bit permute) rounds, written with the vector
// extension. Values are only moved, never computed.
inline void transpose_block(Vec<float>::type (&r)[Vec<float>::kLanes]) {
  using V = Vec<float>::type;
#if defined(__AVX__)
  V t[8], u[8];
  for (int j = 0; j < 8; j += 2) {  // t[j] = r[j], r[j+1] interleaved within each 128-bit half
    t[j] = __builtin_shufflevector(r[j], r[j + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[j + 1] = __builtin_shufflevector(r[j], r[j + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int j = 0; j < 8; j += 4)  // u[j..j+3]: columns (0, 4), (2, 6), (1, 5), (3, 7) of rows j..j+3
    for (int h = 0; h < 2; ++h) {
      u[j + h] = __builtin_shufflevector(t[j + h], t[j + h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[j + h + 2] = __builtin_shufflevector(t[j + h], t[j + h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  const int col[4] = {0, 2, 1, 3};  // which u holds columns c and c + 4
  for (int c = 0; c < 4; ++c) {     // rows 0-3 from u[.], rows 4-7 from u[. + 4]
    r[c] = __builtin_shufflevector(u[col[c]], u[col[c] + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    r[c + 4] = __builtin_shufflevector(u[col[c]], u[col[c] + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
#else
  const V t0 = __builtin_shufflevector(r[0], r[1], 0, 4, 1, 5), t1 = __builtin_shufflevector(r[0], r[1], 2, 6, 3, 7);
  const V t2 = __builtin_shufflevector(r[2], r[3], 0, 4, 1, 5), t3 = __builtin_shufflevector(r[2], r[3], 2, 6, 3, 7);
  r[0] = __builtin_shufflevector(t0, t2, 0, 1, 4, 5), r[1] = __builtin_shufflevector(t0, t2, 2, 3, 6, 7);
  r[2] = __builtin_shufflevector(t1, t3, 0, 1, 4, 5), r[3] = __builtin_shufflevector(t1, t3, 2, 3, 6, 7);
#endif
}

// fp32: whole L x L blocks through transpose_block (the scalar copy above cost as much as the
// product it feeds at the chains' sizes), the edges element by element.
inline void pack_transposed(int nc, int nk, const float* Bt, int ldb, float* panel) {
  constexpr int L = Vec<float>::kLanes;
  typedef float VU __attribute__((vector_size(kVecBytes), aligned(4)));  // an unaligned vector
  const int nc_blocks = nc / L * L, nk_blocks = nk / L * L;
  for (int c = 0; c < nc_blocks; c += L)
    for (int k = 0; k < nk_blocks; k += L) {
      Vec<float>::type r[L];  // rows c .. c+L of Bt, columns k .. k+L
      for (int j = 0; j < L; ++j) r[j] = *reinterpret_cast<const VU*>(Bt + static_cast<int64_t>(c + j) * ldb + k);
      transpose_block(r);  // r[j]: panel row k + j, columns c .. c+L
      for (int j = 0; j < L; ++j) *reinterpret_cast<VU*>(panel + (k + j) * kNR + c) = r[j];
    }
  for (int c = 0; c < nc; ++c)
    for (int k = c < nc_blocks ? nk_blocks : 0; k < nk; ++k)
      panel[k * kNR + c] = Bt[static_cast<int64_t>(c) * ldb + k];
}

template <int kSign, bool kTA, bool kTB, int kScale, typename acc_t>
inline void mm_acc_rows(int n, int C, int K, const acc_t* A, int lda, const acc_t* B, int ldb,
                        acc_t* out, int ldo, const acc_t* sc) {
  constexpr int kScaledElems = 4096;  // the scaled rows of A formed at a time (16 KB of fp32)
  if constexpr (kScale != kNoScale) {
    if (K > 0 && K * kMR <= kScaledElems) {
      // A scaled product: a(i, k) (A's element times its scale, the same multiply) formed once per
      // element into rows of `as`, then the unscaled product on them -- instead of once per
      // column block of the output inside the tile, where the scalar multiplies crowded the
      // vector ones. Same values, same sums: the same bits.
      const int rows = kScaledElems / K / kMR * kMR;
      alignas(64) acc_t as[kScaledElems];
      for (int i0 = 0; i0 < n; i0 += rows) {
        const int ni = n - i0 < rows ? n - i0 : rows;
        for (int i = 0; i < ni; ++i)
          for (int k = 0; k < K; ++k) as[i * K + k] = mm_a<kTA, kScale>(A, lda, sc, i0 + i, k);
        mm_acc_rows<kSign, false, kTB, kNoScale>(ni, C, K, as, K, B, ldb, out + static_cast<int64_t>(i0) * ldo,
                                                 ldo, sc);
      }
      return;
    }
  }
  alignas(64) acc_t panel[kKC][kNR];  // B[k0 .. k0+nk, c0 .. c0+nc] packed, zero-padded to kNR
  for (int c0 = 0; c0 < C; c0 += kNR) {
    const int nc = C - c0 < kNR ? C - c0 : kNR;
    // whole contiguous rows of B are read in place (the chains' operands fit in L1), the rest
    // (B^T, an edge) is packed kKC rows at a time
    const bool in_place = !kTB && nc == kNR;
    for (int k0 = 0; k0 < K; k0 += in_place ? K : kKC) {
      const int nk = in_place ? K : (K - k0 < kKC ? K - k0 : kKC);
      const acc_t* bp = B + static_cast<int64_t>(k0) * ldb + c0;
      int ldp = ldb;
      if (!in_place) {
        for (int k = 0; k < nk; ++k)
          for (int c = nc; c < kNR; ++c) panel[k][c] = acc_t(0);
        if (kTB)  // B^T: column c of the panel is a contiguous run of B's row c0 + c
          pack_transposed(nc, nk, B + static_cast<int64_t>(c0) * ldb + k0, ldb, &panel[0][0]);
        else
          for (int k = 0; k < nk; ++k)
            for (int c = 0; c < nc; ++c) panel[k][c] = bp[static_cast<int64_t>(k) * ldb + c];
        bp = &panel[0][0], ldp = kNR;
      }
      for (int i0 = 0; i0 < n; i0 += kMR)
        on_out_tile(out + static_cast<int64_t>(i0) * ldo + c0, ldo, n - i0 < kMR ? n - i0 : kMR, nc,
                    [&](Tile<acc_t>& tile) {
                      mm_tile<kSign, kTA, kScale>(tile, n, i0, k0, nk, A, lda, bp, ldp, sc);
                    });
    }
  }
}
#endif

// acc[col] += sum_i term(i, col) for col < C, i < n: each column's sum starts at 0 and adds the
// rows in order i = 0, 1, ..., then joins acc (the same bits on both schedules). GPU: a thread
// per column; CPU: rows outer, a chunk of columns inner (a vector loop; column by column it is a
// chain of dependent adds).
template <typename acc_t, typename Term>
TTT_HD void add_col_sums(int n, int C, acc_t* acc, Term term) {
#if TTT_ROW_SCHEDULE
  constexpr int kCols = 64;
  for (int c0 = 0; c0 < C; c0 += kCols) {
    const int nc = C - c0 < kCols ? C - c0 : kCols;
    acc_t s[kCols];
    for (int c = 0; c < nc; ++c) s[c] = acc_t(0);
    for (int i = 0; i < n; ++i)
      for (int c = 0; c < nc; ++c) s[c] += term(i, c0 + c);
    for (int c = 0; c < nc; ++c) acc[c0 + c] += s[c];
  }
#else
  TTT_PAR_FOR(col, C) {
    acc_t s = 0;
    for (int i = 0; i < n; ++i) s += term(i, col);
    acc[col] += s;
  }
#endif
}

// out[i, c] += sum_k a(i, k) b(k, c) (see the top of this file). out must not overlap A or B.
template <int kSign, bool kTA, bool kTB, int kScale = kNoScale, typename acc_t>
TTT_HD void mm_acc(int n, int C, int K, const acc_t* A, int lda, const acc_t* B, int ldb,
                   acc_t* out, int ldo, const acc_t* sc = nullptr) {
#if TTT_ROW_SCHEDULE
  mm_acc_rows<kSign, kTA, kTB, kScale>(n, C, K, A, lda, B, ldb, out, ldo, sc);
#else
  TTT_PAR_FOR(e, n * C) {
    const int i = e / C, c = e % C;
    acc_t s = out[static_cast<int64_t>(i) * ldo + c];
    for (int k = 0; k < K; ++k)
      s = mm_step<kSign>(s, mm_a<kTA, kScale>(A, lda, sc, i, k), mm_b<kTB>(B, ldb, k, c));
    out[static_cast<int64_t>(i) * ldo + c] = s;
  }
#endif
}

// One term of mm_acc_terms: a(i, k) = A[i, k] (A[k, i] with kTA), row stride lda; b(k, c) =
// B[k, c], row stride ldb; k < K.
template <typename acc_t>
struct MMTerm {
  int K;
  const acc_t* A;
  int lda;
  const acc_t* B;
  int ldb;
};

// out[i, c] +-= sum over the terms, in order, of sum_k a_t(i, k) b_t(k, c): each element sees
// the operations of one mm_acc per term, one term after the other (so the same bits, on both
// schedules), but on the CPU each register tile of out is read and written once for all the
// terms instead of once per term (it matters where out is large and K small: TTT-MLP's dW2 +=
// three n-deep products). out must not overlap any A or B.
template <int kSign, bool kTA, int kTerms, typename acc_t>
TTT_HD void mm_acc_terms(int n, int C, const MMTerm<acc_t> (&t)[kTerms], acc_t* out, int ldo) {
#if TTT_ROW_SCHEDULE
  for (int c0 = 0; c0 < C; c0 += kNR) {
    const int nc = C - c0 < kNR ? C - c0 : kNR;
    if (nc < kNR) {  // an edge block of columns (B packed there): term after term
      for (int j = 0; j < kTerms; ++j)
        mm_acc_rows<kSign, kTA, false, kNoScale>(n, nc, t[j].K, t[j].A, t[j].lda, t[j].B + c0, t[j].ldb,
                                                 out + c0, ldo, static_cast<const acc_t*>(nullptr));
      continue;
    }
    for (int i0 = 0; i0 < n; i0 += kMR)
      on_out_tile(out + static_cast<int64_t>(i0) * ldo + c0, ldo, n - i0 < kMR ? n - i0 : kMR, nc,
                  [&](Tile<acc_t>& tile) {
                    for (int j = 0; j < kTerms; ++j)  // B's rows in place, as mm_acc_rows reads them
                      mm_tile<kSign, kTA, kNoScale>(tile, n, i0, 0, t[j].K, t[j].A, t[j].lda, t[j].B + c0,
                                                    t[j].ldb, static_cast<const acc_t*>(nullptr));
                  });
  }
#else
  TTT_PAR_FOR(e, n * C) {
    const int i = e / C, c = e % C;
    acc_t s = out[static_cast<int64_t>(i) * ldo + c];
    for (int j = 0; j < kTerms; ++j)
      for (int k = 0; k < t[j].K; ++k)
        s = mm_step<kSign>(s, mm_a<kTA, kNoScale>(t[j].A, t[j].lda, static_cast<const acc_t*>(nullptr), i, k),
                           mm_b<false>(t[j].B, t[j].ldb, k, c));
    out[static_cast<int64_t>(i) * ldo + c] = s;
  }
#endif
}

}  // namespace ttt
