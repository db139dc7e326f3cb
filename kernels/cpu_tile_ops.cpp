// The CPU tile kernel (cpu_tile_mm.cpp) as torch operators, so that a compiled graph calls it the
// way it calls aten's own ops: through the dispatcher, with no Python in between (an Inductor
// wrapper's extern call, an AOTInductor package's proxy call). Built into one library with
// cpu_tile_mm.cpp by cpu_tile_mm.py and loaded with torch.ops.load_library; the ops' fake
// implementations (shapes for torch.compile and export) are registered from Python after loading.
//
//   sparse_compile::tile_linear(x, packed, row_ptr, col_idx, bias, out_features, in_features,
//                               tile_size, packed_format) -> Tensor
//       x [..., in_features] @ W^T + bias from W's kept tiles, packed once (at conversion time
//       for an inference layer: the graph holds `packed` as a constant). x fp32, bf16 or fp16
//       (fp16 computed in fp32); the result in x's dtype. Products accumulate in fp32.
//   sparse_compile::tile_pack_blocks(values [blocks, t, t], packed_format) -> packed
//       BSR values (fp32, bf16, or any float dtype, converted to fp32) into the kernel's layout.
//   sparse_compile::tile_pack_masked(weight [N, K], tile_mask [N/t, K/t], tile_size, kept,
//                                    packed_format, round_bf16) -> (packed, row_ptr, col_idx)
//       the kept tiles of weight ⊙ expand(tile_mask) (the masked op, every training step).
//
// Header choice: only the core tensor, empty and library headers (not torch/extension.h), so the
// library compiles in seconds on the machine that first uses it.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>
#include <pthread.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

extern "C" {
int32_t sc_native_bf16(void);
int32_t sc_native_amx(void);
int32_t sc_set_amx(int32_t enabled);
int64_t sc_amx_calls(void);
int32_t sc_native_wide_fp32(void);
int32_t sc_set_wide_fp32(int32_t enabled);
int64_t sc_wide_fp32_calls(void);
int64_t sc_pack_kept_tiles(const void* w, int32_t w_bf16, int64_t n, int64_t k, int64_t w_s0, int64_t w_s1,
                           const float* mask, int64_t nb, int64_t kb, int64_t mask_s0, int64_t mask_s1, int64_t t,
                           int64_t tp, int64_t capacity, int32_t format, int32_t round_bf16, int32_t* row_ptr,
                           int32_t* col_idx, void* packed);
void sc_pack_bsr_blocks(const void* values, int32_t values_bf16, int64_t blocks, int64_t t, int64_t tp,
                        int32_t format, void* packed);
int32_t sc_tile_mm(const void* a, int32_t a_bf16, int64_t lda, int64_t m, const void* packed, int32_t format,
                   const int32_t* row_ptr, const int32_t* col_idx, int64_t nb, int64_t n, int64_t k, int64_t t,
                   int64_t tp, const float* bias, void* out, int32_t out_bf16, int64_t ldo, int threads,
                   int32_t activation);
}

namespace {

constexpr int64_t PACKED_FP32 = 0;
constexpr int64_t PACKED_BF16_PAIRS = 1;
constexpr int64_t PACKED_COLUMNS = 16;  // the kernel's register block: packed rows padded to this

// GNU OpenMP cannot start a parallel region in the child of a fork of a process that used one
// (a DataLoader worker): there the kernel runs on the calling thread only.
bool in_forked_child = false;
void note_fork() { in_forked_child = true; }
const int fork_handler_registered = pthread_atfork(nullptr, nullptr, note_fork);

// Calls of tile_linear in this process (tile_linear_calls()): how tests and users see that a compiled
// graph ran the sparse kernel, where Python counters cannot count (no Python on this path).
std::atomic<int64_t> tile_linear_call_count{0};

// The `activation` argument of tile_linear, as the kernel's code (cpu_tile_mm.cpp: ACTIVATION_*).
int32_t activation_code(c10::string_view activation) {
  if (activation == "none") return 0;
  if (activation == "gelu") return 1;
  if (activation == "relu") return 2;
  TORCH_CHECK(false, "tile_linear: activation must be \"none\", \"gelu\" (exact, erf) or \"relu\", got \"",
              std::string(activation), "\"");
}

int64_t padded(int64_t t) { return (t + PACKED_COLUMNS - 1) / PACKED_COLUMNS * PACKED_COLUMNS; }

void check_format(int64_t format, const char* op) {
  TORCH_CHECK(format == PACKED_FP32 || format == PACKED_BF16_PAIRS, op, ": packed_format must be 0 (fp32) or 1 (bf16 pairs), got ",
              format);
  TORCH_CHECK(format == PACKED_FP32 || sc_native_bf16(), op,
              ": packed_format 1 (bf16 pairs) needs the CPU's bf16 dot products (AVX-512 BF16), which this build "
              "of the tile kernel does not have; use packed_format 0");
}

at::Tensor empty_packed(int64_t tiles, int64_t t, int64_t format) {
  const int64_t count = tiles > 1 ? tiles : 1;
  if (format == PACKED_FP32) return at::empty({count, t, padded(t)}, at::TensorOptions().dtype(at::kFloat));
  return at::empty({count, (t + 1) / 2, padded(t), 2}, at::TensorOptions().dtype(at::kBFloat16));
}

// The packed tensor's shape for `tiles` tiles of t x t in `format`, as empty_packed makes it.
bool packed_shape_ok(const at::Tensor& packed, int64_t t, int64_t format) {
  if (format == PACKED_FP32)
    return packed.scalar_type() == at::kFloat && packed.dim() == 3 && packed.size(1) == t && packed.size(2) == padded(t);
  return packed.scalar_type() == at::kBFloat16 && packed.dim() == 4 && packed.size(1) == (t + 1) / 2 &&
         packed.size(2) == padded(t) && packed.size(3) == 2;
}

at::Tensor tile_pack_blocks(const at::Tensor& values, int64_t format) {
  check_format(format, "tile_pack_blocks");
  TORCH_CHECK(values.device().is_cpu(), "tile_pack_blocks: values must be a CPU tensor");
  TORCH_CHECK(values.dim() == 3 && values.size(1) == values.size(2), "tile_pack_blocks: values must be [blocks, t, t], got ",
              values.sizes());
  TORCH_CHECK(at::isFloatingType(values.scalar_type()), "tile_pack_blocks: values must be floating point, got ",
              values.scalar_type());
  const bool bf16 = values.scalar_type() == at::kBFloat16;
  const at::Tensor source = (bf16 || values.scalar_type() == at::kFloat ? values : values.to(at::kFloat)).contiguous();
  const int64_t blocks = values.size(0), t = values.size(1);
  at::Tensor packed = empty_packed(blocks, t, format);
  sc_pack_bsr_blocks(source.data_ptr(), bf16, blocks, t, padded(t), (int32_t)format, packed.data_ptr());
  return packed;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tile_pack_masked(const at::Tensor& weight, const at::Tensor& tile_mask,
                                                                int64_t tile_size, int64_t kept, int64_t format,
                                                                bool round_bf16) {
  check_format(format, "tile_pack_masked");
  TORCH_CHECK(weight.device().is_cpu() && tile_mask.device().is_cpu(), "tile_pack_masked: CPU tensors only");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16,
              "tile_pack_masked: weight must be float32 or bfloat16, got ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && tile_mask.dim() == 2, "tile_pack_masked: weight and tile_mask must be 2-D");
  TORCH_CHECK(tile_size > 0 && kept >= 0, "tile_pack_masked: tile_size must be positive and kept non-negative");
  const int64_t n = weight.size(0), k = weight.size(1), nb = tile_mask.size(0), kb = tile_mask.size(1);
  TORCH_CHECK(nb == (n + tile_size - 1) / tile_size && kb == (k + tile_size - 1) / tile_size, "tile_pack_masked: tile_mask ",
              tile_mask.sizes(), " does not tile a weight ", weight.sizes(), " at tile size ", tile_size);
  // Strides in elements: transposed views (the input gradient's W^T) are read as they are.
  const at::Tensor mask = tile_mask.scalar_type() == at::kFloat ? tile_mask : tile_mask.to(at::kFloat);
  at::Tensor row_ptr = at::empty({nb + 1}, at::TensorOptions().dtype(at::kInt));
  at::Tensor col_idx = at::empty({kept > 1 ? kept : 1}, at::TensorOptions().dtype(at::kInt));
  at::Tensor packed = empty_packed(kept, tile_size, format);
  const int64_t found = sc_pack_kept_tiles(
      weight.data_ptr(), weight.scalar_type() == at::kBFloat16, n, k, weight.stride(0), weight.stride(1),
      mask.data_ptr<float>(), nb, kb, mask.stride(0), mask.stride(1), tile_size, padded(tile_size), kept,
      (int32_t)format, round_bf16, row_ptr.data_ptr<int32_t>(), col_idx.data_ptr<int32_t>(), packed.data_ptr());
  TORCH_CHECK(found == kept, "tile_pack_masked: the mask has ", found < 0 ? "more than " : "", found < 0 ? kept : found,
              " kept tiles, expected ", kept);
  return {packed, row_ptr, col_idx};
}

at::Tensor tile_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                       const std::optional<at::Tensor>& bias, int64_t out_features, int64_t in_features, int64_t tile_size,
                       int64_t format, c10::string_view activation) {
  check_format(format, "tile_linear");
  const int32_t activation_id = activation_code(activation);
  tile_linear_call_count.fetch_add(1, std::memory_order_relaxed);
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "tile_linear: x must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "tile_linear: x has ", x.dim() ? x.size(-1) : 0,
              " features in its last dim, the weight expects in_features=", in_features);
  TORCH_CHECK(tile_size > 0 && out_features >= 0, "tile_linear: tile_size must be positive, out_features non-negative");
  const int64_t nb = (out_features + tile_size - 1) / tile_size;
  TORCH_CHECK(row_ptr.scalar_type() == at::kInt && col_idx.scalar_type() == at::kInt && row_ptr.dim() == 1 &&
                  col_idx.dim() == 1 && row_ptr.is_contiguous() && col_idx.is_contiguous(),
              "tile_linear: row_ptr and col_idx must be contiguous 1-D int32 tensors");
  TORCH_CHECK(row_ptr.size(0) == nb + 1, "tile_linear: out_features=", out_features, " at tile size ", tile_size, " needs ",
              nb + 1, " row pointers, got ", row_ptr.size(0));
  TORCH_CHECK(packed_shape_ok(packed, tile_size, format) && packed.is_contiguous(), "tile_linear: packed ", packed.sizes(),
              " ", packed.scalar_type(), " is not the packed layout ", format, " of ", tile_size, "x", tile_size,
              " tiles (tile_pack_blocks makes it)");
  TORCH_CHECK(format == PACKED_FP32 || dtype == at::kBFloat16, "tile_linear: packed_format 1 (bf16 pairs) needs bfloat16 x, got ",
              dtype);
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == out_features), "tile_linear: bias must be [",
              out_features, "]");
  for (const at::Tensor* t : {&x, &packed, &row_ptr, &col_idx})
    TORCH_CHECK(t->device().is_cpu(), "tile_linear: CPU tensors only (the CUDA path is sparse_compile::bsr_linear)");

  // A 2-D x (what a compiled graph passes) is read as it is: no view made and dropped per call.
  at::Tensor a = x.dim() == 2 ? x : x.reshape({-1, in_features});
  if (dtype == at::kHalf) a = a.to(at::kFloat);  // no half arithmetic in the kernel: fp32, rounded back at the end
  if (a.stride(1) != 1) a = a.contiguous();
  const bool bf16 = a.scalar_type() == at::kBFloat16;
  const int64_t m = a.size(0);
  at::Tensor bias_fp32;
  // The backend stores a constant bias in fp32 (ConvertedWeight.bias_dtype): then nothing to do.
  if (bias.has_value())
    bias_fp32 = bias->scalar_type() == at::kFloat && bias->is_contiguous() ? *bias : bias->to(at::kFloat).contiguous();
  at::Tensor out = at::empty({m, out_features}, a.options());
  if (m > 0 && out_features > 0) {
    const int32_t status = sc_tile_mm(
        a.data_ptr(), bf16, a.stride(0), m, packed.data_ptr(), (int32_t)format, row_ptr.data_ptr<int32_t>(),
        col_idx.data_ptr<int32_t>(), nb, out_features, in_features, tile_size, padded(tile_size),
        bias.has_value() ? bias_fp32.data_ptr<float>() : nullptr, out.data_ptr(), bf16, out.stride(0),
        in_forked_child ? 1 : at::get_num_threads(), activation_id);
    TORCH_CHECK(status == 0, "tile_linear: this build of the tile kernel cannot run packed layout ", format, " with ", dtype);
  }
  if (dtype == at::kHalf) out = out.to(at::kHalf);
  if (x.dim() == 2) return out;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return out.view(shape);
}

bool tile_native_bf16() { return sc_native_bf16() != 0; }

bool tile_native_amx() { return sc_native_amx() != 0; }

bool tile_set_amx(bool enabled) { return sc_set_amx(enabled ? 1 : 0) != 0; }

int64_t tile_amx_calls() { return sc_amx_calls(); }

bool tile_native_wide_fp32() { return sc_native_wide_fp32() != 0; }

bool tile_set_wide_fp32(bool enabled) { return sc_set_wide_fp32(enabled ? 1 : 0) != 0; }

int64_t tile_wide_fp32_calls() { return sc_wide_fp32_calls(); }

int64_t tile_linear_calls() { return tile_linear_call_count.load(std::memory_order_relaxed); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparse_compile, m) {
  m.def(
      "tile_linear(Tensor x, Tensor packed, Tensor row_ptr, Tensor col_idx, Tensor? bias, int out_features, "
      "int in_features, int tile_size, int packed_format, str activation=\"none\") -> Tensor");
  m.def("tile_pack_blocks(Tensor values, int packed_format) -> Tensor");
  m.def(
      "tile_pack_masked(Tensor weight, Tensor tile_mask, int tile_size, int kept, int packed_format, bool round_bf16) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("tile_native_bf16() -> bool", &tile_native_bf16);
  m.def("tile_native_amx() -> bool", &tile_native_amx);
  m.def("tile_set_amx(bool enabled) -> bool", &tile_set_amx);
  m.def("tile_amx_calls() -> int", &tile_amx_calls);
  m.def("tile_native_wide_fp32() -> bool", &tile_native_wide_fp32);
  m.def("tile_set_wide_fp32(bool enabled) -> bool", &tile_set_wide_fp32);
  m.def("tile_wide_fp32_calls() -> int", &tile_wide_fp32_calls);
  m.def("tile_linear_calls() -> int", &tile_linear_calls);
}

TORCH_LIBRARY_IMPL(sparse_compile, CPU, m) {
  m.impl("tile_linear", &tile_linear);
  m.impl("tile_pack_blocks", &tile_pack_blocks);
  m.impl("tile_pack_masked", &tile_pack_masked);
}
