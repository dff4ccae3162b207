// Chunked `sign * log_softmax(hidden @ weight.T)[target]`, shared by linear_cross_entropy
// (sign = -1) and linear_token_logprobs (sign = +1), so the two ops cannot drift apart.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace multitune {

// Per-token values [N] in the compute dtype; 0 where target == ignore_index. num_labelled: the
// count of targets that are not ignore_index when the caller knows it (no device sync), or -1.
at::Tensor linear_logprob_forward(const char* op_name, const at::Tensor& hidden,
                                  const at::Tensor& weight, const at::Tensor& targets,
                                  int64_t ignore_index, int64_t chunk_size, int64_t num_labelled,
                                  double sign);

// (grad_hidden, grad_weight); a gradient that is not required comes back as an empty tensor.
std::tuple<at::Tensor, at::Tensor> linear_logprob_backward(
    const char* op_name, const at::Tensor& grad_out, const at::Tensor& hidden,
    const at::Tensor& weight, const at::Tensor& targets, int64_t ignore_index,
    int64_t chunk_size, int64_t num_labelled, double sign, bool hidden_requires_grad,
    bool weight_requires_grad);

}  // namespace multitune
