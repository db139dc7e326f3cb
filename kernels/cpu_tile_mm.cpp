// The masked op's CPU matmul: out[M, N] = a[M, K] @ (W ⊙ expand(mask))^T (+ bias), accumulated in
// fp32, reading only the kept tiles of W. Plain C ABI, no torch headers: cpu_tile_ops.cpp wraps its
// entry points as torch operators; cpu_tile_mm.py builds both into one library at first use.
//
// Why a kernel of our own: at 90% tile sparsity one torch addmm_ per kept tile (a 2080x32 by
// 32x32 matmul) ran at about a third of dense throughput: each call streams its slice of `a`
// and its output slice through memory for very little arithmetic, and each ends in an OpenMP
// barrier. Here a block of rows stays in cache while every kept tile of every output tile is
// applied to it, each 6-row x 16- (or 32-) column piece of the output lives in registers across
// all its kept tiles, and the rows are split over threads in one OpenMP region per call.
//
// Two packed layouts of the kept tiles, two arithmetic paths:
//  - FP32: packed[p][kk][nn] fp32, fp32 multiply-adds: 16-float AVX-512 vectors where the build
//    targets AVX-512 (SC_WIDE_FP32), else 8-float GCC vector extensions (AVX2, NEON, whatever
//    -march gives). `a` and `out` may be fp32 or bfloat16 (a bf16 `a` converted once per row
//    chunk, a bf16 `out` rounded in registers: no fp32 copy of the result).
//  - BF16 pairs: packed[p][kk / 2][nn][kk % 2] bfloat16, consumed by the CPU's bf16 dot products
//    (AVX-512 BF16 `vdpbf16ps`: two bf16 products added into an fp32 lane per instruction, twice
//    the multiply-adds of an fp32 FMA per instruction and half the bytes). Only where the
//    compiler targets a CPU with AVX-512 BF16 (-march=native on such a host):
//    sc_native_bf16() says whether this build has it. Like the instruction, it flushes bf16
//    denormals (below 1e-38) to zero.
//    Where the CPU also has AMX (Sapphire Rapids and later: tile registers and TDPBF16PS, a
//    16x16 fp32 block += 16x32 bf16 by 32x16 bf16 in one instruction), the same packed layout
//    is what a TDPBF16PS's second operand reads (its "VNNI" layout: pairs of K rows interleaved),
//    so rows in blocks of 16 run on the tile unit: there oneDNN's dense bf16 matmul runs on AMX
//    too, ~10x the multiply-adds per cycle of vdpbf16ps, and without it the sparse layers lost
//    most of their lead (timm DeiT-tiny bf16, 90% sparse: 1.36x over Inductor instead of ~1.8x).
//    Used when the build targets AMX, the kernel (Linux) lets the process use the tile data
//    (arch_prctl), every kept tile is a whole number of 16- or 32-deep steps (t a multiple of 16,
//    K a multiple of t: an A tile never reads past K), and sc_set_amx has not turned it off.
//    Rows left over (fewer than 16 at the end of a thread's range) take the vdpbf16ps path.
//
// Threads: built with -fopenmp, this library uses the OpenMP runtime torch already loaded
// (libgomp.so.1, matched by soname), i.e. torch's own thread pool. That matters on a small
// machine: torch's OpenMP threads spin for a while after each region, and threads of another
// pool (Python threads, tried first) lost their cores to them, running 2-4x slower right after
// an Inductor kernel than alone.

#include <stdint.h>
#include <string.h>

#include <atomic>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// The fp32 path in 16-float (512-bit) vectors where the CPU has AVX-512 (with BW and VL, for the
// masked 16-bit stores of a bf16 output). The generic path below is written in 8-float vectors:
// on an Intel core a 512-bit FMA does twice the work of a 256-bit one, and there the 8-wide code
// ran at half of what the host's dense fp32 matmuls reach (the CPU main job 2.68x dense instead
// of 3.7x on a host whose AVX-512 is two 256-bit halves).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define SC_WIDE_FP32 1
#else
#define SC_WIDE_FP32 0
#endif

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define SC_NATIVE_BF16 1
#else
#define SC_NATIVE_BF16 0
#endif

#if SC_NATIVE_BF16 && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define SC_AMX 1
#else
#define SC_AMX 0
#endif

namespace {

// 8 floats: one AVX register (two SSE/NEON registers where that is what the target has).
// aligned(4): loads and stores at any float address.
typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef uint32_t v8u __attribute__((vector_size(32), aligned(4)));
typedef uint16_t v8h __attribute__((vector_size(16), aligned(2)));

constexpr int ROWS = 6;    // output rows per register block
constexpr int COLS = 16;   // output columns per fp32 register block (two v8): 12 accumulators
constexpr int64_t ROW_CHUNK = 96;  // rows kept in cache while every output tile is computed

// Packed layouts (the `format` argument of the entry points).
constexpr int32_t PACKED_FP32 = 0;
constexpr int32_t PACKED_BF16_PAIRS = 1;

// ---- bfloat16 <-> fp32 ----------------------------------------------------------------------

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = (uint32_t)h << 16;
  float value;
  memcpy(&value, &bits, sizeof value);
  return value;
}

// fp32 -> the bits of the nearest bfloat16 (ties to even): what `tensor.to(torch.bfloat16)` does
// to each element (NaN becomes torch's NaN, 0x7fc0).
inline uint16_t float_to_bf16(float value) {
  uint32_t bits;
  memcpy(&bits, &value, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return (uint16_t)(bits >> 16);
}

// The same rounding returned as fp32: autocast rounds a linear's fp32 weight this way before a
// bf16 matmul; the packing below does the same to the kept tiles only.
inline float round_to_bfloat16(float value) { return bf16_to_float(float_to_bf16(value)); }

// Eight at once, for the fp32 path's bf16 output: same rounding, same NaN.
inline void store_bf16x8(uint16_t* out, v8 value) {
  v8u bits;
  memcpy(&bits, &value, sizeof bits);
  const v8u nan = (bits & 0x7fffffffu) > 0x7f800000u;  // all ones where NaN
  const v8u rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const v8u chosen = (nan & 0x7fc0u) | (~nan & rounded);
  const v8h half = __builtin_convertvector(chosen, v8h);
  memcpy(out, &half, sizeof half);
}

inline float load_element(const float* p) { return *p; }
inline float load_element(const uint16_t* p) { return bf16_to_float(*p); }
inline void store_element(float* p, float value) { *p = value; }
inline void store_element(uint16_t* p, float value) { *p = float_to_bf16(value); }
inline void store_v8(float* p, v8 value) { *(v8*)p = value; }
inline void store_v8(uint16_t* p, v8 value) { store_bf16x8(p, value); }

// ---- the activation fused into the output (the `activation` argument) ---------------------------
//
// A linear followed by GELU or ReLU (an MLP's first layer) gets it applied to the fp32 sums before
// they are rounded and stored: one pass over the output instead of a second kernel reading and
// writing it again (in timm's DeiT-tiny, bf16, the separate GELU took as long as the 49 sparse
// linears together). GELU is the exact (erf) one. For an fp32 output, erf as in ATen's vectorized
// CPU code (and so in Inductor's C++ kernels): Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7, with
// a Cephes-style exp. For an output rounded to bf16, a cheaper erf good to bf16 (erf_rational).

constexpr int32_t ACTIVATION_NONE = 0;
constexpr int32_t ACTIVATION_GELU = 1;
constexpr int32_t ACTIVATION_RELU = 2;

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef int32_t v16i __attribute__((vector_size(64)));
// The int32 vector of a float vector's width, by its size in bytes (a vector type with attributes
// as a template argument draws GCC's -Wignored-attributes).
template <size_t BYTES> struct IntVectorOfSize;
template <> struct IntVectorOfSize<32> { typedef v8i type; };
template <> struct IntVectorOfSize<64> { typedef v16i type; };

template <typename V>
inline V splat(float value) {
  V v = {};
  return v + value;
}

// exp(x) for x <= 0 (erf's exp(-x^2)): x = n ln2 + r with |r| <= ln2 / 2, a degree-6 polynomial
// of r, times 2^n built in the exponent bits. Below -87 the result is ~1e-38: clamped there.
template <typename V>
inline V exp_nonpositive(V x) {
  typedef typename IntVectorOfSize<sizeof(V)>::type VI;
  x = x < -87.0f ? splat<V>(-87.0f) : x;
  const V n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const V r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  V y = splat<V>(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  V scale;
  memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

// 1 / d for |d| well above 0 (erf_approx's 1 + 0.33 |x|, erf_rational's denominator): a vector
// division costs ~16 cycles per 16 lanes on AVX-512 (as much as the rest of the GELU together);
// the reciprocal estimate (14 bits) and one Newton step give ~28 bits.
inline v8 reciprocal(v8 d) {
#if defined(__AVX512F__) && defined(__AVX512VL__)
  const v8 r = (v8)_mm256_rcp14_ps((__m256)d);
  return r * (2.0f - d * r);
#else
  return 1.0f / d;
#endif
}

inline v16 reciprocal(v16 d) {
#if defined(__AVX512F__)
  const v16 r = (v16)_mm512_rcp14_ps((__m512)d);
  return r * (2.0f - d * r);
#else
  return 1.0f / d;
#endif
}

template <typename V>
inline V erf_approx(V x) {
  typedef typename IntVectorOfSize<sizeof(V)>::type VI;
  VI bits;
  memcpy(&bits, &x, sizeof bits);
  const VI sign = bits & (int32_t)0x80000000u;
  const VI abs_bits = bits & 0x7fffffff;
  V ax;
  memcpy(&ax, &abs_bits, sizeof ax);
  const V t = reciprocal(ax * 0.3275911f + 1.0f);
  const V r = (((t * 1.061405429f - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f;
  const V e = 1.0f - r * t * exp_nonpositive(-(ax * ax));
  VI e_bits;
  memcpy(&e_bits, &e, sizeof e_bits);
  e_bits |= sign;
  V out;
  memcpy(&out, &e_bits, sizeof out);
  return out;
}

// erf for an output rounded to bfloat16 (8 significant bits): a rational function of x on
// [-4, 4] (beyond, erf is +-1 in fp32), odd numerator of degree 13 over an even denominator of
// degree 8 (the coefficients of XLA's / Eigen's fast float erf), |error| <= 4.5e-7. About 20
// operations against the 35 of erf_approx's reciprocal, polynomial and exp: the fused GELU of a
// bf16 layer ran at ~28 cycles per 16 values, the largest cost of timm DeiT-tiny's MLPs. For
// GELU(x) = x/2 (1 + erf(x/sqrt(2))) in bf16: within 2 bf16 ulps of the exact value where
// |GELU(x)| >= 1e-4, and within 2e-6 in the negative tail below that (x < -3.9, where
// 1 + erf cancels; erf_approx there keeps 1e-6).
template <typename V>
inline V erf_rational(V x) {
  x = x > 4.0f ? splat<V>(4.0f) : x;
  x = x < -4.0f ? splat<V>(-4.0f) : x;
  const V x2 = x * x;
  V p = x2 * -2.72614225801306e-10f + 2.77068142495902e-08f;
  p = p * x2 - 2.10102402082508e-06f;
  p = p * x2 - 5.69250639462346e-05f;
  p = p * x2 - 7.34990630326855e-04f;
  p = p * x2 - 2.95459980854025e-03f;
  p = p * x2 - 1.60960333262415e-02f;
  V q = x2 * -1.45660718464996e-05f - 2.13374055278905e-04f;
  q = q * x2 - 1.68282697438203e-03f;
  q = q * x2 - 7.37332916720468e-03f;
  q = q * x2 - 1.42647390514189e-02f;
  const V erf = x * p * reciprocal(q);  // q <= -0.0142, far from 0
  // Rounding takes the quotient to 1 + 2e-7 near +-4: clamped, so that 1 + erf(x) >= 0 and
  // GELU keeps its sign in the negative tail (and GELU(-inf) is NaN, as torch's).
  return erf > 1.0f ? splat<V>(1.0f) : (erf < -1.0f ? splat<V>(-1.0f) : erf);
}

template <typename V>
inline V activate(V x, int32_t activation) {
  switch (activation) {
    case ACTIVATION_GELU:
      return x * 0.5f * (1.0f + erf_approx(x * 0.70710678118654752f));
    case ACTIVATION_RELU:
      return x < 0.0f ? splat<V>(0.0f) : x;  // NaN stays NaN, as torch.relu
    default:
      return x;
  }
}

// The activation of fp32 sums about to be rounded to bfloat16: GELU's erf to bf16 precision.
template <typename V>
inline V activate_for_bf16(V x, int32_t activation) {
  if (activation == ACTIVATION_GELU) return x * 0.5f * (1.0f + erf_rational(x * 0.70710678118654752f));
  return activate(x, activation);
}

// The activation for an output of type O: float keeps the fp32-accurate GELU.
template <typename O, typename V>
inline V activate_for(V x, int32_t activation) {
  return std::is_same<O, float>::value ? activate(x, activation) : activate_for_bf16(x, activation);
}

// ---- the fp32 path ----------------------------------------------------------------------------

// One ROWS x COLS register block (R <= ROWS rows, `cols` <= COLS valid columns) of the
// output tile whose kept tiles are packed[p0..p1). A is float or bfloat16 (uint16_t), so is O.
template <int R, typename A, typename O>
inline void register_block(const A* a, int64_t lda, const float* packed, const int32_t* col_idx,
                           int32_t p0, int32_t p1, int64_t k, int64_t t, int64_t tp, int64_t col0,
                           const float* bias, int cols, O* out, int64_t ldo, int32_t activation) {
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
    const A* a_tile = a + k0;
    const float* w_tile = packed + p * t * tp + col0;
    for (int64_t kk = 0; kk < depth; kk++) {
      const v8 w0 = *(const v8*)(w_tile + kk * tp);
      const v8 w1 = *(const v8*)(w_tile + kk * tp + 8);
      for (int r = 0; r < R; r++) {
        const float x = load_element(a_tile + r * lda + kk);
        acc[r][0] += x * w0;
        acc[r][1] += x * w1;
      }
    }
  }
  if (activation != ACTIVATION_NONE)
    for (int r = 0; r < R; r++) {
      acc[r][0] = activate_for<O>(acc[r][0], activation);
      acc[r][1] = activate_for<O>(acc[r][1], activation);
    }
  for (int r = 0; r < R; r++) {
    O* o = out + r * ldo;
    if (cols == COLS) {
      store_v8(o, acc[r][0]);
      store_v8(o + 8, acc[r][1]);
    } else {
      for (int c = 0; c < cols; c++) store_element(o + c, c < 8 ? acc[r][0][c] : acc[r][1][c - 8]);
    }
  }
}

// A column block whose output tile keeps no tile of W: every row is activation(bias) (or
// activation(0)), the same COLS values. Computed once and copied down the rows, instead of once
// per row: at 90% block sparsity about half the column blocks of a ViT's layers are empty (a
// 192-deep layer at tile 32 keeps none of its 6 tiles in 0.9^6 = 53% of its block rows), and
// there a fused GELU was most of the call's time.
template <typename O>
inline void constant_rows(const float* bias, int cols, O* out, int64_t ldo, int64_t rows, int32_t activation) {
  v8 value[2] = {{0}, {0}};
  if (bias)
    for (int c = 0; c < cols; c++) value[c / 8][c % 8] = bias[c];
  value[0] = activate_for<O>(value[0], activation);
  value[1] = activate_for<O>(value[1], activation);
  for (int64_t r = 0; r < rows; r++) {
    O* o = out + r * ldo;
    if (cols == COLS) {
      store_v8(o, value[0]);
      store_v8(o + 8, value[1]);
    } else {
      for (int c = 0; c < cols; c++) store_element(o + c, c < 8 ? value[0][c] : value[1][c - 8]);
    }
  }
}

// The output's column blocks, WIDTH wide (the last of an output tile narrower where N cuts it),
// output tile by output tile: block(p0, p1, out_col, col0, cols, bias_block) for the block at
// output column out_col, column col0 of output tile i, whose kept tiles are packed[p0..p1).
// The walk every path's row chunk shares; `block` runs its rows.
template <int WIDTH, typename Block>
inline void for_each_column_block(int64_t nb, int64_t n, int64_t t, const int32_t* row_ptr, const float* bias,
                                  Block&& block) {
  for (int64_t i = 0; i < nb; i++) {
    const int64_t tile_cols = n - i * t < t ? n - i * t : t;
    for (int64_t col0 = 0; col0 < tile_cols; col0 += WIDTH) {
      const int cols = tile_cols - col0 < WIDTH ? (int)(tile_cols - col0) : WIDTH;
      block(row_ptr[i], row_ptr[i + 1], i * t + col0, col0, cols, bias ? bias + i * t + col0 : nullptr);
    }
  }
}

// Rows [begin, end) in register blocks of MAX rows (the last one shorter): block(r0, rows) with
// `rows` a std::integral_constant, since a register block's accumulators are sized at compile time.
// Every path's row chunk walks its rows this way.
template <int R, typename Block>
inline void register_block_of(int64_t rows, int64_t r0, Block& block) {
  if constexpr (R > 1)
    if (rows < R) return register_block_of<R - 1>(rows, r0, block);
  block(r0, std::integral_constant<int, R>());
}

template <int MAX, typename Block>
inline void for_each_register_block(int64_t begin, int64_t end, Block&& block) {
  for (int64_t r0 = begin; r0 < end; r0 += MAX) register_block_of<MAX>(end - r0, r0, block);
}

// Rows [begin, end) of the output: every output tile, each as register blocks over all its kept
// tiles. Its own function, arguments by value: inside the OpenMP region's outlined body the
// loops read the captured variables through a pointer on every use (~15% slower, measured).
template <typename A, typename O>
void row_chunk(const A* a, int64_t lda, const float* packed, const int32_t* row_ptr, const int32_t* col_idx,
               int64_t nb, int64_t n, int64_t k, int64_t t, int64_t tp, const float* bias, O* out,
               int64_t ldo, int64_t begin, int64_t end, int32_t activation) {
  for_each_column_block<COLS>(nb, n, t, row_ptr, bias, [&](int32_t p0, int32_t p1, int64_t out_col, int64_t col0,
                                                           int cols, const float* bias_block) {
    if (p0 == p1) return constant_rows(bias_block, cols, out + begin * ldo + out_col, ldo, end - begin, activation);
    for_each_register_block<ROWS>(begin, end, [&](int64_t r0, auto rows) {
      register_block<decltype(rows)::value>(a + r0 * lda, lda, packed, col_idx, p0, p1, k, t, tp, col0, bias_block,
                                            cols, out + r0 * ldo + out_col, ldo, activation);
    });
  });
}

// ---- the fp32 path in 16-float vectors (AVX-512) ------------------------------------------------

#if defined(__AVX512F__)
// The lanes of the 16-column vector v of a block `cols` wide (a block cut by N has fewer): the mask
// of every masked load and store of the AVX-512 paths.
inline __mmask16 column_lanes(int cols, int v) {
  const int valid = cols - 16 * v >= 16 ? 16 : (cols - 16 * v > 0 ? cols - 16 * v : 0);
  return (__mmask16)((1u << valid) - 1u);
}
#endif

#if SC_WIDE_FP32
std::atomic<int> wide_fp32_enabled{1};
std::atomic<int64_t> wide_fp32_call_count{0};

// 16 fp32 results of one output row at `out`, the lanes in `lanes` only (a block cut by N).
inline void store_row_x16(float* out, __m512 value, __mmask16 lanes) {
  if (lanes == 0xffff)
    _mm512_storeu_ps(out, value);
  else
    _mm512_mask_storeu_ps(out, lanes, value);
}

// ... rounded to bf16 as float_to_bf16 does (to nearest even, NaN as torch's 0x7fc0).
inline void store_row_x16(uint16_t* out, __m512 value, __mmask16 lanes) {
  const __m512i bits = _mm512_castps_si512(value);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  const __m256i half = _mm512_cvtepi32_epi16(rounded);
  if (lanes == 0xffff)
    _mm256_storeu_si256((__m256i*)out, half);
  else
    _mm256_mask_storeu_epi16(out, lanes, half);
}

// One R x (16 * NV) register block of the output tile whose kept tiles are packed[p0..p1), as
// register_block (fp32 `a`, packed fp32 tiles, float or bf16 `out`) in 16-float vectors.
template <int R, int NV, typename O>
inline void register_block_x16(const float* a, int64_t lda, const float* packed, const int32_t* col_idx, int32_t p0,
                               int32_t p1, int64_t k, int64_t t, int64_t tp, int64_t col0, const float* bias, int cols,
                               O* out, int64_t ldo, int32_t activation) {
  __mmask16 lanes[NV];
  for (int v = 0; v < NV; v++) lanes[v] = column_lanes(cols, v);
  __m512 acc[R][NV];
  for (int v = 0; v < NV; v++) {
    const __m512 start = bias ? _mm512_maskz_loadu_ps(lanes[v], bias + 16 * v) : _mm512_setzero_ps();
    for (int r = 0; r < R; r++) acc[r][v] = start;
  }
  for (int32_t p = p0; p < p1; p++) {
    const int64_t k0 = col_idx[p] * t;
    const int64_t depth = k - k0 < t ? k - k0 : t;  // an edge tile is cut at K
    const float* a_tile = a + k0;
    const float* w_tile = packed + p * t * tp + col0;  // rows padded to tp: 16 * NV columns readable
    for (int64_t kk = 0; kk < depth; kk++) {
      __m512 w[NV];
      for (int v = 0; v < NV; v++) w[v] = _mm512_loadu_ps(w_tile + kk * tp + 16 * v);
      for (int r = 0; r < R; r++) {
        const __m512 x = _mm512_set1_ps(a_tile[r * lda + kk]);
        for (int v = 0; v < NV; v++) acc[r][v] = _mm512_fmadd_ps(x, w[v], acc[r][v]);
      }
    }
  }
  for (int r = 0; r < R; r++)
    for (int v = 0; v < NV; v++) {
      __m512 value = acc[r][v];
      if (activation != ACTIVATION_NONE) value = (__m512)activate_for<O>((v16)value, activation);
      store_row_x16(out + r * ldo + 16 * v, value, lanes[v]);
    }
}

// row_chunk in 16-float vectors: output column blocks 32 wide (one vector where 16 or fewer
// columns are left, as in a 16-wide tile).
template <typename O>
void row_chunk_x16(const float* a, int64_t lda, const float* packed, const int32_t* row_ptr, const int32_t* col_idx,
                   int64_t nb, int64_t n, int64_t k, int64_t t, int64_t tp, const float* bias, O* out, int64_t ldo,
                   int64_t begin, int64_t end, int32_t activation) {
  for_each_column_block<32>(nb, n, t, row_ptr, bias, [&](int32_t p0, int32_t p1, int64_t out_col, int64_t col0,
                                                         int cols, const float* bias_block) {
    O* out_rows = out + begin * ldo + out_col;
    if (p0 == p1) {  // constant_rows is 16 columns wide
      constant_rows(bias_block, cols < 16 ? cols : 16, out_rows, ldo, end - begin, activation);
      if (cols > 16) constant_rows(bias_block ? bias_block + 16 : nullptr, cols - 16, out_rows + 16, ldo, end - begin, activation);
      return;
    }
    // Two vectors only where the packed row has them (tp is a multiple of 16).
    if (cols > 16)
      for_each_register_block<ROWS>(begin, end, [&](int64_t r0, auto rows) {
        register_block_x16<decltype(rows)::value, 2>(a + r0 * lda, lda, packed, col_idx, p0, p1, k, t, tp, col0,
                                                     bias_block, cols, out + r0 * ldo + out_col, ldo, activation);
      });
    else
      for_each_register_block<ROWS>(begin, end, [&](int64_t r0, auto rows) {
        register_block_x16<decltype(rows)::value, 1>(a + r0 * lda, lda, packed, col_idx, p0, p1, k, t, tp, col0,
                                                     bias_block, cols, out + r0 * ldo + out_col, ldo, activation);
      });
  });
}
#endif  // SC_WIDE_FP32

// The fp32 path's rows [begin, end): in 16-float vectors where built for them and not turned off.
template <typename O>
inline void fp32_row_chunk(const float* a, int64_t lda, const float* packed, const int32_t* row_ptr,
                           const int32_t* col_idx, int64_t nb, int64_t n, int64_t k, int64_t t, int64_t tp,
                           const float* bias, O* out, int64_t ldo, int64_t begin, int64_t end, int32_t activation,
                           bool wide) {
#if SC_WIDE_FP32
  if (wide) return row_chunk_x16(a, lda, packed, row_ptr, col_idx, nb, n, k, t, tp, bias, out, ldo, begin, end, activation);
#endif
  (void)wide;
  row_chunk(a, lda, packed, row_ptr, col_idx, nb, n, k, t, tp, bias, out, ldo, begin, end, activation);
}

// ---- the bf16 pairs path (AVX-512 BF16) --------------------------------------------------------

#if SC_NATIVE_BF16
constexpr int ROWS_BF16 = 6;

// 16 fp32 sums of one output row -> `activation` -> bf16 (to nearest even) at `out`, the lanes set
// in `lanes` only (a block cut by N). Both bf16 paths (vdpbf16ps, AMX) end here.
inline void store_bf16_row(uint16_t* out, __m512 sums, __mmask16 lanes, int32_t activation) {
  if (activation != ACTIVATION_NONE) sums = (__m512)activate_for_bf16((v16)sums, activation);
  const __m256i rounded = (__m256i)_mm512_cvtneps_pbh(sums);
  if (lanes == 0xffff)
    _mm256_storeu_si256((__m256i*)out, rounded);
  else
    _mm256_mask_storeu_epi16(out, lanes, rounded);
}  // x 2 vectors of 16 columns: 12 fp32 accumulators, as the fp32 path

// An empty column block (see constant_rows) of both bf16 paths: activation(bias), rounded once,
// stored down the rows.
inline void constant_rows_bf16(const float* bias, int cols, uint16_t* out, int64_t ldo, int64_t rows,
                               int32_t activation) {
  for (int v = 0; v < 2 && 16 * v < cols; v++) {
    const __mmask16 lanes = column_lanes(cols, v);
    __m512 value = bias ? _mm512_maskz_loadu_ps(lanes, bias + 16 * v) : _mm512_setzero_ps();
    if (activation != ACTIVATION_NONE) value = (__m512)activate_for_bf16((v16)value, activation);
    const __m256i rounded = (__m256i)_mm512_cvtneps_pbh(value);
    for (int64_t r = 0; r < rows; r++) _mm256_mask_storeu_epi16(out + r * ldo + 16 * v, lanes, rounded);
  }
}

// One R x (16 * NV) register block of bf16 output from bf16 `a` and the kept tiles' bf16 pairs.
template <int R, int NV>
inline void register_block_bf16(const uint16_t* a, int64_t lda, const uint16_t* packed, const int32_t* col_idx,
                                int32_t p0, int32_t p1, int64_t k, int64_t t, int64_t tp, int64_t col0,
                                const float* bias, int cols, uint16_t* out, int64_t ldo, int32_t activation) {
  const int64_t pair_rows = (t + 1) / 2;
  __mmask16 lanes[NV];
  for (int v = 0; v < NV; v++) lanes[v] = column_lanes(cols, v);
  __m512 acc[R][NV];
  for (int v = 0; v < NV; v++) {
    const __m512 start = bias ? _mm512_maskz_loadu_ps(lanes[v], bias + 16 * v) : _mm512_setzero_ps();
    for (int r = 0; r < R; r++) acc[r][v] = start;
  }
  for (int32_t p = p0; p < p1; p++) {
    const int64_t k0 = col_idx[p] * t;
    const int64_t depth = k - k0 < t ? k - k0 : t;  // an edge tile is cut at K
    const uint16_t* a_tile = a + k0;
    const uint16_t* w_tile = packed + (p * pair_rows * tp + col0) * 2;
    int64_t kk = 0;
    for (; kk + 1 < depth; kk += 2) {
      const uint16_t* w_pairs = w_tile + kk * tp;  // pair row kk / 2, tp pairs long
      __m512bh w[NV];
      for (int v = 0; v < NV; v++) w[v] = (__m512bh)_mm512_loadu_si512(w_pairs + 32 * v);
      for (int r = 0; r < R; r++) {
        int32_t pair;  // a[r, kk] in the low half, a[r, kk + 1] in the high half: as packed
        memcpy(&pair, a_tile + r * lda + kk, sizeof pair);
        const __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
        for (int v = 0; v < NV; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], x, w[v]);
      }
    }
    if (kk < depth) {  // odd depth: the last element paired with zero, never reading past it
      const uint16_t* w_pairs = w_tile + kk * tp;
      __m512bh w[NV];
      for (int v = 0; v < NV; v++) w[v] = (__m512bh)_mm512_loadu_si512(w_pairs + 32 * v);
      for (int r = 0; r < R; r++) {
        const __m512bh x = (__m512bh)_mm512_set1_epi32((int32_t)a_tile[r * lda + kk]);
        for (int v = 0; v < NV; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], x, w[v]);
      }
    }
  }
  for (int r = 0; r < R; r++)
    for (int v = 0; v < NV; v++) store_bf16_row(out + r * ldo + 16 * v, acc[r][v], lanes[v], activation);
}

void row_chunk_bf16(const uint16_t* a, int64_t lda, const uint16_t* packed, const int32_t* row_ptr,
                    const int32_t* col_idx, int64_t nb, int64_t n, int64_t k, int64_t t, int64_t tp,
                    const float* bias, uint16_t* out, int64_t ldo, int64_t begin, int64_t end, int32_t activation) {
  for_each_column_block<32>(nb, n, t, row_ptr, bias, [&](int32_t p0, int32_t p1, int64_t out_col, int64_t col0,
                                                         int cols, const float* bias_block) {
    if (p0 == p1) return constant_rows_bf16(bias_block, cols, out + begin * ldo + out_col, ldo, end - begin, activation);
    // Two vectors only where the packed row has them (tp is a multiple of 16).
    if (cols > 16)
      for_each_register_block<ROWS_BF16>(begin, end, [&](int64_t r0, auto rows) {
        register_block_bf16<decltype(rows)::value, 2>(a + r0 * lda, lda, packed, col_idx, p0, p1, k, t, tp, col0,
                                                      bias_block, cols, out + r0 * ldo + out_col, ldo, activation);
      });
    else
      for_each_register_block<ROWS_BF16>(begin, end, [&](int64_t r0, auto rows) {
        register_block_bf16<decltype(rows)::value, 1>(a + r0 * lda, lda, packed, col_idx, p0, p1, k, t, tp, col0,
                                                      bias_block, cols, out + r0 * ldo + out_col, ldo, activation);
      });
  });
}
#endif  // SC_NATIVE_BF16

// ---- the AMX path (tile registers; bf16 pairs layout) -------------------------------------------

#if SC_AMX
// Tile registers: 0-3 the fp32 accumulators of a 32x32 output block (C[row half][column half]),
// 4-5 two 16-row slices of `a`, 6-7 two 16-column slices of a kept tile's pairs.
struct TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {0};
  uint16_t colsb[16] = {0};  // bytes per row
  uint8_t rows[16] = {0};
};

// `step` = K depth of one TDPBF16PS (16 or 32 bf16 values: 8 or 16 pairs).
inline TileConfig amx_config(int64_t step) {
  TileConfig config;
  for (int c = 0; c < 4; c++) config.rows[c] = 16, config.colsb[c] = 64;
  for (int a = 4; a < 6; a++) config.rows[a] = 16, config.colsb[a] = (uint16_t)(step * 2);
  for (int b = 6; b < 8; b++) config.rows[b] = (uint8_t)(step / 2), config.colsb[b] = 64;
  return config;
}

// Linux gives a process the AMX tile state only on request (else the first tile instruction
// faults); asked once. oneDNN asks too, for its own AMX kernels: asking again is harmless.
bool amx_permitted() {
  static const bool permitted = [] {
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return permitted;
}

std::atomic<int> amx_enabled{1};
std::atomic<int64_t> amx_call_count{0};

// One block of 16 * (1 + TWO_ROW_HALVES) rows by 16 * (1 + TWO_COL_HALVES) columns of the output
// tile whose kept tiles are packed[p0..p1), accumulated in tile registers over every kept tile,
// then bias added and rounded to bf16 through `scratch` (32x32 fp32).
template <bool TWO_ROW_HALVES, bool TWO_COL_HALVES>
inline void amx_block(const uint16_t* a, int64_t lda, const uint16_t* packed, const int32_t* col_idx, int32_t p0,
                      int32_t p1, int64_t t, int64_t tp, int64_t step, int64_t col0, const float* bias, int cols,
                      uint16_t* out, int64_t ldo, float* scratch, int32_t activation) {
  const int64_t pair_rows = (t + 1) / 2;
  _tile_zero(0);
  if (TWO_COL_HALVES) _tile_zero(1);
  if (TWO_ROW_HALVES) _tile_zero(2);
  if (TWO_ROW_HALVES && TWO_COL_HALVES) _tile_zero(3);
  for (int32_t p = p0; p < p1; p++) {
    const uint16_t* a_tile = a + col_idx[p] * t;
    const uint16_t* w_tile = packed + (p * pair_rows * tp + col0) * 2;
    for (int64_t s = 0; s < t; s += step) {
      _tile_loadd(4, a_tile + s, lda * 2);
      if (TWO_ROW_HALVES) _tile_loadd(5, a_tile + 16 * lda + s, lda * 2);
      const uint16_t* w_pairs = w_tile + s * tp;  // pair row s / 2, tp pairs (4 * tp bytes) long
      _tile_loadd(6, w_pairs, tp * 4);
      _tile_dpbf16ps(0, 4, 6);
      if (TWO_ROW_HALVES) _tile_dpbf16ps(2, 5, 6);
      if (TWO_COL_HALVES) {
        _tile_loadd(7, w_pairs + 32, tp * 4);
        _tile_dpbf16ps(1, 4, 7);
        if (TWO_ROW_HALVES) _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
  _tile_stored(0, scratch, 128);
  if (TWO_COL_HALVES) _tile_stored(1, scratch + 16, 128);
  if (TWO_ROW_HALVES) _tile_stored(2, scratch + 16 * 32, 128);
  if (TWO_ROW_HALVES && TWO_COL_HALVES) _tile_stored(3, scratch + 16 * 32 + 16, 128);
  for (int v = 0; v < (TWO_COL_HALVES ? 2 : 1); v++) {
    const __mmask16 lanes = column_lanes(cols, v);
    const __m512 start = bias ? _mm512_maskz_loadu_ps(lanes, bias + 16 * v) : _mm512_setzero_ps();
    for (int r = 0; r < (TWO_ROW_HALVES ? 32 : 16); r++)
      store_bf16_row(out + r * ldo + 16 * v, _mm512_add_ps(_mm512_loadu_ps(scratch + r * 32 + 16 * v), start), lanes,
                     activation);
  }
}

// Rows [begin, end) of the output, (end - begin) a multiple of 16: every output tile, in blocks
// of 32 (then 16) rows by 32 (or 16) columns.
void row_chunk_amx(const uint16_t* a, int64_t lda, const uint16_t* packed, const int32_t* row_ptr,
                   const int32_t* col_idx, int64_t nb, int64_t n, int64_t t, int64_t tp, int64_t step,
                   const float* bias, uint16_t* out, int64_t ldo, int64_t begin, int64_t end, float* scratch,
                   int32_t activation) {
  for_each_column_block<32>(nb, n, t, row_ptr, bias, [&](int32_t p0, int32_t p1, int64_t out_col, int64_t col0,
                                                         int cols, const float* bias_block) {
    if (p0 == p1) return constant_rows_bf16(bias_block, cols, out + begin * ldo + out_col, ldo, end - begin, activation);
    for (int64_t r0 = begin; r0 < end; r0 += 32) {
      const uint16_t* a_rows = a + r0 * lda;
      uint16_t* out_block = out + r0 * ldo + out_col;
#define SC_AMX_BLOCK(R2, C2) \
  amx_block<R2, C2>(a_rows, lda, packed, col_idx, p0, p1, t, tp, step, col0, bias_block, cols, out_block, ldo, scratch, \
                    activation)
      // Two column halves only where the packed row has them (tp is a multiple of 16).
      if (end - r0 >= 32) {
        if (cols > 16) SC_AMX_BLOCK(true, true); else SC_AMX_BLOCK(true, false);
      } else {
        if (cols > 16) SC_AMX_BLOCK(false, true); else SC_AMX_BLOCK(false, false);
      }
#undef SC_AMX_BLOCK
    }
  });
}
#endif  // SC_AMX

// ---- packing ------------------------------------------------------------------------------------

// One value into either layout: fp32 (optionally rounded to bf16), or bf16 pairs.
inline void put_packed(void* packed, int32_t format, int32_t round_bf16, int64_t p, int64_t t, int64_t tp, int64_t kk,
                       int64_t nn, float value) {
  if (format == PACKED_FP32) {
    ((float*)packed)[(p * t + kk) * tp + nn] = round_bf16 ? round_to_bfloat16(value) : value;
  } else {
    const int64_t pair_rows = (t + 1) / 2;
    ((uint16_t*)packed)[((p * pair_rows + kk / 2) * tp + nn) * 2 + (kk & 1)] = float_to_bf16(value);
  }
}

inline int64_t packed_depth(int32_t format, int64_t t) { return format == PACKED_FP32 ? t : (t + 1) / 2 * 2; }

template <typename S>
int64_t pack_kept_tiles(const S* w, int64_t n, int64_t k, int64_t w_s0, int64_t w_s1, const float* mask, int64_t nb,
                        int64_t kb, int64_t mask_s0, int64_t mask_s1, int64_t t, int64_t tp, int64_t capacity,
                        int32_t format, int32_t round_bf16, int32_t* row_ptr, int32_t* col_idx, void* packed) {
  const int64_t depth = packed_depth(format, t);
  int64_t p = 0;
  row_ptr[0] = 0;
  for (int64_t i = 0; i < nb; i++) {
    for (int64_t j = 0; j < kb; j++) {
      const float scale = mask[i * mask_s0 + j * mask_s1];
      if (scale == 0.f) continue;
      if (p == capacity) return -1;
      col_idx[p] = (int32_t)j;
      for (int64_t kk = 0; kk < depth; kk++) {
        const int64_t col = j * t + kk;
        for (int64_t nn = 0; nn < tp; nn++) {
          const int64_t row = i * t + nn;
          const bool inside = kk < t && nn < t && row < n && col < k;
          put_packed(packed, format, round_bf16, p, t, tp, kk, nn, inside ? scale * load_element(w + row * w_s0 + col * w_s1) : 0.f);
        }
      }
      p++;
    }
    row_ptr[i + 1] = (int32_t)p;
  }
  return p;
}

template <typename S>
void pack_bsr_blocks(const S* values, int64_t blocks, int64_t t, int64_t tp, int32_t format, void* packed) {
  const int64_t depth = packed_depth(format, t);
  for (int64_t p = 0; p < blocks; p++) {
    const S* block = values + p * t * t;
    for (int64_t kk = 0; kk < depth; kk++)
      for (int64_t nn = 0; nn < tp; nn++)
        put_packed(packed, format, 0, p, t, tp, kk, nn, nn < t && kk < t ? load_element(block + nn * t + kk) : 0.f);
  }
}

}  // namespace

extern "C" {

// 1 when this build has the bf16 pairs path (the CPU's bf16 dot products), else 0.
int32_t sc_native_bf16(void) { return SC_NATIVE_BF16; }

// 1 when the bf16 pairs path can run on AMX tiles here: a build for a CPU with AMX-BF16 on a
// kernel that grants the process the tile state. (Whether a call does: see the file's header.)
int32_t sc_native_amx(void) {
#if SC_AMX
  return amx_permitted() ? 1 : 0;
#else
  return 0;
#endif
}

// Turns the AMX path on or off for later calls (tests of the vdpbf16ps path on an AMX host, A/B
// benchmarks); returns whether it was on. Without AMX it stays off.
int32_t sc_set_amx(int32_t enabled) {
#if SC_AMX
  return amx_enabled.exchange(enabled ? 1 : 0);
#else
  (void)enabled;
  return 0;
#endif
}

// 1 when this build has the fp32 path in 16-float vectors (AVX-512), else 0.
int32_t sc_native_wide_fp32(void) { return SC_WIDE_FP32; }

// Turns the 16-float fp32 path on or off for later calls (tests of the 8-float one on an AVX-512
// host, A/B benchmarks); returns whether it was on. Without AVX-512 it stays off.
int32_t sc_set_wide_fp32(int32_t enabled) {
#if SC_WIDE_FP32
  return wide_fp32_enabled.exchange(enabled ? 1 : 0);
#else
  (void)enabled;
  return 0;
#endif
}

// How many sc_tile_mm calls ran the fp32 path in 16-float vectors: how a test sees which ran.
int64_t sc_wide_fp32_calls(void) {
#if SC_WIDE_FP32
  return wide_fp32_call_count.load(std::memory_order_relaxed);
#else
  return 0;
#endif
}

// How many sc_tile_mm calls ran rows on AMX tiles: how a test sees which path ran.
int64_t sc_amx_calls(void) {
#if SC_AMX
  return amx_call_count.load(std::memory_order_relaxed);
#else
  return 0;
#endif
}

// Kept tiles, in block-row-major order, as a CSR list (row_ptr[nb + 1], col_idx[kept]) and
// their weights transposed and scaled by the mask value: for kept tile p = (i, j), the value
// mask[i, j] * w[i*t + nn, j*t + kk] goes to packed[p][kk][nn] (format 0, fp32) or to
// packed[p][kk / 2][nn][kk % 2] (format 1, bf16 pairs, rounded to the nearest bf16), rows padded
// from t to tp columns (a multiple of 16) with zeros, as is whatever lies past N or K (and the
// odd element of the last pair when t is odd). `w` is fp32, or bf16 bits with w_bf16. Strides
// are in elements, so transposed views (the input gradient's W^T) need no copy. With
// `round_bf16` the fp32 format's values are rounded to bf16 too: the fp32 master weight of a
// layer that runs in bf16 under autocast, rounded where eager autocast rounds it, kept tiles
// only. Returns the number of kept tiles, or -1 if there are more than `capacity`.
int64_t sc_pack_kept_tiles(const void* w, int32_t w_bf16, int64_t n, int64_t k, int64_t w_s0, int64_t w_s1,
                           const float* mask, int64_t nb, int64_t kb, int64_t mask_s0, int64_t mask_s1, int64_t t,
                           int64_t tp, int64_t capacity, int32_t format, int32_t round_bf16, int32_t* row_ptr,
                           int32_t* col_idx, void* packed) {
  if (w_bf16)
    return pack_kept_tiles((const uint16_t*)w, n, k, w_s0, w_s1, mask, nb, kb, mask_s0, mask_s1, t, tp, capacity,
                           format, round_bf16, row_ptr, col_idx, packed);
  return pack_kept_tiles((const float*)w, n, k, w_s0, w_s1, mask, nb, kb, mask_s0, mask_s1, t, tp, capacity, format,
                         round_bf16, row_ptr, col_idx, packed);
}

// BSR blocks into the same packed layouts: values[p] is block p of W ([t rows of W][t columns],
// row-major, as torch's BSR values; fp32, or bf16 bits with values_bf16). The BSR op's crow/col
// indices are the kernel's row_ptr/col_idx as they are.
void sc_pack_bsr_blocks(const void* values, int32_t values_bf16, int64_t blocks, int64_t t, int64_t tp,
                        int32_t format, void* packed) {
  if (values_bf16)
    pack_bsr_blocks((const uint16_t*)values, blocks, t, tp, format, packed);
  else
    pack_bsr_blocks((const float*)values, blocks, t, tp, format, packed);
}

// out (row stride ldo) from a [m, k] (row stride lda, unit column stride) and the packed kept
// tiles, on `threads` OpenMP threads. Every output element is written (the bias or zero where a
// block row keeps no tile). `a` and `out` are fp32, or bf16 bits with a_bf16 / out_bf16; the
// bias is fp32. `activation` (0 none, 1 GELU (erf), 2 ReLU) is applied to each fp32 sum, bias
// included, before it is rounded and stored. Format 1 (bf16 pairs) needs a build with
// sc_native_bf16() and bf16 `a` and `out`. Returns 0, or -1 for a combination this build cannot
// run (nothing written).
int32_t sc_tile_mm(const void* a, int32_t a_bf16, int64_t lda, int64_t m, const void* packed, int32_t format,
                   const int32_t* row_ptr, const int32_t* col_idx, int64_t nb, int64_t n, int64_t k, int64_t t,
                   int64_t tp, const float* bias, void* out, int32_t out_bf16, int64_t ldo, int threads,
                   int32_t activation) {
  if (activation < ACTIVATION_NONE || activation > ACTIVATION_RELU) return -1;
  if (format != PACKED_FP32 && !(SC_NATIVE_BF16 && format == PACKED_BF16_PAIRS && a_bf16 && out_bf16)) return -1;
  if (m <= 0) return 0;
#if SC_AMX
  // The AMX path: tile steps of 32 (or 16) K values must cover each kept tile exactly.
  const int64_t step = t % 32 == 0 ? 32 : 16;
  if (format == PACKED_BF16_PAIRS && t % 16 == 0 && k % t == 0 && m >= 16 && amx_enabled.load() && amx_permitted()) {
    amx_call_count.fetch_add(1, std::memory_order_relaxed);
    // One contiguous range of rows per thread, a multiple of 16 rows long (the last one shorter),
    // each cut into chunks of at most AMX_ROW_CHUNK rows kept in cache across the output tiles.
    // 64, not 128: the output is written column block by column block down a chunk's rows, and
    // a smaller chunk's lines stay nearer (DeiT-tiny's fc1, 394 x 768 bf16 out, 2 threads: 28 ->
    // 25 us a call, 23 -> 17 us where no tile is kept; 32 and 48 rows measured as 64).
    constexpr int64_t AMX_ROW_CHUNK = 64;
    const int64_t parts = threads > 1 ? threads : 1;
    int64_t part_rows = (m + parts - 1) / parts;
    part_rows = (part_rows + 15) / 16 * 16;
#pragma omp parallel num_threads(threads)
    {
      const TileConfig config = amx_config(step);
      _tile_loadconfig(&config);  // per thread: the tile configuration is a thread's state
      alignas(64) float scratch[32 * 32];
#pragma omp for schedule(static)
      for (int64_t part = 0; part < parts; part++) {
        const int64_t part_end = (part + 1) * part_rows < m ? (part + 1) * part_rows : m;
        for (int64_t begin = part * part_rows; begin < part_end; begin += AMX_ROW_CHUNK) {
          const int64_t end = begin + AMX_ROW_CHUNK < part_end ? begin + AMX_ROW_CHUNK : part_end;
          const int64_t tiled_end = begin + (end - begin) / 16 * 16;
          const uint16_t* a16 = (const uint16_t*)a;
          const uint16_t* p16 = (const uint16_t*)packed;
          if (tiled_end > begin)
            row_chunk_amx(a16, lda, p16, row_ptr, col_idx, nb, n, t, tp, step, bias, (uint16_t*)out, ldo, begin,
                          tiled_end, scratch, activation);
          if (end > tiled_end)  // fewer than 16 rows left: the vdpbf16ps path
            row_chunk_bf16(a16, lda, p16, row_ptr, col_idx, nb, n, k, t, tp, bias, (uint16_t*)out, ldo, tiled_end, end,
                           activation);
        }
      }
      _tile_release();
    }
    return 0;
  }
#endif
  // Chunks of at most ROW_CHUNK rows, of one size (a multiple of the register block's rows), as
  // many as a multiple of the threads: the static schedule then gives every thread the same rows.
  // Cut at ROW_CHUNK alone, DeiT's 394 rows gave one of two threads 288 rows and the other 106,
  // and 48 rows (2 x 24 tokens) ran on one thread.
  int64_t chunks = (m + ROW_CHUNK - 1) / ROW_CHUNK;
  if (threads > 1) chunks = (chunks + threads - 1) / threads * threads;
  int64_t chunk_rows = (m + chunks - 1) / chunks;
  chunk_rows = (chunk_rows + ROWS - 1) / ROWS * ROWS;
  chunks = (m + chunk_rows - 1) / chunk_rows;
#if SC_WIDE_FP32
  const bool wide = format == PACKED_FP32 && wide_fp32_enabled.load() != 0;
  if (wide) wide_fp32_call_count.fetch_add(1, std::memory_order_relaxed);
#else
  const bool wide = false;
#endif
#pragma omp parallel num_threads(threads)
  {
    // bf16 `a` on the fp32 path: each chunk's rows converted once into this thread's buffer
    // (converting in the inner loop repeated it for every 16 output columns: 3x slower at half
    // density than converting the whole tensor in torch first).
    float* a_fp32 = (a_bf16 && format == PACKED_FP32) ? new float[ROW_CHUNK * k] : nullptr;
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
      const int64_t begin = c * chunk_rows, end = (c + 1) * chunk_rows < m ? (c + 1) * chunk_rows : m;
      const float* fp = (const float*)packed;
#if SC_NATIVE_BF16
      if (format == PACKED_BF16_PAIRS) {
        row_chunk_bf16((const uint16_t*)a, lda, (const uint16_t*)packed, row_ptr, col_idx, nb, n, k, t, tp, bias,
                       (uint16_t*)out, ldo, begin, end, activation);
        continue;
      }
#endif
      if (a_fp32) {
        const uint16_t* a_rows = (const uint16_t*)a + begin * lda;
        for (int64_t r = 0; r < end - begin; r++)
          for (int64_t kk = 0; kk < k; kk++) a_fp32[r * k + kk] = bf16_to_float(a_rows[r * lda + kk]);
        // The buffer holds rows begin..end as rows 0..: the output pointer moves along.
        const int64_t rows = end - begin;
        if (out_bf16)
          fp32_row_chunk(a_fp32, k, fp, row_ptr, col_idx, nb, n, k, t, tp, bias, (uint16_t*)out + begin * ldo, ldo, 0,
                         rows, activation, wide);
        else
          fp32_row_chunk(a_fp32, k, fp, row_ptr, col_idx, nb, n, k, t, tp, bias, (float*)out + begin * ldo, ldo, 0, rows,
                         activation, wide);
      } else if (out_bf16) {
        fp32_row_chunk((const float*)a, lda, fp, row_ptr, col_idx, nb, n, k, t, tp, bias, (uint16_t*)out, ldo, begin,
                       end, activation, wide);
      } else {
        fp32_row_chunk((const float*)a, lda, fp, row_ptr, col_idx, nb, n, k, t, tp, bias, (float*)out, ldo, begin, end,
                       activation, wide);
      }
    }
    delete[] a_fp32;
  }
  return 0;
}

}  // extern "C"
