// Forward and backward of N stacked tanh MLPs on the CPU, each network's layers computed while its
// weights and activations stay in the caches (tasks/fused_mlp.py builds and loads this file).
//
// Network n reads observations x[n % K]: with N = 2K, the K actors and the K critics of
// tasks.ppo_networks.ActorCritic read the same K agents' observations. Shapes, float32, each tensor's
// last two dimensions contiguous (the first may be a slice's stride):
//   x (K, B, I); weights[l] (N, in_l, out_l) with in_0 = I, in_l = out_(l-1); biases[l] (N, 1, out_l);
//   head (N, A, H) in nn.Linear's (out, in) layout, H the last out_l; head_bias (N, A, 1); out (N, A, B).
// Hidden widths must be multiples of 16 (one vector of 16 floats): 64-64 networks are four vectors wide.
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

}  // namespace

// out (N, A, B), then each hidden layer's output (N, B, out_l) where save (for backward), else nothing more
std::vector<torch::Tensor> forward(torch::Tensor x, std::vector<torch::Tensor> weights, std::vector<torch::Tensor> biases,
                                   torch::Tensor head, torch::Tensor head_bias, bool save) {
  const Stack s = shapes(x, weights, biases, head, head_bias);
  std::vector<torch::Tensor> result{torch::empty({s.N, s.A, s.B}, x.options())};
  for (int64_t l = 0; save && l < s.L; ++l) result.push_back(torch::empty({s.N, s.B, s.width[l]}, x.options()));
  at::parallel_for(0, s.N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(save ? 0 : 2 * s.B * s.widest);
    for (int64_t n = begin; n < end; ++n) {
      const float* in = x.data_ptr<float>() + (n % s.K) * x.stride(0);
      for (int64_t l = 0; l < s.L; ++l) {
        const int64_t out = s.width[l];
        float* h = save ? result[l + 1].data_ptr<float>() + n * s.B * out : scratch.data() + (l % 2) * s.B * s.widest;
        gemm(in, s.in(l), weights[l].data_ptr<float>() + n * weights[l].stride(0), out, h, out, s.B, s.in(l), out,
             biases[l].data_ptr<float>() + n * biases[l].stride(0));
        for (int64_t j = 0; j < s.B * out; j += 16) store(h + j, tanh16(load(h + j)));
        in = h;
      }
      const float* w = head.data_ptr<float>() + n * head.stride(0);
      const float* b = head_bias.data_ptr<float>() + n * head_bias.stride(0);
      float* out = result[0].data_ptr<float>() + n * s.A * s.B;
      for (int64_t i = 0; i < s.B; ++i)
        for (int64_t a = 0; a < s.A; ++a) {
          v16 acc = splat(0.0f);
          for (int64_t j = 0; j < s.H; j += 16) acc += load(in + i * s.H + j) * load(w + a * s.H + j);
          out[a * s.B + i] = sum16(acc) + b[a];
        }
    }
  });
  return result;
}

// the gradients of weights..., biases..., head and head_bias, given grad (N, A, B) of out and forward's
// saved hidden outputs (the observations get none)
std::vector<torch::Tensor> backward(torch::Tensor grad, torch::Tensor x, std::vector<torch::Tensor> hidden,
                                    std::vector<torch::Tensor> weights, std::vector<torch::Tensor> biases,
                                    torch::Tensor head, torch::Tensor head_bias) {
  const Stack s = shapes(x, weights, biases, head, head_bias);
  TORCH_CHECK(grad.is_contiguous() && grad.size(0) == s.N && grad.size(1) == s.A && grad.size(2) == s.B,
              "grad must be a contiguous (N, A, B) tensor");
  std::vector<torch::Tensor> grads;
  for (int64_t l = 0; l < s.L; ++l) grads.push_back(torch::empty({s.N, s.in(l), s.width[l]}, x.options()));
  for (int64_t l = 0; l < s.L; ++l) grads.push_back(torch::empty({s.N, 1, s.width[l]}, x.options()));
  grads.push_back(torch::empty({s.N, s.A, s.H}, x.options()));
  grads.push_back(torch::empty({s.N, s.A, 1}, x.options()));
  at::parallel_for(0, s.N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> d(s.B * s.widest), previous(s.B * s.widest), transposed(s.widest * s.widest);
    for (int64_t n = begin; n < end; ++n) {
      const float* g = grad.data_ptr<float>() + n * s.A * s.B;
      const float* top = hidden[s.L - 1].data_ptr<float>() + n * s.B * s.H;
      const float* w = head.data_ptr<float>() + n * head.stride(0);
      float* gw = grads[2 * s.L].data_ptr<float>() + n * s.A * s.H;
      float* gb = grads[2 * s.L + 1].data_ptr<float>() + n * s.A;
      for (int64_t a = 0; a < s.A; ++a) {  // the head: its bias and weight gradients
        float sum = 0.0f;
        for (int64_t i = 0; i < s.B; ++i) sum += g[a * s.B + i];
        gb[a] = sum;
        for (int64_t j = 0; j < s.H; j += 16) {
          v16 acc = splat(0.0f);
          for (int64_t i = 0; i < s.B; ++i) acc += g[a * s.B + i] * load(top + i * s.H + j);
          store(gw + a * s.H + j, acc);
        }
      }
      for (int64_t i = 0; i < s.B; ++i)  // d = (grad^T @ head) * (1 - h^2), the last layer's pre-tanh gradient
        for (int64_t j = 0; j < s.H; j += 16) {
          v16 acc = splat(0.0f);
          for (int64_t a = 0; a < s.A; ++a) acc += g[a * s.B + i] * load(w + a * s.H + j);
          v16 y = load(top + i * s.H + j);
          store(d.data() + i * s.H + j, acc * (1.0f - y * y));
        }
      for (int64_t l = s.L - 1; l >= 0; --l) {
        const int64_t width = s.in(l), out = s.width[l];
        const float* in = l == 0 ? x.data_ptr<float>() + (n % s.K) * x.stride(0)
                                 : hidden[l - 1].data_ptr<float>() + n * s.B * width;
        float* bias_grad = grads[s.L + l].data_ptr<float>() + n * out;
        for (int64_t j = 0; j < out; j += 16) {
          v16 acc = splat(0.0f);
          for (int64_t i = 0; i < s.B; ++i) acc += load(d.data() + i * out + j);
          store(bias_grad + j, acc);
        }
        gemm_tn(in, width, d.data(), out, grads[l].data_ptr<float>() + n * width * out, out, width, s.B, out);
        if (l > 0) {  // the gradient before layer l's input tanh: (d @ W^T) * (1 - in^2)
          const float* weight = weights[l].data_ptr<float>() + n * weights[l].stride(0);  // (width, out)
          for (int64_t r = 0; r < width; ++r)
            for (int64_t c = 0; c < out; ++c) transposed[c * width + r] = weight[r * out + c];
          gemm(d.data(), out, transposed.data(), width, previous.data(), width, s.B, out, width, nullptr);
          for (int64_t j = 0; j < s.B * width; j += 16) {
            v16 y = load(in + j);
            store(previous.data() + j, load(previous.data() + j) * (1.0f - y * y));
          }
          std::swap(d, previous);
        }
      }
    }
  });
  return grads;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "the stacked networks' outputs (and hidden outputs where save)");
  m.def("backward", &backward, "the stacked networks' parameter gradients");
}
