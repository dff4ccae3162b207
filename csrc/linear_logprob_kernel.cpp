// Memory rule: only labelled positions reach the vocabulary projection, and they do so
// chunk_size rows at a time, so the extra memory is O(chunk_size x V), never O(N x V).
// Backward recomputes each chunk's logits instead of saving them.
// Per-operator headers instead of <ATen/ATen.h> roughly halve this file's compile time.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "linear_logprob_kernel.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>

namespace multitune {
namespace {

// bf16/fp16 inputs are promoted to float32: a log-sum-exp over a large vocabulary in bf16
// loses the target logit. float64 stays float64 so that gradcheck is meaningful.
at::ScalarType compute_dtype(const at::Tensor& hidden, const at::Tensor& weight) {
  const bool wide = hidden.scalar_type() == at::kDouble || weight.scalar_type() == at::kDouble;
  return wide ? at::kDouble : at::kFloat;
}

void check_inputs(const char* op_name, const at::Tensor& hidden, const at::Tensor& weight,
                  const at::Tensor& targets, int64_t chunk_size) {
  TORCH_CHECK_VALUE(hidden.dim() == 2, op_name, ": hidden must be [N, H], got ",
                    hidden.sizes(), "; flatten the batch and sequence dims first");
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == hidden.size(1), op_name,
                    ": weight must be [V, H] with H = ", hidden.size(1), ", got ",
                    weight.sizes());
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == hidden.size(0), op_name,
                    ": targets must be [N] with N = ", hidden.size(0), ", got ",
                    targets.sizes());
  TORCH_CHECK_VALUE(targets.scalar_type() == at::kLong, op_name,
                    ": targets must be int64, got ", targets.scalar_type());
  TORCH_CHECK_VALUE(at::isFloatingType(hidden.scalar_type()) &&
                        at::isFloatingType(weight.scalar_type()),
                    op_name, ": hidden and weight must be floating point, got ",
                    hidden.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK_VALUE(hidden.device() == weight.device() && hidden.device() == targets.device(),
                    op_name, ": hidden, weight and targets must be on one device, got ",
                    hidden.device(), ", ", weight.device(), ", ", targets.device());
  TORCH_CHECK_VALUE(chunk_size > 0, op_name, ": chunk_size must be positive, got ",
                    chunk_size);
}

// Indices of positions whose target is not ignore_index. This syncs with the device once
// (the chunk count depends on it); the range check rides on the same sync and turns a
// CUDA device-side assert into a readable error.
at::Tensor labelled_positions(const char* op_name, const at::Tensor& targets,
                              int64_t ignore_index, int64_t vocab_size) {
  at::Tensor positions = targets.ne(ignore_index).nonzero().squeeze(1);
  if (positions.numel() == 0) {
    return positions;
  }
  auto [lowest, highest] = at::aminmax(targets.index_select(0, positions));
  at::Tensor range = at::stack({lowest, highest}).to(at::kCPU);
  const int64_t low = range[0].item<int64_t>();
  const int64_t high = range[1].item<int64_t>();
  TORCH_CHECK_VALUE(low >= 0 && high < vocab_size, op_name, ": target ids must lie in [0, ",
                    vocab_size, ") or equal ignore_index (", ignore_index,
                    "), got values in [", low, ", ", high, "]");
  return positions;
}

// Turns a [chunk, V] logits buffer into softmax probabilities in place and returns the
// per-row log-sum-exp. at::logsumexp / at::softmax would each allocate a second [chunk, V]
// tensor, doubling the op's peak memory.
at::Tensor softmax_in_place(at::Tensor& logits) {
  const at::Tensor row_max = logits.amax({1}, /*keepdim=*/true);
  const at::Tensor row_sum = logits.sub_(row_max).exp_().sum({1}, /*keepdim=*/true);
  logits.div_(row_sum);
  return row_sum.log().add_(row_max).squeeze(1);
}

}  // namespace

at::Tensor linear_logprob_forward(const char* op_name, const at::Tensor& hidden,
                                  const at::Tensor& weight, const at::Tensor& targets,
                                  int64_t ignore_index, int64_t chunk_size, double sign) {
  check_inputs(op_name, hidden, weight, targets, chunk_size);
  const at::ScalarType dtype = compute_dtype(hidden, weight);
  at::Tensor out = at::zeros({hidden.size(0)}, hidden.options().dtype(dtype));
  at::Tensor positions = labelled_positions(op_name, targets, ignore_index, weight.size(0));
  if (positions.numel() == 0) {
    return out;
  }
  // One cast of the weight per call: free for float32 weights; for bf16 it is the op's one
  // V x H float32 copy, traded for exact float32 logits on every device.
  const at::Tensor weight_t = weight.to(dtype).t();
  for (int64_t start = 0; start < positions.size(0); start += chunk_size) {
    const at::Tensor rows = positions.slice(0, start, start + chunk_size);
    at::Tensor logits = at::matmul(hidden.index_select(0, rows).to(dtype), weight_t);
    const at::Tensor chunk_targets = targets.index_select(0, rows).unsqueeze(1);
    at::Tensor logprob = logits.gather(1, chunk_targets).squeeze(1);  // before the in-place pass
    logprob.sub_(softmax_in_place(logits)).mul_(sign);
    out.index_copy_(0, rows, logprob);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> linear_logprob_backward(
    const char* op_name, const at::Tensor& grad_out, const at::Tensor& hidden,
    const at::Tensor& weight, const at::Tensor& targets, int64_t ignore_index,
    int64_t chunk_size, double sign, bool hidden_requires_grad, bool weight_requires_grad) {
  check_inputs(op_name, hidden, weight, targets, chunk_size);
  TORCH_CHECK_VALUE(grad_out.dim() == 1 && grad_out.size(0) == hidden.size(0), op_name,
                    ": grad must be [N] with N = ", hidden.size(0), ", got ", grad_out.sizes());
  const at::ScalarType dtype = compute_dtype(hidden, weight);
  // Ignored rows keep a zero gradient, so start from zeros and fill labelled rows only.
  at::Tensor grad_hidden = hidden_requires_grad ? at::zeros(hidden.sizes(), hidden.options())
                                                : at::empty({0}, hidden.options());
  // Accumulate in the compute dtype across chunks; cast to the weight dtype once at the end.
  at::Tensor grad_weight = weight_requires_grad
                               ? at::zeros(weight.sizes(), weight.options().dtype(dtype))
                               : at::empty({0}, weight.options());
  if (!hidden_requires_grad && !weight_requires_grad) {
    return {grad_hidden, grad_weight};
  }
  at::Tensor positions = labelled_positions(op_name, targets, ignore_index, weight.size(0));
  const at::Tensor weight_c = weight.to(dtype);
  for (int64_t start = 0; start < positions.size(0); start += chunk_size) {
    const at::Tensor rows = positions.slice(0, start, start + chunk_size);
    const at::Tensor chunk_hidden = hidden.index_select(0, rows).to(dtype);
    at::Tensor logits = at::matmul(chunk_hidden, weight_c.t());
    // d(sign * logprob) / d logits = sign * (onehot(target) - softmax(logits)), built in
    // place in the logits buffer so a chunk never holds two [chunk, V] tensors.
    const at::Tensor scale = grad_out.index_select(0, rows).to(dtype).mul(sign).unsqueeze(1);
    softmax_in_place(logits);
    at::Tensor& grad_logits = logits.mul_(scale.neg());
    grad_logits.scatter_add_(1, targets.index_select(0, rows).unsqueeze(1), scale);
    if (hidden_requires_grad) {
      grad_hidden.index_copy_(0, rows, at::matmul(grad_logits, weight_c).to(hidden.scalar_type()));
    }
    if (weight_requires_grad) {
      grad_weight.addmm_(grad_logits.t(), chunk_hidden);
    }
  }
  return {grad_hidden, weight_requires_grad ? grad_weight.to(weight.scalar_type()) : grad_weight};
}

}  // namespace multitune
