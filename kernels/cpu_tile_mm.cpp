// The masked op's CPU matmul: out[M, N] = a[M, K] @ (W ⊙ expand(mask))^T (+ bias), fp32,
// reading only the kept tiles of W. Built at first use by cpu_tile_mm.py (plain C ABI, no
// torch headers: it compiles in about a second) and called through ctypes.
//
// Why a kernel of our own: at 90% tile sparsity one torch addmm_ per kept tile (a 2080x32 by
// 32x32 matmul) ran at about a third of dense throughput: each call streams its slice of `a`
// and its output slice through memory for very little arithmetic, and each ends in an OpenMP
// barrier. Here a block of rows stays in cache while every kept tile of every output tile is
// applied to it, each 6-row x 16-column piece of the output lives in registers across all its
// kept tiles, and the rows are split over threads in one OpenMP region per call.
//
// Threads: built with -fopenmp, this library uses the OpenMP runtime torch already loaded
// (libgomp.so.1, matched by soname), i.e. torch's own thread pool. That matters on a small
// machine: torch's OpenMP threads spin for a while after each region, and threads of another
// pool (Python threads, tried first) lost their cores to them, running 2-4x slower right after
// an Inductor kernel than alone.

#include <stdint.h>
#include <string.h>

namespace {

// 8 floats: one AVX register (two SSE/NEON registers where that is what the target has).
// aligned(4): loads and stores at any float address.
typedef float v8 __attribute__((vector_size(32), aligned(4)));

constexpr int ROWS = 6;    // output rows per register block: 6 x 16 floats = 12 accumulators
constexpr int COLS = 16;   // output columns per register block (two v8)
constexpr int64_t ROW_CHUNK = 96;  // rows kept in cache while every output tile is computed

// One ROWS x COLS register block (R <= ROWS rows, `cols` <= COLS valid columns) of the
// output tile whose kept tiles are packed[p0..p1).
template <int R>
inline void register_block(const float* a, int64_t lda, const float* packed, const int32_t* col_idx,
                           int32_t p0, int32_t p1, int64_t k, int64_t t, int64_t tp, int64_t col0,
                           const float* bias, int cols, float* out, int64_t ldo) {
  // Start from the bias (or zero): whole vectors where the block is whole, the common case.
  v8 start[2] = {{0}, {0}};
  if (bias && cols == COLS) {
    start[0] = *(const v8*)bias;
    start[1] = *(const v8*)(bias + 8);
  } else if (bias) {
    for (int c = 0; c < cols; c++) start[c / 8][c % 8] = bias[c];
  }
  v8 acc[R][2];
  for (int r = 0; r < R; r++) {
    acc[r][0] = start[0];
    acc[r][1] = start[1];
  }
  for (int32_t p = p0; p < p1; p++) {
    const int64_t k0 = col_idx[p] * t;
    const int64_t depth = k - k0 < t ? k - k0 : t;  // an edge tile is cut at K
    const float* a_tile = a + k0;
    const float* w_tile = packed + p * t * tp + col0;
    for (int64_t kk = 0; kk < depth; kk++) {
      const v8 w0 = *(const v8*)(w_tile + kk * tp);
      const v8 w1 = *(const v8*)(w_tile + kk * tp + 8);
      for (int r = 0; r < R; r++) {
        const float x = a_tile[r * lda + kk];
        acc[r][0] += x * w0;
        acc[r][1] += x * w1;
      }
    }
  }
  for (int r = 0; r < R; r++) {
    float* o = out + r * ldo;
    if (cols == COLS) {
      *(v8*)o = acc[r][0];
      *(v8*)(o + 8) = acc[r][1];
    } else {
      for (int c = 0; c < cols; c++) o[c] = c < 8 ? acc[r][0][c] : acc[r][1][c - 8];
    }
  }
}

// Rows [begin, end) of the output: every output tile, each as register blocks over all its kept
// tiles. Its own function, arguments by value: inside the OpenMP region's outlined body the
// loops read the captured variables through a pointer on every use (~15% slower, measured).
void row_chunk(const float* a, int64_t lda, const float* packed, const int32_t* row_ptr, const int32_t* col_idx,
               int64_t nb, int64_t n, int64_t k, int64_t t, int64_t tp, const float* bias, float* out,
               int64_t ldo, int64_t begin, int64_t end) {
  for (int64_t i = 0; i < nb; i++) {
    const int64_t tile_cols = n - i * t < t ? n - i * t : t;
    const int32_t p0 = row_ptr[i], p1 = row_ptr[i + 1];
    for (int64_t col0 = 0; col0 < tile_cols; col0 += COLS) {
      const int cols = tile_cols - col0 < COLS ? (int)(tile_cols - col0) : COLS;
      const float* bias_block = bias ? bias + i * t + col0 : nullptr;
      for (int64_t r0 = begin; r0 < end; r0 += ROWS) {
        const float* a_rows = a + r0 * lda;
        float* out_block = out + r0 * ldo + i * t + col0;
#define SC_BLOCK(R) register_block<R>(a_rows, lda, packed, col_idx, p0, p1, k, t, tp, col0, bias_block, cols, out_block, ldo)
        switch (end - r0 < ROWS ? end - r0 : ROWS) {
          case 6: SC_BLOCK(6); break;
          case 5: SC_BLOCK(5); break;
          case 4: SC_BLOCK(4); break;
          case 3: SC_BLOCK(3); break;
          case 2: SC_BLOCK(2); break;
          default: SC_BLOCK(1); break;
        }
#undef SC_BLOCK
      }
    }
  }
}

// fp32 -> the nearest bfloat16 (ties to even), returned as fp32: what `tensor.to(torch.bfloat16)`
// does to each element (NaN stays NaN). Autocast rounds a linear's fp32 weight this way before
// a bf16 matmul; the packing below does the same to the kept tiles only.
inline float round_to_bfloat16(float value) {
  uint32_t bits;
  memcpy(&bits, &value, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return value;
  bits += 0x7fffu + ((bits >> 16) & 1u);
  bits &= 0xffff0000u;
  memcpy(&value, &bits, sizeof bits);
  return value;
}

}  // namespace

extern "C" {

// Kept tiles, in block-row-major order, as a CSR list (row_ptr[nb + 1], col_idx[kept]) and
// their weights transposed and scaled by the mask value: packed[p][kk][nn] =
// mask[i, j] * w[i*t + nn, j*t + kk] for kept tile p = (i, j), rows padded from t to tp
// columns (a multiple of COLS) with zeros, as is whatever lies past N or K. Strides are in
// elements, so transposed views (the input gradient's W^T) need no copy. With `round_bf16`
// each packed value (mask value times weight) is rounded to the nearest bfloat16: the fp32
// master weight of a layer that runs in bf16 under autocast, rounded where eager autocast
// rounds it, for the kept tiles only. Returns the number of kept tiles, or -1 if there are
// more than `capacity`.
int64_t sc_pack_kept_tiles(const float* w, int64_t n, int64_t k, int64_t w_s0, int64_t w_s1,
                           const float* mask, int64_t nb, int64_t kb, int64_t mask_s0, int64_t mask_s1,
                           int64_t t, int64_t tp, int64_t capacity, int32_t round_bf16,
                           int32_t* row_ptr, int32_t* col_idx, float* packed) {
  int64_t p = 0;
  row_ptr[0] = 0;
  for (int64_t i = 0; i < nb; i++) {
    for (int64_t j = 0; j < kb; j++) {
      const float value = mask[i * mask_s0 + j * mask_s1];
      if (value == 0.f) continue;
      if (p == capacity) return -1;
      col_idx[p] = (int32_t)j;
      float* dst = packed + p * t * tp;
      for (int64_t kk = 0; kk < t; kk++) {
        const int64_t col = j * t + kk;
        for (int64_t nn = 0; nn < tp; nn++) {
          const int64_t row = i * t + nn;
          dst[kk * tp + nn] = (nn < t && row < n && col < k) ? value * w[row * w_s0 + col * w_s1] : 0.f;
        }
        if (round_bf16)
          for (int64_t nn = 0; nn < t; nn++) dst[kk * tp + nn] = round_to_bfloat16(dst[kk * tp + nn]);
      }
      p++;
    }
    row_ptr[i + 1] = (int32_t)p;
  }
  return p;
}

// BSR blocks into the same packed layout: values[p] is block p of W ([t rows of W][t columns],
// row-major, as torch's BSR values), packed[p][kk][nn] = values[p][nn][kk], rows padded to tp.
// The BSR op's crow/col indices are the kernel's row_ptr/col_idx as they are.
void sc_pack_bsr_blocks(const float* values, int64_t blocks, int64_t t, int64_t tp, float* packed) {
  for (int64_t p = 0; p < blocks; p++) {
    const float* block = values + p * t * t;
    float* dst = packed + p * t * tp;
    for (int64_t kk = 0; kk < t; kk++)
      for (int64_t nn = 0; nn < tp; nn++) dst[kk * tp + nn] = nn < t ? block[nn * t + kk] : 0.f;
  }
}

// out (row stride ldo) from a [m, k] (row stride lda, unit column stride) and the packed kept
// tiles, on `threads` OpenMP threads. Every output element is written (the bias or zero where a
// block row keeps no tile).
void sc_tile_mm(const float* a, int64_t lda, int64_t m, const float* packed, const int32_t* row_ptr,
                const int32_t* col_idx, int64_t nb, int64_t n, int64_t k, int64_t t, int64_t tp,
                const float* bias, float* out, int64_t ldo, int threads) {
  const int64_t chunks = (m + ROW_CHUNK - 1) / ROW_CHUNK;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t c = 0; c < chunks; c++) {
    const int64_t end = (c + 1) * ROW_CHUNK < m ? (c + 1) * ROW_CHUNK : m;
    row_chunk(a, lda, packed, row_ptr, col_idx, nb, n, k, t, tp, bias, out, ldo, c * ROW_CHUNK, end);
  }
}

}  // extern "C"
