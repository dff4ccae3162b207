// The one place where multitune op schemas are declared and bound to their C++ kernels.
//
// Defaults are deliberately absent from the schemas: the Python wrappers in
// src/multitune/ops/ own them, so there is a single source of truth for every number.
// Backward ops return an empty tensor for a gradient that was not requested, because a
// schema cannot return an optional tensor. num_labelled: the count of targets that are not
// ignore_index when the caller knows it (the op then never syncs with the device), else -1.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(multitune, m) {
  m.def(
      "linear_cross_entropy(Tensor hidden, Tensor weight, Tensor labels, int ignore_index, "
      "int chunk_size, int num_labelled) -> Tensor");
  m.def(
      "linear_cross_entropy_backward(Tensor grad_loss, Tensor hidden, Tensor weight, "
      "Tensor labels, int ignore_index, int chunk_size, int num_labelled, "
      "bool hidden_requires_grad, bool weight_requires_grad) -> (Tensor, Tensor)");
  m.def(
      "linear_token_logprobs(Tensor hidden, Tensor weight, Tensor targets, int ignore_index, "
      "int chunk_size, int num_labelled) -> Tensor");
  m.def(
      "linear_token_logprobs_backward(Tensor grad_logprob, Tensor hidden, Tensor weight, "
      "Tensor targets, int ignore_index, int chunk_size, int num_labelled, "
      "bool hidden_requires_grad, bool weight_requires_grad) -> (Tensor, Tensor)");
  m.def(
      "plan_packing(Tensor lengths, int capacity, int num_ranks, int seed) "
      "-> (Tensor, Tensor)");
}

// The kernels use only ATen calls, so one registration serves every backend (CPU, CUDA, ...).
// CompositeExplicitAutograd (not Implicit) keeps autograd out of the kernels: the Python side
// registers a backward that recomputes logits chunk by chunk instead of saving them.
TORCH_LIBRARY_IMPL(multitune, CompositeExplicitAutograd, m) {
  m.impl("linear_cross_entropy", &multitune::linear_cross_entropy);
  m.impl("linear_cross_entropy_backward", &multitune::linear_cross_entropy_backward);
  m.impl("linear_token_logprobs", &multitune::linear_token_logprobs);
  m.impl("linear_token_logprobs_backward", &multitune::linear_token_logprobs_backward);
  m.impl("plan_packing", &multitune::plan_packing);
}
