// The fused kernels' building blocks, shared by fused_mlp.cpp (forward and backward passes) and
// acrobot_rollout.cpp (a rollout on them): vectors of 16 floats, the tanh, the register-blocked products
// and the checks of a stack's shapes. The layout of a stack is described in fused_mlp.cpp.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef int i16 __attribute__((vector_size(64)));

inline v16 load(const float* p) {
  v16 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, v16 v) { __builtin_memcpy(p, &v, sizeof v); }
inline v16 splat(float x) { return v16{} + x; }

// tanh(z) = 1 - 2 / (exp(2z) + 1). exp(y) = 2^k e^r with k = round(y / ln 2), r = y - k ln 2 (ln 2 in two
// parts, so r is exact to float rounding) and e^r by its Taylor polynomial to degree 7 (|r| <= ln 2 / 2:
// truncation below 5e-9 relative). 2z is clamped to [-20, 20], where tanh is +-1 in float.
inline v16 tanh16(v16 z) {
  v16 y = z * 2.0f;
  y = y < -20.0f ? splat(-20.0f) : y;
  y = y > 20.0f ? splat(20.0f) : y;
  v16 t = y * 1.44269504088896341f;
  i16 k = __builtin_convertvector(t + (t >= 0.0f ? splat(0.5f) : splat(-0.5f)), i16);  // rounds half away
  v16 kf = __builtin_convertvector(k, v16);
  v16 r = y - kf * 0.693359375f + kf * 2.12194440e-4f;
  v16 p = splat(1.0f / 5040);
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  i16 bits = (k + 127) << 23;  // 2^k, |k| <= 29
  v16 scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  return 1.0f - 2.0f / (p * scale + 1.0f);
}

// Y[i : i + R, col0 : col0 + 16 NV] = X[i : i + R, :inner] @ W[:inner, col0 : ...] (+ bias): R x NV accumulators
// in registers, each of W's rows loaded once for R rows of X. Six rows of four vectors (24 of the 32 vector
// registers) ran the paper's 64-wide layers a quarter faster than four rows.
template <int R, int NV>
inline void gemm_rows(const float* X, int ldx, const float* W, int ldw, float* Y, int ldy, int i, int inner, int col0,
                      const float* bias) {
  v16 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = bias ? load(bias + col0 + 16 * v) : splat(0.0f);
  for (int k = 0; k < inner; ++k) {
    v16 w[NV];
    for (int v = 0; v < NV; ++v) w[v] = load(W + k * ldw + col0 + 16 * v);
    for (int r = 0; r < R; ++r) {
      v16 a = splat(X[(i + r) * ldx + k]);
      for (int v = 0; v < NV; ++v) acc[r][v] += a * w[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) store(Y + (i + r) * ldy + col0 + 16 * v, acc[r][v]);
}

template <int NV>
void gemm_columns(const float* X, int ldx, const float* W, int ldw, float* Y, int ldy, int rows, int inner, int col0,
                  const float* bias) {
  int i = 0;
  for (; i + 6 <= rows; i += 6) gemm_rows<6, NV>(X, ldx, W, ldw, Y, ldy, i, inner, col0, bias);
  for (; i + 4 <= rows; i += 4) gemm_rows<4, NV>(X, ldx, W, ldw, Y, ldy, i, inner, col0, bias);
  for (; i < rows; ++i) gemm_rows<1, NV>(X, ldx, W, ldw, Y, ldy, i, inner, col0, bias);
}

// Y[rows, cols] = X[rows, inner] @ W[inner, cols] (+ bias[cols]), cols a multiple of 16
void gemm(const float* X, int ldx, const float* W, int ldw, float* Y, int ldy, int rows, int inner, int cols,
          const float* bias) {
  int c = 0;
  for (; c + 64 <= cols; c += 64) gemm_columns<4>(X, ldx, W, ldw, Y, ldy, rows, inner, c, bias);
  for (; c + 16 <= cols; c += 16) gemm_columns<1>(X, ldx, W, ldw, Y, ldy, rows, inner, c, bias);
}

// G[k : k + R, col0 : col0 + 16 NV] = X[:batch, k : k + R]^T @ D[:batch, col0 : ...]: rows of a weight's gradient,
// summed over the batch in registers
template <int R, int NV>
inline void gemm_tn_rows(const float* X, int ldx, const float* D, int ldd, float* G, int ldg, int k, int batch,
                         int col0) {
  v16 acc[R][NV] = {};
  for (int i = 0; i < batch; ++i) {
    v16 d[NV];
    for (int v = 0; v < NV; ++v) d[v] = load(D + i * ldd + col0 + 16 * v);
    for (int r = 0; r < R; ++r) {
      v16 a = splat(X[i * ldx + k + r]);
      for (int v = 0; v < NV; ++v) acc[r][v] += a * d[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) store(G + (k + r) * ldg + col0 + 16 * v, acc[r][v]);
}

template <int NV>
void gemm_tn_columns(const float* X, int ldx, const float* D, int ldd, float* G, int ldg, int rows, int batch,
                     int col0) {
  int k = 0;
  for (; k + 6 <= rows; k += 6) gemm_tn_rows<6, NV>(X, ldx, D, ldd, G, ldg, k, batch, col0);
  for (; k + 4 <= rows; k += 4) gemm_tn_rows<4, NV>(X, ldx, D, ldd, G, ldg, k, batch, col0);
  for (; k < rows; ++k) gemm_tn_rows<1, NV>(X, ldx, D, ldd, G, ldg, k, batch, col0);
}

// G[rows, cols] = X[batch, rows]^T @ D[batch, cols], cols a multiple of 16
void gemm_tn(const float* X, int ldx, const float* D, int ldd, float* G, int ldg, int rows, int batch, int cols) {
  int c = 0;
  for (; c + 64 <= cols; c += 64) gemm_tn_columns<4>(X, ldx, D, ldd, G, ldg, rows, batch, c);
  for (; c + 16 <= cols; c += 16) gemm_tn_columns<1>(X, ldx, D, ldd, G, ldg, rows, batch, c);
}

float sum16(v16 v) {  // halves added in a tree: four vector additions instead of fifteen scalar ones
  typedef float v8 __attribute__((vector_size(32)));
  typedef float v4 __attribute__((vector_size(16)));
  v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
         __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

void check(const torch::Tensor& t, const char* name, int64_t networks) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32, name, " must be a float32 CPU tensor");
  TORCH_CHECK(t.dim() == 3 && t.size(0) == networks, name, " must have ", networks, " entries in its first dimension");
  TORCH_CHECK(t.stride(2) == 1 && t.stride(1) == t.size(2), name, "'s last two dimensions must be contiguous");
}

struct Stack {
  int64_t K, B, I, N, A, H, L;
  std::vector<int64_t> width;  // each hidden layer's output width
  int64_t widest;
  int64_t in(int64_t l) const { return l == 0 ? I : width[l - 1]; }
};

Stack shapes(const torch::Tensor& x, const std::vector<torch::Tensor>& weights, const std::vector<torch::Tensor>& biases,
             const torch::Tensor& head, const torch::Tensor& head_bias) {
  Stack s{x.size(0), x.size(1), x.size(2), head.size(0), head.size(1), head.size(2),
          static_cast<int64_t>(weights.size()), {}, 0};
  TORCH_CHECK(s.L >= 1 && biases.size() == weights.size(), "one weight and one bias per hidden layer");
  TORCH_CHECK(s.N % s.K == 0, "networks ", s.N, " are not a multiple of the ", s.K, " agents' observations");
  check(x, "x", s.K);
  check(head, "head", s.N);
  for (int64_t l = 0; l < s.L; ++l) {
    check(weights[l], "weights", s.N);
    check(biases[l], "biases", s.N);
    const int64_t out = weights[l].size(2);
    TORCH_CHECK(out % 16 == 0, "hidden width ", out, " is not a multiple of 16");
    TORCH_CHECK(weights[l].size(1) == s.in(l) && biases[l].size(2) == out, "layer ", l, " has the wrong shape");
    s.width.push_back(out);
    s.widest = std::max(s.widest, out);
  }
  TORCH_CHECK(s.width.back() == s.H, "the head takes ", s.H, " inputs, the last hidden layer gives ", s.width.back());
  TORCH_CHECK(head_bias.dim() == 3 && head_bias.size(0) == s.N && head_bias.size(1) == s.A && head_bias.stride(1) == 1,
              "head_bias must be (N, A, 1)");
  return s;
}

// Network n's outputs for its B rows of observations `in` (B, I): each hidden layer's tanh output into hidden[l]
// (B, out_l), then out[a * B + i] = head[a] . h_i + head_bias[a]. The one forward pass forward() and the
// rollouts run, so that an actor computes the same logits bit for bit wherever it acts.
inline void forward_network(const Stack& s, const float* in, const std::vector<torch::Tensor>& weights,
                            const std::vector<torch::Tensor>& biases, const torch::Tensor& head,
                            const torch::Tensor& head_bias, int64_t n, float* const* hidden, float* out) {
  for (int64_t l = 0; l < s.L; ++l) {
    const int64_t width = s.width[l];
    float* h = hidden[l];
    gemm(in, s.in(l), weights[l].data_ptr<float>() + n * weights[l].stride(0), width, h, width, s.B, s.in(l), width,
         biases[l].data_ptr<float>() + n * biases[l].stride(0));
    for (int64_t j = 0; j < s.B * width; j += 16) store(h + j, tanh16(load(h + j)));
    in = h;
  }
  const float* w = head.data_ptr<float>() + n * head.stride(0);
  const float* b = head_bias.data_ptr<float>() + n * head_bias.stride(0);
  for (int64_t i = 0; i < s.B; ++i)
    for (int64_t a = 0; a < s.A; ++a) {
      v16 acc = splat(0.0f);
      for (int64_t j = 0; j < s.H; j += 16) acc += load(in + i * s.H + j) * load(w + a * s.H + j);
      out[a * s.B + i] = sum16(acc) + b[a];
    }
}

}  // namespace

// acrobot_rollout.cpp
int64_t acrobot_rollout(int64_t t, torch::Tensor obs, std::vector<torch::Tensor> weights,
                        std::vector<torch::Tensor> biases, torch::Tensor head, torch::Tensor head_bias,
                        torch::Tensor gumbel, torch::Tensor state, torch::Tensor elapsed, torch::Tensor episode_return,
                        torch::Tensor fresh, torch::Tensor used, int64_t limit, torch::Tensor obs_buf,
                        torch::Tensor actions_buf, torch::Tensor logits_buf, torch::Tensor rewards,
                        torch::Tensor terminated, torch::Tensor truncated, torch::Tensor final,
                        torch::Tensor ended_returns, torch::Tensor ended_lengths);
