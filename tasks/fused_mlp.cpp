// Forward and backward of N stacked tanh MLPs on the CPU, each network's layers computed while its
// weights and activations stay in the caches (tasks/fused_mlp.py builds and loads this file).
//
// Network n reads observations x[n % K]: with N = 2K, the K actors and the K critics of
// tasks.ppo_networks.ActorCritic read the same K agents' observations. Shapes, float32, each tensor's
// last two dimensions contiguous (the first may be a slice's stride):
//   x (K, B, I); weights[l] (N, in_l, out_l) with in_0 = I, in_l = out_(l-1); biases[l] (N, 1, out_l);
//   head (N, A, H) in nn.Linear's (out, in) layout, H the last out_l; head_bias (N, A, 1); out (N, A, B).
// Hidden widths must be multiples of 16 (one vector of 16 floats): 64-64 networks are four vectors wide.
#include "fused_mlp.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

// out (N, A, B), then each hidden layer's output (N, B, out_l) where save (for backward), else nothing more
std::vector<torch::Tensor> forward(torch::Tensor x, std::vector<torch::Tensor> weights, std::vector<torch::Tensor> biases,
                                   torch::Tensor head, torch::Tensor head_bias, bool save) {
  const Stack s = shapes(x, weights, biases, head, head_bias);
  std::vector<torch::Tensor> result{torch::empty({s.N, s.A, s.B}, x.options())};
  for (int64_t l = 0; save && l < s.L; ++l) result.push_back(torch::empty({s.N, s.B, s.width[l]}, x.options()));
  at::parallel_for(0, s.N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(save ? 0 : 2 * s.B * s.widest);
    std::vector<float*> hidden(s.L);
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t l = 0; l < s.L; ++l)
        hidden[l] = save ? result[l + 1].data_ptr<float>() + n * s.B * s.width[l]
                         : scratch.data() + (l % 2) * s.B * s.widest;
      forward_network(s, x.data_ptr<float>() + (n % s.K) * x.stride(0), weights, biases, head, head_bias, n,
                      hidden.data(), result[0].data_ptr<float>() + n * s.A * s.B);
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
  m.def("acrobot_rollout", &acrobot_rollout, "Acrobot-v1 rollout steps from t, acting with the actors");
}
