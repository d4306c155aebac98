// Fused ReLU + channel-weighted squared feature-map distance, CPU (C++17, OpenMP).
//
//   loss_b = 0.5 * sum_{j, p} scale_j * (relu(t_bjp) - relu(s_bjp))^2      (per sample b)
//   grad_t = grad_out_b * scale_j * (relu(t) - relu(s)) * (t > 0)           (relu=false: t - s, no mask)
//
// t, s: (B, C, H, W) float / double / bfloat16 / half, both contiguous NCHW or both channels_last
// (the Python side makes them so; a dense tensor is never copied). scale: (C,) float32.
// Accumulation: per-element arithmetic in float (double for double inputs), sums in double.
// Deterministic: the work is cut into fixed chunks independent of the thread count, each chunk
// is summed in a fixed order, and the chunk partials are added serially, so the same inputs give
// a bit-identical loss. NaN propagates (relu(x) = x < 0 ? 0 : x keeps NaN, as torch.relu does).
//
// Registered as torch.ops.fastdelta_native.fm_distance_fwd / fm_distance_bwd.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

template <typename T> using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// std::max(x, 0) = (x < 0) ? 0 : x keeps a NaN x (as torch.relu does). These selects vectorise only with
// -fno-trapping-math (CMakeLists.txt); without it GCC kept a branch: ~18x slower on random signs.
template <typename A> inline A relu_nan(A x) { return std::max(x, A(0)); }

// float -> T for the gradient store. c10::BFloat16(float) rounds with a branch per element (NaN test),
// which keeps the loop scalar; this is the same round-to-nearest-even, branch-free (vectorises).
template <typename T, typename A> inline T to_out(A x) { return T(x); }
template <> inline c10::BFloat16 to_out<c10::BFloat16, float>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint16_t bits = (u & 0x7fffffffu) > 0x7f800000u ? uint16_t(0x7fc0) : uint16_t(rounded);  // NaN stays NaN
  return c10::BFloat16(bits, c10::BFloat16::from_bits());
}

// d loss / d t for one element, already weighted by w = grad_out * scale_c: w * (relu(t) - relu(s)) * (t > 0),
// or w * (t - s) without the ReLU. relu'(t) = (t > 0); a NaN t keeps its NaN gradient, as in torch.
template <typename A> inline A grad_at(A x, A z, A w, bool relu) {
  if (!relu) return w * (x - z);
  return x <= A(0) ? A(0) : w * (relu_nan(x) - relu_nan(z));
}

enum class Layout { NCHW, NHWC };

Layout layout_of(const at::Tensor& t, const at::Tensor& s) {
  if (t.is_contiguous() && s.is_contiguous()) return Layout::NCHW;
  if (t.is_contiguous(at::MemoryFormat::ChannelsLast) && s.is_contiguous(at::MemoryFormat::ChannelsLast))
    return Layout::NHWC;
  TORCH_CHECK(false, "fm_distance (native): t and s must both be contiguous NCHW or both channels_last");
}

void check(const at::Tensor& t, const at::Tensor& s, const at::Tensor& scale) {
  TORCH_CHECK(t.dim() == 4, "fm_distance (native): expected 4-D feature maps, got ", t.dim(), "-D");
  TORCH_CHECK(t.sizes() == s.sizes(), "fm_distance (native): t and s shapes differ");
  TORCH_CHECK(t.scalar_type() == s.scalar_type(), "fm_distance (native): t and s dtypes differ");
  TORCH_CHECK(t.device().is_cpu() && s.device().is_cpu() && scale.device().is_cpu(), "fm_distance (native): CPU only");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.numel() == t.size(1) &&
                  scale.is_contiguous(),
              "fm_distance (native): scale must be a contiguous float32 vector of C values");
}

constexpr int64_t kRowsPerChunk = 64;  // NHWC: positions per chunk (fixed: determinism)

template <typename T>
at::Tensor fwd_impl(const at::Tensor& t, const at::Tensor& s, const at::Tensor& scale, bool relu) {
  using A = acc_t<T>;
  const int64_t B = t.size(0), C = t.size(1), P = t.size(2) * t.size(3);
  const T* tp = t.data_ptr<T>();
  const T* sp = s.data_ptr<T>();
  const float* wp = scale.data_ptr<float>();
  // per-sample losses: float32 (double for double inputs, as the PyTorch reference promotes)
  auto out = at::empty({B}, t.options().dtype(std::is_same_v<T, double> ? at::kDouble : at::kFloat));
  A* op = out.template data_ptr<A>();
  if (B == 0) return out;
  const Layout layout = layout_of(t, s);
  // chunks: NCHW -> one (b, c) plane each; NHWC -> kRowsPerChunk positions x C channels of one sample
  const int64_t per_sample = layout == Layout::NCHW ? C : (P + kRowsPerChunk - 1) / kRowsPerChunk;
  std::vector<double> partial(B * per_sample, 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < B * per_sample; ++k) {
    const int64_t b = k / per_sample, q = k % per_sample;
    double acc = 0.0;
    if (layout == Layout::NCHW) {
      const T* a = tp + (b * C + q) * P;
      const T* z = sp + (b * C + q) * P;
      if (relu) {
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < P; ++i) {
          const A d = relu_nan(A(a[i])) - relu_nan(A(z[i]));
          acc += double(d * d);
        }
      } else {
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < P; ++i) {
          const A d = A(a[i]) - A(z[i]);
          acc += double(d * d);
        }
      }
      acc *= double(wp[q]);
    } else {
      const int64_t p0 = q * kRowsPerChunk, p1 = std::min(P, p0 + kRowsPerChunk);
      for (int64_t p = p0; p < p1; ++p) {
        const T* a = tp + (b * P + p) * C;
        const T* z = sp + (b * P + p) * C;
        double row = 0.0;
        if (relu) {
#pragma omp simd reduction(+ : row)
          for (int64_t c = 0; c < C; ++c) {
            const A d = relu_nan(A(a[c])) - relu_nan(A(z[c]));
            row += double(wp[c]) * double(d * d);
          }
        } else {
#pragma omp simd reduction(+ : row)
          for (int64_t c = 0; c < C; ++c) {
            const A d = A(a[c]) - A(z[c]);
            row += double(wp[c]) * double(d * d);
          }
        }
        acc += row;
      }
    }
    partial[k] = acc;
  }
  for (int64_t b = 0; b < B; ++b) {  // fixed serial order
    double sum = 0.0;
    for (int64_t q = 0; q < per_sample; ++q) sum += partial[b * per_sample + q];
    op[b] = A(0.5 * sum);
  }
  return out;
}

template <typename T>
at::Tensor bwd_impl(const at::Tensor& grad_out, const at::Tensor& t, const at::Tensor& s, const at::Tensor& scale,
                    bool relu) {
  using A = acc_t<T>;
  const int64_t B = t.size(0), C = t.size(1), P = t.size(2) * t.size(3);
  const Layout layout = layout_of(t, s);
  auto grad = at::empty_like(t, layout == Layout::NCHW ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast);
  if (t.numel() == 0) return grad;
  // grad_out: a scalar (loss summed over the batch) or (B,) (per-sample losses)
  auto g = grad_out.to(at::kDouble).contiguous();
  TORCH_CHECK(g.numel() == 1 || g.numel() == B, "fm_distance (native): grad_out must have 1 or B elements");
  std::vector<A> gb(B);
  const double* gp = g.data_ptr<double>();
  for (int64_t b = 0; b < B; ++b) gb[b] = A(g.numel() == 1 ? gp[0] : gp[b]);
  const T* tp = t.data_ptr<T>();
  const T* sp = s.data_ptr<T>();
  const float* wp = scale.data_ptr<float>();
  T* out = grad.data_ptr<T>();
  if (layout == Layout::NCHW) {
#pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < B * C; ++k) {
      const int64_t b = k / C, c = k % C;
      const A w = gb[b] * A(wp[c]);
      const T* a = tp + k * P;
      const T* z = sp + k * P;
      T* o = out + k * P;
#pragma omp simd
      for (int64_t i = 0; i < P; ++i) o[i] = to_out<T>(grad_at(A(a[i]), A(z[i]), w, relu));
    }
  } else {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < B * P; ++r) {
      const A gr = gb[r / P];
      const T* a = tp + r * C;
      const T* z = sp + r * C;
      T* o = out + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) o[c] = to_out<T>(grad_at(A(a[c]), A(z[c]), gr * A(wp[c]), relu));
    }
  }
  return grad;
}

at::Tensor fm_distance_fwd(const at::Tensor& t, const at::Tensor& s, const at::Tensor& scale, bool relu) {
  check(t, s, scale);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "fm_distance_fwd",
                                  [&] { out = fwd_impl<scalar_t>(t, s, scale, relu); });
  return out;
}

at::Tensor fm_distance_bwd(const at::Tensor& grad_out, const at::Tensor& t, const at::Tensor& s,
                           const at::Tensor& scale, bool relu) {
  check(t, s, scale);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "fm_distance_bwd",
                                  [&] { out = bwd_impl<scalar_t>(grad_out, t, s, scale, relu); });
  return out;
}

}  // namespace

TORCH_LIBRARY(fastdelta_native, m) {
  m.def("fm_distance_fwd(Tensor t, Tensor s, Tensor scale, bool relu) -> Tensor");
  m.def("fm_distance_bwd(Tensor grad_out, Tensor t, Tensor s, Tensor scale, bool relu) -> Tensor");
  m.impl("fm_distance_fwd", c10::DispatchKey::CPU, TORCH_FN(fm_distance_fwd));
  m.impl("fm_distance_bwd", c10::DispatchKey::CPU, TORCH_FN(fm_distance_bwd));
}
