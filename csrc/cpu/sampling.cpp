// Top-k / temperature sampling of the next token for CPU, one row per task.
//
// Per row: temperature 0 is a vectorized argmax.  Otherwise the k-th largest logit is
// found without sorting (a size-k min-heap fed by a vectorized "anything above the heap's
// minimum?" scan for small k, nth_element for large k); every logit >= that value is kept
// (ties included, like the reference), weighted by exp((x - max) / T), and one token is
// drawn by inverse CDF with a uniform number drawn from the caller's torch.Generator.
//
// Non-finite rows: greedy rows follow torch.argmax (the first NaN wins, else the first
// maximum).  A sampled row (temperature > 0) whose logits hold a NaN or +inf, or are all
// -inf, has no defined distribution: the op raises, as torch.multinomial does on the
// torch path, instead of drawing from an empty survivor set.  A temperature so small
// that 1 / T overflows is greedy (the limit of the distribution), as in the GPU kernels.
#include "cpu_common.h"

#include <algorithm>
#include <functional>

namespace gptfast_cpu {
namespace {

constexpr int64_t kHeapMaxK = 256;  // above this, nth_element on a copy is cheaper than a heap

// torch.argmax of x[0..n): the first NaN if there is one, else the first maximum.
template <typename T>
int64_t argmax(const T* x, int64_t n) {
  const T mx = vec_max(x, n);  // NaN when the row holds one
  if (std::isnan(mx)) return first_nan(x, n);
  for (int64_t j = 0; j < n; ++j)
    if (x[j] == mx) return j;
  return 0;  // unreachable: mx is one of the values
}

// The k-th largest value of x[0..n) (counting repeats), 1 <= k <= n.
template <typename T>
T kth_largest(const T* x, int64_t n, int64_t k, std::vector<T>& scratch) {
  if (k > kHeapMaxK) {
    scratch.assign(x, x + n);
    std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<T>());
    return scratch[k - 1];
  }
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  constexpr int kNoneAbove = (1 << L) - 1;
  scratch.assign(x, x + k);  // min-heap of the k largest seen so far
  std::make_heap(scratch.begin(), scratch.end(), std::greater<T>());
  auto offer = [&](T value) {
    if (value > scratch.front()) {
      std::pop_heap(scratch.begin(), scratch.end(), std::greater<T>());
      scratch.back() = value;
      std::push_heap(scratch.begin(), scratch.end(), std::greater<T>());
    }
  };
  int64_t j = k;
  for (; j + L <= n; j += L) {
    // Most blocks hold nothing above the current k-th value: one compare rejects all lanes.
    const V block = V::loadu(x + j);
    if ((block > V(scratch.front())).zero_mask() == kNoneAbove) continue;
    for (int64_t u = 0; u < L; ++u) offer(x[j + u]);
  }
  for (; j < n; ++j) offer(x[j]);
  return scratch.front();
}

// Draws an index from weights w[0..n) (not normalised) given uniform u in [0, 1).
template <typename T>
int64_t draw_from(const T* w, int64_t n, double total, double u) {
  const double target = u * total;
  double cumulative = 0.0;
  int64_t last_positive = 0;
  for (int64_t j = 0; j < n; ++j) {
    if (w[j] <= T(0)) continue;
    cumulative += static_cast<double>(w[j]);
    last_positive = j;
    if (cumulative > target) return j;
  }
  return last_positive;  // rounding left the target just past the end
}

// Few survivors (small k): find the x >= threshold with a vectorized scan, weight only those.
template <typename T>
int64_t draw_among_survivors(const T* x, int64_t n, T threshold, T mx, T inv_t, double u, std::vector<T>& weights) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  constexpr int kNoneKept = (1 << L) - 1;
  std::vector<int64_t> kept;
  kept.reserve(64);
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    if ((V::loadu(x + j) >= V(threshold)).zero_mask() == kNoneKept) continue;
    for (int64_t u_ = 0; u_ < L; ++u_)
      if (x[j + u_] >= threshold) kept.push_back(j + u_);
  }
  for (; j < n; ++j)
    if (x[j] >= threshold) kept.push_back(j);
  if (kept.empty()) return -1;  // cannot happen for a NaN-free row (its max is kept); the caller rejects -1
  weights.resize(kept.size());
  double total = 0.0;
  for (size_t i = 0; i < kept.size(); ++i) {
    weights[i] = std::exp((x[kept[i]] - mx) * inv_t);
    total += weights[i];
  }
  return kept[draw_from(weights.data(), static_cast<int64_t>(kept.size()), total, u)];
}

// Samples one row: keep x >= threshold, weights exp((x - max) / temperature).
template <typename T>
int64_t sample_row(const T* x, int64_t n, int64_t row, double temperature, int64_t top_k, double u,
                   std::vector<T>& scratch, std::vector<T>& weights) {
  if (temperature == 0.0) return argmax(x, n);
  const T mx = vec_max(x, n);
  // NaN, +inf or only -inf: softmax(x / T) is not a distribution (torch.multinomial raises).
  TORCH_CHECK(std::isfinite(mx), "gptfast_cpu sample_next_token: probability tensor contains either inf, nan or ",
              "element < 0: row ", row, " of logits ", std::isnan(mx) ? "holds NaN" : (mx > 0 ? "holds +inf" :
              "is all -inf"), " and temperature ", temperature, " > 0 asks for a draw");
  const T inv_t = static_cast<T>(1.0 / temperature);
  if (!std::isfinite(inv_t)) return argmax(x, n);  // 1 / T overflows: the draw's limit is the argmax
  const bool filter = top_k < n;  // top_k is in [1, n]: checked by the caller
  // x holds no NaN, so the threshold is a value of the row <= mx and the row's max always survives.
  T threshold = filter ? kth_largest(x, n, top_k, scratch) : neg_inf<T>();
  // T = +inf makes every weight exp((x - max) * 0) = 1, but a -inf logit's (-inf) * 0 is NaN.  The limit
  // of softmax(x / T) is uniform over the finite logits, so -inf logits are filtered out then.
  if (inv_t == T(0)) threshold = std::max(threshold, std::numeric_limits<T>::lowest());
  if (filter && top_k <= kHeapMaxK) return draw_among_survivors(x, n, threshold, mx, inv_t, u, weights);
  weights.resize(n);
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const V vmx(mx), vinv(inv_t), vthr(threshold), vzero(T(0));
  V vsum(T(0));
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    const V xv = V::loadu(x + j);
    const V w = V::blendv(vzero, ((xv - vmx) * vinv).exp_u20(), xv >= vthr);
    w.store(weights.data() + j);
    vsum = vsum + w;
  }
  double total = at::vec::vec_reduce_all<T>([](V a, V b) { return a + b; }, vsum);
  for (; j < n; ++j) {
    weights[j] = x[j] >= threshold ? std::exp((x[j] - mx) * inv_t) : T(0);
    total += weights[j];
  }
  return draw_from(weights.data(), n, total, u);
}

template <typename scalar_t>
void sample_impl(const at::Tensor& logits, double temperature, int64_t top_k, const at::Tensor* temperatures,
                 const at::Tensor* top_ks, const at::Tensor& uniforms, at::Tensor& tokens) {
  using T = acc_t<scalar_t>;
  const int64_t B = logits.size(0), n = logits.size(1);
  const scalar_t* x_all = logits.const_data_ptr<scalar_t>();
  const float* t_rows = temperatures != nullptr ? temperatures->const_data_ptr<float>() : nullptr;
  const int64_t* k_rows = top_ks != nullptr ? top_ks->const_data_ptr<int64_t>() : nullptr;
  const double* u_all = uniforms.const_data_ptr<double>();
  int64_t* out = tokens.data_ptr<int64_t>();
  // A row costs about one pass over V values: below ~1M values in all, a parallel region's
  // start-up and barrier (worse on a busy machine) cost more than they save.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / n);
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> widened, scratch, weights;
    for (int64_t r = begin; r < end; ++r) {
      const double temp = t_rows != nullptr ? static_cast<double>(t_rows[r]) : temperature;
      const int64_t k = k_rows != nullptr ? k_rows[r] : top_k;
      TORCH_CHECK(temp >= 0.0, "gptfast_cpu sample_next_token: temperature must be >= 0, got ", temp, " in row ", r);
      // n (the vocabulary) keeps every token; 0 is refused, as by the CUDA binding and the Python layer.
      TORCH_CHECK(k >= 1 && k <= n, "gptfast_cpu sample_next_token: top_k must be in [1, ", n, "], got ", k,
                  " in row ", r);
      const T* x;
      if constexpr (std::is_same_v<scalar_t, T>) {
        x = x_all + r * n;
      } else {
        widened.resize(n);
        for (int64_t j = 0; j < n; ++j) widened[j] = static_cast<T>(x_all[r * n + j]);
        x = widened.data();
      }
      const int64_t token = sample_row<T>(x, n, r, temp, k, u_all[r], scratch, weights);
      TORCH_CHECK(token >= 0 && token < n, "gptfast_cpu sample_next_token: internal error, token ", token,
                  " outside [0, ", n, ") in row ", r);
      out[r] = token;
    }
  });
}

}  // namespace

at::Tensor sample_next_token(const at::Tensor& logits_in, const c10::optional<at::Tensor>& temperature_in,
                             double temperature_value, const c10::optional<at::Tensor>& top_k_in,
                             int64_t top_k_value, c10::optional<at::Generator> generator) {
  TORCH_CHECK(logits_in.dim() == 2 && logits_in.size(1) > 0, "gptfast_cpu sample_next_token: logits must be (B, V)");
  TORCH_CHECK(logits_in.device().is_cpu(), "gptfast_cpu sample_next_token: logits must be on the CPU");
  const int64_t B = logits_in.size(0);
  const at::Tensor logits = logits_in.contiguous();
  at::Tensor temperatures, top_ks;
  if (temperature_in.has_value()) {
    TORCH_CHECK(temperature_in->dim() == 1 && temperature_in->size(0) == B &&
                    at::isFloatingType(temperature_in->scalar_type()) && temperature_in->device().is_cpu(),
                "gptfast_cpu sample_next_token: temperature must be a floating (", B, ",) CPU tensor, got ",
                temperature_in->scalar_type(), " ", temperature_in->sizes());
    temperatures = temperature_in->to(at::kFloat).contiguous();
  }
  if (top_k_in.has_value()) {
    // An integer type only: a float top_k would be truncated (0.2 to 0, "keep every token").
    TORCH_CHECK(top_k_in->dim() == 1 && top_k_in->size(0) == B &&
                    at::isIntegralType(top_k_in->scalar_type(), /*includeBool=*/false) && top_k_in->device().is_cpu(),
                "gptfast_cpu sample_next_token: top_k must be an integer (", B, ",) CPU tensor, got ",
                top_k_in->scalar_type(), " ", top_k_in->sizes());
    top_ks = top_k_in->to(at::kLong).contiguous();
  }
  // One uniform per row from the caller's generator; greedy decoding leaves it untouched, as torch does.
  const bool greedy = !temperature_in.has_value() && temperature_value == 0.0;
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor uniforms = greedy ? at::zeros({B}, f64) : at::rand({B}, generator, f64);
  at::Tensor tokens = at::empty({B, 1}, logits.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "gptfast_cpu_sample", [&] {
    sample_impl<scalar_t>(logits, temperature_value, top_k_value, temperature_in.has_value() ? &temperatures : nullptr,
                          top_k_in.has_value() ? &top_ks : nullptr, uniforms, tokens);
  });
  return tokens;
}

}  // namespace gptfast_cpu
