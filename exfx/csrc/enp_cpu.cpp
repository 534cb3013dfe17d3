// Native CPU kernels for early negative prediction (ENP) on linear sites, float32.
//
// exfx::enp_linear  fused `partial sum over the first k units -> early-exit test ->
//                   completion of the kept rows only` for a site relu(x @ W.T + b + r).
//                   The weight arrives relaid as two contiguous blocks: head [N, k*unit]
//                   (read for every row) and tail [N, (n-k)*unit] (read only for rows that
//                   some sample keeps), so a pruned row costs k units of weight traffic.
// exfx::sparse_input_linear  x @ W.T + b for an input that is a ReLU output: the weight
//                   arrives transposed (w_t = W.T, [in, out]) and every input unit that is
//                   exactly 0 is skipped (one AXPY of a w_t row per non-zero unit).
//
// Why the masks equal the reference ops' (exfx/ops/enp.py, `exit_statistic`, `cutoff`):
// the statistic is computed with the same float32 operations in the same order
// (mean = S/k, + (b + r)/n; z-test variance (Q - S*S/k) clamped at 0, / (k-1);
// z = mean / sqrt(var/k)), non-finite statistics are +inf (never pruned), and the cutoff is
// rounded to float32 exactly as torch rounds a Python scalar compared with a float32 tensor.
// Only the partial sums S and Q themselves are summed in a different order than the BLAS
// call of the reference, so a neuron whose statistic lies within rounding of the cutoff may
// be decided differently; with exactly representable sums the masks are bit-identical.
// The build must not use -ffast-math (it would break the isfinite tests) and uses
// -ffp-contract=off so that the statistic is not fused into FMAs behind our back.
//
// A kept neuron's output is (S + tail) + (b + r), the reference's order; a pruned one is 0.
//
// Per-call dispatch: with max_rows >= 0, a call of more than max_rows rows (the crossover the lowering
// measured at compile time) runs the dense site instead, F.linear(x, weight, bias) + residual, exactly the
// unpruned computation, and reports every neuron kept.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace exfx_native {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kWidth = Vec::size();

// ---------------------------------------------------------------------------
// Vector helpers
// ---------------------------------------------------------------------------

float horizontal_sum(const Vec& v) {
  float lanes[kWidth];
  v.store(lanes);
  float total = 0.f;
  for (int64_t i = 0; i < kWidth; ++i) {
    total += lanes[i];
  }
  return total;
}

// sum_i a[i] * b[i]; four accumulators for instruction-level parallelism, a zero-filled
// partial vector for the remainder (fan-ins that are not a multiple of the width).
float dot(const float* a, const float* b, int64_t len) {
  Vec acc0(0.f), acc1(0.f), acc2(0.f), acc3(0.f);
  int64_t i = 0;
  for (; i + 4 * kWidth <= len; i += 4 * kWidth) {
    acc0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc0);
    acc1 = at::vec::fmadd(Vec::loadu(a + i + kWidth), Vec::loadu(b + i + kWidth), acc1);
    acc2 = at::vec::fmadd(Vec::loadu(a + i + 2 * kWidth), Vec::loadu(b + i + 2 * kWidth), acc2);
    acc3 = at::vec::fmadd(Vec::loadu(a + i + 3 * kWidth), Vec::loadu(b + i + 3 * kWidth), acc3);
  }
  for (; i + kWidth <= len; i += kWidth) {
    acc0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc0);
  }
  if (i < len) {
    acc1 = at::vec::fmadd(Vec::loadu(a + i, len - i), Vec::loadu(b + i, len - i), acc1);
  }
  return horizontal_sum((acc0 + acc1) + (acc2 + acc3));
}

// The dots of four weight rows with one x: four independent weight streams, x loaded once.
void dot4(const float* const* w, const float* x, int64_t len, float* result) {
  Vec acc0(0.f), acc1(0.f), acc2(0.f), acc3(0.f);
  int64_t i = 0;
  for (; i + kWidth <= len; i += kWidth) {
    const Vec xv = Vec::loadu(x + i);
    acc0 = at::vec::fmadd(Vec::loadu(w[0] + i), xv, acc0);
    acc1 = at::vec::fmadd(Vec::loadu(w[1] + i), xv, acc1);
    acc2 = at::vec::fmadd(Vec::loadu(w[2] + i), xv, acc2);
    acc3 = at::vec::fmadd(Vec::loadu(w[3] + i), xv, acc3);
  }
  if (i < len) {
    const Vec xv = Vec::loadu(x + i, len - i);
    acc0 = at::vec::fmadd(Vec::loadu(w[0] + i, len - i), xv, acc0);
    acc1 = at::vec::fmadd(Vec::loadu(w[1] + i, len - i), xv, acc1);
    acc2 = at::vec::fmadd(Vec::loadu(w[2] + i, len - i), xv, acc2);
    acc3 = at::vec::fmadd(Vec::loadu(w[3] + i, len - i), xv, acc3);
  }
  result[0] = horizontal_sum(acc0);
  result[1] = horizontal_sum(acc1);
  result[2] = horizontal_sum(acc2);
  result[3] = horizontal_sum(acc3);
}

// y[i] += a[0] * r0[i] + a[1] * r1[i] + a[2] * r2[i] + a[3] * r3[i] for i < len: four input units per
// pass over y, so y is loaded and stored once per four weight rows.
void axpy4(const float* a, const float* r0, const float* r1, const float* r2, const float* r3, float* y,
           int64_t len) {
  const Vec a0(a[0]), a1(a[1]), a2(a[2]), a3(a[3]);
  int64_t i = 0;
  for (; i + kWidth <= len; i += kWidth) {
    Vec acc = Vec::loadu(y + i);
    acc = at::vec::fmadd(a0, Vec::loadu(r0 + i), acc);
    acc = at::vec::fmadd(a1, Vec::loadu(r1 + i), acc);
    acc = at::vec::fmadd(a2, Vec::loadu(r2 + i), acc);
    acc = at::vec::fmadd(a3, Vec::loadu(r3 + i), acc);
    acc.store(y + i);
  }
  for (; i < len; ++i) {
    y[i] = (((y[i] + a[0] * r0[i]) + a[1] * r1[i]) + a[2] * r2[i]) + a[3] * r3[i];
  }
}

// ---------------------------------------------------------------------------
// The early-exit statistic
// ---------------------------------------------------------------------------

struct Sums {
  float sum;     // S_k: sum of the sampled per-unit terms
  float square;  // Q_k: sum of their squares (z-test only)
};

// Per-unit terms w[u] * x[u] (unit == 1): their sum and sum of squares in one pass.
Sums dot_with_squares(const float* w, const float* x, int64_t len) {
  Vec s0(0.f), s1(0.f), q0(0.f), q1(0.f);
  int64_t i = 0;
  for (; i + 2 * kWidth <= len; i += 2 * kWidth) {
    const Vec t0 = Vec::loadu(w + i) * Vec::loadu(x + i);
    const Vec t1 = Vec::loadu(w + i + kWidth) * Vec::loadu(x + i + kWidth);
    s0 = s0 + t0;
    s1 = s1 + t1;
    q0 = at::vec::fmadd(t0, t0, q0);
    q1 = at::vec::fmadd(t1, t1, q1);
  }
  for (; i + kWidth <= len; i += kWidth) {
    const Vec t = Vec::loadu(w + i) * Vec::loadu(x + i);
    s0 = s0 + t;
    q0 = at::vec::fmadd(t, t, q0);
  }
  if (i < len) {  // zero-filled lanes add 0 to both sums
    const Vec t = Vec::loadu(w + i, len - i) * Vec::loadu(x + i, len - i);
    s1 = s1 + t;
    q1 = at::vec::fmadd(t, t, q1);
  }
  return {horizontal_sum(s0 + s1), horizontal_sum(q0 + q1)};
}

// The sampled sums of one (sample, row): `count` units of `unit` consecutive features each.
Sums head_sums(const float* w, const float* x, int64_t count, int64_t unit, bool moments) {
  if (!moments) {
    return {dot(w, x, count * unit), 0.f};
  }
  if (unit == 1) {
    return dot_with_squares(w, x, count);
  }
  float sum = 0.f;
  float square = 0.f;
  for (int64_t u = 0; u < count; ++u) {
    const float term = dot(w + u * unit, x + u * unit, unit);
    sum += term;
    square += term * term;
  }
  return {sum, square};
}

enum class Rule { kThreshold, kZTest };

struct ExitTest {
  Rule rule;
  int64_t count;    // k: sampled units
  int64_t n_units;  // n: fan-in in units
  float cutoff;     // prune when the statistic is below this
};

// Mirrors exfx.ops.enp.exit_statistic (float32), then `~(statistic < cutoff)`.
bool keeps(const ExitTest& test, const Sums& sums, bool has_shift, float shift) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const float k = static_cast<float>(test.count);
  float mean = sums.sum / k;
  if (has_shift) {
    mean = mean + shift / static_cast<float>(test.n_units);
  }
  float statistic;
  if (test.rule == Rule::kThreshold) {
    statistic = std::isfinite(mean) ? mean : kInf;
  } else {
    float variance = sums.square - sums.sum * sums.sum / k;
    if (variance < 0.f) {  // clamp_min(0); a NaN stays NaN
      variance = 0.f;
    }
    variance = variance / static_cast<float>(test.count - 1);
    const float z = mean / std::sqrt(variance / k);
    const bool finite = std::isfinite(mean) && std::isfinite(variance);
    statistic = (finite && !std::isnan(z)) ? z : kInf;
  }
  return !(statistic < test.cutoff);
}

// ---------------------------------------------------------------------------
// exfx::enp_linear
// ---------------------------------------------------------------------------

struct EnpProblem {
  const float* x;         // [rows, features], contiguous
  const float* head;      // [out, count * unit]
  const float* tail;      // [out, features - count * unit]
  const float* bias;      // [out] or nullptr
  const float* residual;  // [rows, out] or nullptr
  float* out;             // [rows, out]
  bool* keep;             // [rows, out]
  int64_t rows;
  int64_t out_features;
  int64_t features;
  int64_t unit;
  bool relu;
  ExitTest test;
};

float shift_of(const EnpProblem& p, int64_t row, int64_t j) {
  // bias + residual in the reference's order (`shift = bias; shift = shift + residual`).
  if (p.bias != nullptr && p.residual != nullptr) {
    return p.bias[j] + p.residual[row * p.out_features + j];
  }
  if (p.bias != nullptr) {
    return p.bias[j];
  }
  return p.residual != nullptr ? p.residual[row * p.out_features + j] : 0.f;
}

// One output neuron j for every sample: head, test, then the tail only where kept.
void enp_neuron(const EnpProblem& p, int64_t j) {
  const int64_t head_len = p.test.count * p.unit;
  const int64_t tail_len = p.features - head_len;
  const bool has_shift = p.bias != nullptr || p.residual != nullptr;
  const bool moments = p.test.rule == Rule::kZTest;
  const float* w_head = p.head + j * head_len;
  const float* w_tail = p.tail + j * tail_len;
  for (int64_t row = 0; row < p.rows; ++row) {
    const float* x_row = p.x + row * p.features;
    const int64_t at = row * p.out_features + j;
    const Sums sums = head_sums(w_head, x_row, p.test.count, p.unit, moments);
    const float shift = shift_of(p, row, j);
    const bool kept = keeps(p.test, sums, has_shift, shift);
    p.keep[at] = kept;
    if (!kept) {
      p.out[at] = 0.f;
      continue;
    }
    float total = sums.sum;
    if (tail_len > 0) {
      total = total + dot(w_tail, x_row + head_len, tail_len);
    }
    if (has_shift) {
      total = total + shift;
    }
    p.out[at] = (p.relu && total < 0.f) ? 0.f : total;
  }
}

// Batch 1: the heads and tests of a tile of neurons first, then the tails of the kept ones four
// at a time (four concurrent weight streams keep more memory requests in flight).
void enp_tile_single_row(const EnpProblem& p, int64_t begin, int64_t end) {
  constexpr int64_t kTile = 64;
  const int64_t head_len = p.test.count * p.unit;
  const int64_t tail_len = p.features - head_len;
  const bool has_shift = p.bias != nullptr || p.residual != nullptr;
  const bool moments = p.test.rule == Rule::kZTest;
  int64_t kept[kTile];
  float partial[kTile];
  float shifts[kTile];
  for (int64_t t0 = begin; t0 < end; t0 += kTile) {
    const int64_t t1 = std::min(end, t0 + kTile);
    int64_t n_kept = 0;
    for (int64_t j = t0; j < t1; ++j) {
      const Sums sums = head_sums(p.head + j * head_len, p.x, p.test.count, p.unit, moments);
      const float shift = shift_of(p, 0, j);
      const bool keep = keeps(p.test, sums, has_shift, shift);
      p.keep[j] = keep;
      p.out[j] = 0.f;
      if (keep) {
        kept[n_kept] = j;
        partial[n_kept] = sums.sum;
        shifts[n_kept] = shift;
        ++n_kept;
      }
    }
    float rest[4] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t i = 0; i < n_kept; i += 4) {
      const int64_t group = std::min<int64_t>(4, n_kept - i);
      if (tail_len > 0) {
        if (group == 4) {
          const float* rows[4] = {p.tail + kept[i] * tail_len, p.tail + kept[i + 1] * tail_len,
                                  p.tail + kept[i + 2] * tail_len, p.tail + kept[i + 3] * tail_len};
          dot4(rows, p.x + head_len, tail_len, rest);
        } else {
          for (int64_t s = 0; s < group; ++s) {
            rest[s] = dot(p.tail + kept[i + s] * tail_len, p.x + head_len, tail_len);
          }
        }
      }
      for (int64_t s = 0; s < group; ++s) {
        float total = partial[i + s];
        if (tail_len > 0) {
          total = total + rest[s];
        }
        if (has_shift) {
          total = total + shifts[i + s];
        }
        p.out[kept[i + s]] = (p.relu && total < 0.f) ? 0.f : total;
      }
    }
  }
}

Rule parse_rule(const std::string& rule) {
  if (rule == "threshold") {
    return Rule::kThreshold;
  }
  TORCH_CHECK(rule == "ztest", "exfx::enp_linear: unknown rule '", rule, "'; expected 'threshold' or 'ztest'");
  return Rule::kZTest;
}

void check_float_cpu(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "exfx::enp native kernels: ", what, " is on ", t.device(),
              "; these kernels run on CPU only");
  TORCH_CHECK(t.scalar_type() == at::kFloat, "exfx::enp native kernels: ", what, " is ", t.scalar_type(),
              "; these kernels take float32 (use exfx.ops.native's Python functions for other dtypes)");
}

std::vector<int64_t> output_shape(const at::Tensor& x, int64_t out_features) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return shape;
}

// The site computed densely: F.linear(x, W, b) (+ residual) (then ReLU), exactly the unpruned site, with every
// neuron kept. What enp_linear runs for a call of more rows than its measured crossover.
std::tuple<at::Tensor, at::Tensor> dense_site(const at::Tensor& x, const at::Tensor& weight,
                                              const std::optional<at::Tensor>& bias,
                                              const std::optional<at::Tensor>& residual, bool relu) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(-1), "exfx::enp_linear: weight is ", weight.sizes(),
              " but x has ", x.size(-1), " features");
  at::Tensor pre = at::linear(x, weight, bias);
  if (residual.has_value()) {
    pre = pre + *residual;
  }
  if (relu) {
    pre = at::relu(pre);
  }
  return {pre, at::ones(pre.sizes(), x.options().dtype(at::kBool))};
}

std::tuple<at::Tensor, at::Tensor> enp_linear(const at::Tensor& x, const at::Tensor& head, const at::Tensor& tail,
                                              const std::optional<at::Tensor>& bias,
                                              const std::optional<at::Tensor>& residual, int64_t count,
                                              int64_t n_units, c10::string_view rule, double cutoff, bool relu,
                                              const std::optional<at::Tensor>& weight, int64_t max_rows) {
  check_float_cpu(x, "x");
  if (max_rows >= 0 && x.dim() >= 1 && x.size(-1) > 0 && x.numel() / x.size(-1) > max_rows) {
    // Per-call dispatch: past the crossover measured at compile time, dense is faster.
    TORCH_CHECK(weight.has_value(), "exfx::enp_linear: max_rows=", max_rows, " needs the dense weight");
    check_float_cpu(*weight, "weight");
    return dense_site(x, *weight, bias, residual, relu);
  }
  check_float_cpu(head, "head");
  check_float_cpu(tail, "tail");
  TORCH_CHECK(x.dim() >= 1, "exfx::enp_linear: x must have a feature axis");
  TORCH_CHECK(head.dim() == 2 && tail.dim() == 2 && head.size(0) == tail.size(0),
              "exfx::enp_linear: head and tail must be [out, *] blocks with the same rows (use relayout)");
  const int64_t features = x.size(-1);
  TORCH_CHECK(n_units >= 1 && features % n_units == 0, "exfx::enp_linear: ", features,
              " input features are not a multiple of n_units=", n_units);
  const int64_t unit = features / n_units;
  TORCH_CHECK(count >= 1 && count <= n_units, "exfx::enp_linear: count=", count, " must be in [1, n_units=",
              n_units, "]");
  TORCH_CHECK(head.size(1) == count * unit && tail.size(1) == features - count * unit,
              "exfx::enp_linear: head/tail widths ", head.size(1), "/", tail.size(1), " do not split ", features,
              " features at unit ", count, " (relayout the weight with the same count)");
  const int64_t out_features = head.size(0);
  const int64_t rows = features == 0 ? 0 : x.numel() / features;
  const auto shape = output_shape(x, out_features);

  const at::Tensor xc = x.reshape({rows, features}).contiguous();
  const at::Tensor hc = head.contiguous();
  const at::Tensor tc = tail.contiguous();
  at::Tensor bc;
  if (bias.has_value()) {
    check_float_cpu(*bias, "bias");
    TORCH_CHECK(bias->numel() == out_features, "exfx::enp_linear: bias has ", bias->numel(),
                " entries for ", out_features, " outputs");
    bc = bias->reshape({out_features}).contiguous();
  }
  at::Tensor rc;
  if (residual.has_value()) {
    check_float_cpu(*residual, "residual");
    rc = residual->expand(shape).reshape({rows, out_features}).contiguous();
  }
  at::Tensor out = at::empty({rows, out_features}, x.options());
  at::Tensor keep = at::empty({rows, out_features}, x.options().dtype(at::kBool));

  EnpProblem p{xc.data_ptr<float>(),
               hc.data_ptr<float>(),
               tc.data_ptr<float>(),
               bc.defined() ? bc.data_ptr<float>() : nullptr,
               rc.defined() ? rc.data_ptr<float>() : nullptr,
               out.data_ptr<float>(),
               keep.data_ptr<bool>(),
               rows,
               out_features,
               features,
               unit,
               relu,
               ExitTest{parse_rule(std::string(rule)), count, n_units, static_cast<float>(cutoff)}};
  // Enough work per task to amortise the thread hand-off: about 64K multiply-adds.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, rows * features));
  at::parallel_for(0, out_features, grain, [&](int64_t begin, int64_t end) {
    if (rows == 1) {
      enp_tile_single_row(p, begin, end);
      return;
    }
    for (int64_t j = begin; j < end; ++j) {
      enp_neuron(p, j);
    }
  });
  return {out.view(shape), keep.view(shape)};
}

// ---------------------------------------------------------------------------
// exfx::sparse_input_linear
// ---------------------------------------------------------------------------

// Input units that are non-zero in at least one row: the only rows of w_t worth reading.
std::vector<int64_t> nonzero_units(const float* x, int64_t rows, int64_t features) {
  std::vector<int64_t> units;
  for (int64_t i = 0; i < features; ++i) {
    for (int64_t row = 0; row < rows; ++row) {
      if (x[row * features + i] != 0.f) {
        units.push_back(i);
        break;
      }
    }
  }
  return units;
}

at::Tensor sparse_input_linear(const at::Tensor& x, const at::Tensor& w_t, const std::optional<at::Tensor>& bias,
                               int64_t max_rows, const std::optional<at::Tensor>& weight) {
  check_float_cpu(x, "x");
  check_float_cpu(w_t, "w_t");
  if (max_rows >= 0 && x.dim() >= 1 && x.size(-1) > 0 && x.numel() / x.size(-1) > max_rows) {
    // Per-call dispatch: past the crossover measured at compile time, the dense product is faster (with the
    // layer's own [out, in] weight when given: the very call the dense layer makes).
    return weight.has_value() ? at::linear(x, *weight, bias) : at::linear(x, w_t.t(), bias);
  }
  TORCH_CHECK(w_t.dim() == 2 && x.dim() >= 1 && x.size(-1) == w_t.size(0), "exfx::sparse_input_linear: x has ",
              x.dim() >= 1 ? x.size(-1) : 0, " features but w_t is ", w_t.sizes(),
              "; pass w_t = weight.T.contiguous() of shape [in, out]");
  const int64_t features = w_t.size(0);
  const int64_t out_features = w_t.size(1);
  const int64_t rows = features == 0 ? 0 : x.numel() / features;
  const auto shape = output_shape(x, out_features);
  const at::Tensor xc = x.reshape({rows, features}).contiguous();
  const at::Tensor wc = w_t.contiguous();
  at::Tensor out = at::empty({rows, out_features}, x.options());
  if (bias.has_value()) {
    check_float_cpu(*bias, "bias");
    TORCH_CHECK(bias->numel() == out_features, "exfx::sparse_input_linear: bias has ", bias->numel(),
                " entries for ", out_features, " outputs");
    out.copy_(bias->reshape({1, out_features}).expand({rows, out_features}));
  } else {
    out.zero_();
  }
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const std::vector<int64_t> units = nonzero_units(xp, rows, features);
  // Units go four at a time; the last group is padded with coefficient 0 on a row of zeros
  // (0 * 0 adds exactly nothing, even where a real weight row holds an Inf).
  const std::vector<float> zero_row(static_cast<size_t>(out_features), 0.f);
  const int64_t groups = (static_cast<int64_t>(units.size()) + 3) / 4;
  // Each task owns a block of output columns and streams the non-zero rows of w_t over it; the
  // block is as wide as keeps every row's output slice in about 64 KB (the whole row at batch 1).
  const int64_t block = std::max<int64_t>(
      4 * kWidth, ((int64_t{1} << 16) / (4 * std::max<int64_t>(rows, 1))) / kWidth * kWidth);
  at::parallel_for(0, out_features, 4 * kWidth, [&](int64_t begin, int64_t end) {
    for (int64_t c0 = begin; c0 < end; c0 += block) {
      const int64_t len = std::min(block, end - c0);
      for (int64_t group = 0; group < groups; ++group) {
        const float* w_rows[4];
        int64_t unit_of[4];
        for (int64_t s = 0; s < 4; ++s) {
          const int64_t at = 4 * group + s;
          unit_of[s] = at < static_cast<int64_t>(units.size()) ? units[at] : -1;
          w_rows[s] = (unit_of[s] < 0 ? zero_row.data() : wp + unit_of[s] * out_features) + c0;
        }
        for (int64_t row = 0; row < rows; ++row) {
          float a[4];
          bool any = false;
          for (int64_t s = 0; s < 4; ++s) {
            a[s] = unit_of[s] < 0 ? 0.f : xp[row * features + unit_of[s]];
            any = any || a[s] != 0.f;
          }
          if (any) {
            axpy4(a, w_rows[0], w_rows[1], w_rows[2], w_rows[3], op + row * out_features + c0, len);
          }
        }
      }
    }
  });
  return out.view(shape);
}

}  // namespace
}  // namespace exfx_native

// The Python side (exfx/ops/enp.py) already owns the `exfx` namespace through torch.library; a
// FRAGMENT adds these two ops to it.
TORCH_LIBRARY_FRAGMENT(exfx, m) {
  m.def(
      "enp_linear(Tensor x, Tensor head, Tensor tail, Tensor? bias, Tensor? residual, int count, int n_units, "
      "str rule, float cutoff, bool relu=False, Tensor? weight=None, int max_rows=-1) -> (Tensor, Tensor)");
  m.def("sparse_input_linear(Tensor x, Tensor w_t, Tensor? bias, int max_rows=-1, Tensor? weight=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(exfx, CPU, m) {
  m.impl("enp_linear", &exfx_native::enp_linear);
  m.impl("sparse_input_linear", &exfx_native::sparse_input_linear);
}
