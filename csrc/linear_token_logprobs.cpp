// Per-token log-probability of a target under a bias-free linear head (DPO, scoring):
// logprob = log_softmax(h @ W.T)[target].
#include "linear_logprob_kernel.h"
#include "ops.h"

namespace multitune {

namespace {
constexpr const char* kOpName = "multitune::linear_token_logprobs";
constexpr double kSign = 1.0;
}  // namespace

at::Tensor linear_token_logprobs(const at::Tensor& hidden, const at::Tensor& weight,
                                 const at::Tensor& targets, int64_t ignore_index,
                                 int64_t chunk_size, int64_t num_labelled) {
  return linear_logprob_forward(kOpName, hidden, weight, targets, ignore_index, chunk_size,
                                num_labelled, kSign);
}

std::tuple<at::Tensor, at::Tensor> linear_token_logprobs_backward(
    const at::Tensor& grad_logprob, const at::Tensor& hidden, const at::Tensor& weight,
    const at::Tensor& targets, int64_t ignore_index, int64_t chunk_size, int64_t num_labelled,
    bool hidden_requires_grad, bool weight_requires_grad) {
  return linear_logprob_backward(kOpName, grad_logprob, hidden, weight, targets, ignore_index,
                                 chunk_size, num_labelled, kSign, hidden_requires_grad,
                                 weight_requires_grad);
}

}  // namespace multitune
