// Declarations of every multitune op; registration.cpp binds them to their schemas.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace multitune {

at::Tensor linear_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight,
                                const at::Tensor& labels, int64_t ignore_index,
                                int64_t chunk_size, int64_t num_labelled);

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_backward(
    const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight,
    const at::Tensor& labels, int64_t ignore_index, int64_t chunk_size,
    int64_t num_labelled, bool hidden_requires_grad, bool weight_requires_grad);

at::Tensor linear_token_logprobs(const at::Tensor& hidden, const at::Tensor& weight,
                                 const at::Tensor& targets, int64_t ignore_index,
                                 int64_t chunk_size, int64_t num_labelled);

std::tuple<at::Tensor, at::Tensor> linear_token_logprobs_backward(
    const at::Tensor& grad_logprob, const at::Tensor& hidden, const at::Tensor& weight,
    const at::Tensor& targets, int64_t ignore_index, int64_t chunk_size,
    int64_t num_labelled, bool hidden_requires_grad, bool weight_requires_grad);

std::tuple<at::Tensor, at::Tensor> plan_packing(const at::Tensor& lengths, int64_t capacity,
                                                int64_t num_ranks, int64_t seed);

}  // namespace multitune
