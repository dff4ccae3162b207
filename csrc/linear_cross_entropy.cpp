// Per-token cross entropy of a bias-free linear head: loss = -log_softmax(h @ W.T)[label].
// Per-token values (not a mean) let callers normalise by the exact token count per step.
#include "linear_logprob_kernel.h"
#include "ops.h"

namespace multitune {

namespace {
constexpr const char* kOpName = "multitune::linear_cross_entropy";
constexpr double kSign = -1.0;  // cross entropy is the negated log-probability
}  // namespace

at::Tensor linear_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight,
                                const at::Tensor& labels, int64_t ignore_index,
                                int64_t chunk_size, int64_t num_labelled) {
  return linear_logprob_forward(kOpName, hidden, weight, labels, ignore_index, chunk_size,
                                num_labelled, kSign);
}

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_backward(
    const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight,
    const at::Tensor& labels, int64_t ignore_index, int64_t chunk_size, int64_t num_labelled,
    bool hidden_requires_grad, bool weight_requires_grad) {
  return linear_logprob_backward(kOpName, grad_loss, hidden, weight, labels, ignore_index,
                                 chunk_size, num_labelled, kSign, hidden_requires_grad,
                                 weight_requires_grad);
}

}  // namespace multitune
