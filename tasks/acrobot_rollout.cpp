// A PPO rollout on Acrobot-v1 in one C++ loop: per step, each agent's actor (the fused forward pass of
// fused_mlp.h) acts on its environments' observations, a Gumbel-max sample picks each action, and every
// environment takes one step of gymnasium's dynamics, with same-step autoreset. tasks/ppo.py runs it for
// task.backend=torch with kernels=fused; the Python loop it replaces does the same, one step at a time, on
// tasks.ppo_envs.TorchAcrobot.
//
// The dynamics are tasks.ppo_envs.acrobot_step's, operation for operation in double (its constants
// folded as Python folds them), so the two agree to the rounding of sin and cos. Environment e = k N + j
// is agent k's environment j. An ended episode restarts from fresh[e], its next initial state, drawn by
// the caller from the environment's own generator; used[e] marks it taken. An environment that ends a
// second time before the caller has drawn its next one cannot restart: the call returns the step at which
// that would happen, with nothing of that step kept, and the caller draws and calls again from there.
#include "fused_mlp.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

constexpr double kPi = 3.14159265358979323846;

struct Derivative {
  double dtheta1, dtheta2, ddtheta1, ddtheta2;
};

// acrobot_derivatives: m1 = m2 = l1 = 1, lc1 = lc2 = 0.5, I1 = I2 = 1, g = 9.8, the Python constants folded
inline Derivative derivatives(double theta1, double theta2, double dtheta1, double dtheta2, double torque) {
  const double cos2 = std::cos(theta2), sin2 = std::sin(theta2);
  const double d1 = 0.25 + 1.0 * (1.25 + 1.0 * cos2) + 1.0 + 1.0;
  const double d2 = 1.0 * (0.25 + 0.5 * cos2) + 1.0;
  const double phi2 = 4.9 * std::cos(theta1 + theta2 - kPi / 2.0);
  const double phi1 = -0.5 * (dtheta2 * dtheta2) * sin2 - 1.0 * dtheta2 * dtheta1 * sin2 +
                      14.700000000000001 * std::cos(theta1 - kPi / 2) + phi2;
  const double ddtheta2 =
      (torque + d2 / d1 * phi1 - 0.5 * (dtheta1 * dtheta1) * sin2 - phi2) / (1.25 - (d2 * d2) / d1);
  const double ddtheta1 = -(d2 * ddtheta2 + phi1) / d1;
  return {dtheta1, dtheta2, ddtheta1, ddtheta2};
}

inline double wrap(double angle) {
  const double turn = 2 * kPi;
  if (angle > kPi) angle = angle - std::ceil((angle - kPi) / turn) * turn;
  if (angle < -kPi) angle = angle + std::ceil((-kPi - angle) / turn) * turn;
  return angle;
}

inline void observe(const double* s, float* obs) {
  obs[0] = static_cast<float>(std::cos(s[0]));
  obs[1] = static_cast<float>(std::sin(s[0]));
  obs[2] = static_cast<float>(std::cos(s[1]));
  obs[3] = static_cast<float>(std::sin(s[1]));
  obs[4] = static_cast<float>(s[2]);
  obs[5] = static_cast<float>(s[3]);
}

// one explicit RK4 step of 0.2 s, angles wrapped, velocities bounded: acrobot_step before its autoreset
inline void integrate(const double* y, double torque, double* out) {
  const double dt = 0.2, half = 0.1, sixth = 0.03333333333333333;
  const Derivative k1 = derivatives(y[0], y[1], y[2], y[3], torque);
  const Derivative k2 = derivatives(y[0] + half * k1.dtheta1, y[1] + half * k1.dtheta2, y[2] + half * k1.ddtheta1,
                                    y[3] + half * k1.ddtheta2, torque);
  const Derivative k3 = derivatives(y[0] + half * k2.dtheta1, y[1] + half * k2.dtheta2, y[2] + half * k2.ddtheta1,
                                    y[3] + half * k2.ddtheta2, torque);
  const Derivative k4 = derivatives(y[0] + dt * k3.dtheta1, y[1] + dt * k3.dtheta2, y[2] + dt * k3.ddtheta1,
                                    y[3] + dt * k3.ddtheta2, torque);
  const double theta1 = y[0] + sixth * (k1.dtheta1 + 2 * k2.dtheta1 + 2 * k3.dtheta1 + k4.dtheta1);
  const double theta2 = y[1] + sixth * (k1.dtheta2 + 2 * k2.dtheta2 + 2 * k3.dtheta2 + k4.dtheta2);
  const double dtheta1 = y[2] + sixth * (k1.ddtheta1 + 2 * k2.ddtheta1 + 2 * k3.ddtheta1 + k4.ddtheta1);
  const double dtheta2 = y[3] + sixth * (k1.ddtheta2 + 2 * k2.ddtheta2 + 2 * k3.ddtheta2 + k4.ddtheta2);
  out[0] = wrap(theta1);
  out[1] = wrap(theta2);
  out[2] = std::min(std::max(dtheta1, -4 * kPi), 4 * kPi);
  out[3] = std::min(std::max(dtheta2, -9 * kPi), 9 * kPi);
}

void expect(const torch::Tensor& t, torch::ScalarType type, std::vector<int64_t> shape, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == type && t.is_contiguous(), name,
              " must be a contiguous CPU tensor of ", type);
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

}  // namespace

// Steps t .. T - 1 (T = gumbel's first dimension), or up to the step at which an environment would end a second
// time without a fresh initial state; returns the step reached. obs (K, N, 6) holds the observations to act on
// and is left holding the next ones. weights, biases, head and head_bias are the K actors' (fused_mlp.cpp's
// layout). State: state (E, 4) double, elapsed (E) int64, episode_return (E) float32, fresh (E, 4) double,
// used (E) bool. Per step t, as the rollout records it: obs_buf (T, K, N, 6), actions_buf (T, K, N) int64,
// logits_buf (T, K, N, A), rewards, terminated, truncated (T, E), final (T, E, 6), and the return and length of
// each episode that ended (T, E; 0 elsewhere).
int64_t acrobot_rollout(int64_t t, torch::Tensor obs, std::vector<torch::Tensor> weights,
                        std::vector<torch::Tensor> biases, torch::Tensor head, torch::Tensor head_bias,
                        torch::Tensor gumbel, torch::Tensor state, torch::Tensor elapsed, torch::Tensor episode_return,
                        torch::Tensor fresh, torch::Tensor used, int64_t limit, torch::Tensor obs_buf,
                        torch::Tensor actions_buf, torch::Tensor logits_buf, torch::Tensor rewards,
                        torch::Tensor terminated, torch::Tensor truncated, torch::Tensor final,
                        torch::Tensor ended_returns, torch::Tensor ended_lengths) {
  const Stack s = shapes(obs, weights, biases, head, head_bias);
  TORCH_CHECK(s.I == 6 && s.N == s.K, "the actors of K agents acting on Acrobot's 6 observations");
  const int64_t K = s.K, N = s.B, A = s.A, E = K * N, T = gumbel.size(0);
  expect(obs, torch::kFloat32, {K, N, 6}, "obs");
  expect(gumbel, torch::kFloat32, {T, K, N, A}, "gumbel");
  expect(state, torch::kFloat64, {E, 4}, "state");
  expect(elapsed, torch::kInt64, {E}, "elapsed");
  expect(episode_return, torch::kFloat32, {E}, "episode_return");
  expect(fresh, torch::kFloat64, {E, 4}, "fresh");
  expect(used, torch::kBool, {E}, "used");
  expect(obs_buf, torch::kFloat32, {T, K, N, 6}, "obs_buf");
  expect(actions_buf, torch::kInt64, {T, K, N}, "actions_buf");
  expect(logits_buf, torch::kFloat32, {T, K, N, A}, "logits_buf");
  expect(rewards, torch::kFloat32, {T, E}, "rewards");
  expect(terminated, torch::kBool, {T, E}, "terminated");
  expect(truncated, torch::kBool, {T, E}, "truncated");
  expect(final, torch::kFloat32, {T, E, 6}, "final");
  expect(ended_returns, torch::kFloat32, {T, E}, "ended_returns");
  expect(ended_lengths, torch::kInt64, {T, E}, "ended_lengths");
  float* o = obs.data_ptr<float>();
  double* st = state.data_ptr<double>();
  int64_t* el = elapsed.data_ptr<int64_t>();
  float* ret = episode_return.data_ptr<float>();
  const double* fr = fresh.data_ptr<double>();
  bool* us = used.data_ptr<bool>();
  std::vector<float> logits(E * A);  // (K, A, N): each actor's out
  std::vector<double> stepped(E * 4);
  std::vector<char> done(E);
  for (; t < T; ++t) {
    at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(s.L * N * s.widest);
      std::vector<float*> hidden(s.L);
      for (int64_t l = 0; l < s.L; ++l) hidden[l] = scratch.data() + l * N * s.widest;
      for (int64_t k = begin; k < end; ++k)
        forward_network(s, o + k * N * 6, weights, biases, head, head_bias, k, hidden.data(), logits.data() + k * A * N);
    });
    // every environment's step, kept aside until no environment would restart without a fresh initial state
    bool blocked = false;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t k = e / N, j = e % N;
      const float* g = gumbel.data_ptr<float>() + ((t * K + k) * N + j) * A;
      const float* lg = logits.data() + k * A * N + j;
      int64_t action = 0;
      float best = lg[0] + g[0];
      for (int64_t a = 1; a < A; ++a) {  // torch.argmax: the first maximum, NaN above all
        const float v = lg[a * N] + g[a];
        if (v > best || (std::isnan(v) && !std::isnan(best))) best = v, action = a;
      }
      actions_buf.data_ptr<int64_t>()[t * E + e] = action;
      integrate(st + 4 * e, static_cast<double>(action) - 1.0, stepped.data() + 4 * e);
      const double* y = stepped.data() + 4 * e;
      const bool ended = -std::cos(y[0]) - std::cos(y[1] + y[0]) > 1.0;
      terminated.data_ptr<bool>()[t * E + e] = ended;
      truncated.data_ptr<bool>()[t * E + e] = el[e] + 1 >= limit;
      done[e] = ended || el[e] + 1 >= limit;
      blocked = blocked || (done[e] && us[e]);
    }
    if (blocked) return t;
    float* ob = obs_buf.data_ptr<float>() + t * E * 6;
    float* lb = logits_buf.data_ptr<float>() + t * E * A;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t k = e / N, j = e % N;
      for (int64_t a = 0; a < A; ++a) lb[e * A + a] = logits[k * A * N + a * N + j];
      for (int64_t i = 0; i < 6; ++i) ob[e * 6 + i] = o[e * 6 + i];
      const bool ended = terminated.data_ptr<bool>()[t * E + e];
      const float reward = ended ? 0.0f : -1.0f;
      rewards.data_ptr<float>()[t * E + e] = reward;
      el[e] += 1;
      ret[e] += reward;
      float* fin = final.data_ptr<float>() + (t * E + e) * 6;
      observe(stepped.data() + 4 * e, fin);
      if (done[e]) {
        ended_returns.data_ptr<float>()[t * E + e] = ret[e];
        ended_lengths.data_ptr<int64_t>()[t * E + e] = el[e];
        for (int i = 0; i < 4; ++i) st[4 * e + i] = fr[4 * e + i];
        us[e] = true;
        observe(st + 4 * e, o + e * 6);
        ret[e] = 0.0f;
        el[e] = 0;
      } else {
        ended_returns.data_ptr<float>()[t * E + e] = 0.0f;
        ended_lengths.data_ptr<int64_t>()[t * E + e] = 0;
        for (int i = 0; i < 4; ++i) st[4 * e + i] = stepped[4 * e + i];
        for (int i = 0; i < 6; ++i) o[e * 6 + i] = fin[i];
      }
    }
  }
  return t;
}
