// Memory rule: only labelled positions reach the vocabulary projection, and they do so
// chunk_size rows at a time, so the extra memory is O(chunk_size x V), never O(N x V).
// Backward recomputes each chunk's logits instead of saving them. A bf16/fp16 weight is cast
// to float32 kVocabSlice rows at a time, never whole (a whole copy of Llama 3.2 1B's head is
// 1.05 GB, twice one chunk's logits).
// Per-operator headers instead of <ATen/ATen.h> roughly halve this file's compile time.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "linear_logprob_kernel.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/_assert_async.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/nonzero_static.h>
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

// Vocabulary rows of a low-precision weight cast to the compute dtype at a time: the cast slice
// (kVocabSlice x H) and its [chunk, kVocabSlice] product are the only buffers besides the
// chunk's logits (32 MB and 16 MB at H = 2048 and chunk 1024, against 525 MB of logits at
// V = 128256), and the matmuls stay large enough to run at full speed on a GPU.
constexpr int64_t kVocabSlice = 4096;

// Indices of positions whose target is not ignore_index. With num_labelled from the caller
// (>= 0) nothing syncs with the device: every row when num_labelled == N, else a
// nonzero_static of that size, and the range check is an asynchronous device assert. Without
// it (-1), the count comes from nonzero, one sync, and the range check rides on the same sync
// and turns a CUDA device-side assert into a readable error.
at::Tensor labelled_positions(const char* op_name, const at::Tensor& targets,
                              int64_t ignore_index, int64_t vocab_size, int64_t num_labelled) {
  if (num_labelled >= 0) {
    TORCH_CHECK_VALUE(num_labelled <= targets.size(0), op_name, ": num_labelled (",
                      num_labelled, ") exceeds the ", targets.size(0), " targets");
    at::Tensor positions =
        num_labelled == targets.size(0)
            ? at::arange(num_labelled, targets.options())
            : at::nonzero_static(targets.ne(ignore_index), num_labelled, -1).squeeze(1);
    at::_assert_async(targets.ne(ignore_index).sum().eq(num_labelled),
                      "num_labelled must count the targets that are not ignore_index");
    const at::Tensor chosen = targets.index_select(0, positions.clamp_min(0));
    at::_assert_async(chosen.ge(0).logical_and(chosen.lt(vocab_size)).all(),
                      "target ids must lie in [0, vocab size) or equal ignore_index");
    return positions;
  }
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

// [rows, V] logits of chunk_hidden (already in the compute dtype). A weight in that dtype is
// used as it is; a lower-precision one is cast slice by slice into the logits buffer.
at::Tensor project(const at::Tensor& chunk_hidden, const at::Tensor& weight) {
  if (weight.scalar_type() == chunk_hidden.scalar_type()) {
    return at::matmul(chunk_hidden, weight.t());
  }
  const int64_t vocab = weight.size(0);
  at::Tensor logits = at::empty({chunk_hidden.size(0), vocab}, chunk_hidden.options());
  for (int64_t start = 0; start < vocab; start += kVocabSlice) {
    const at::Tensor slice = weight.slice(0, start, start + kVocabSlice);
    logits.slice(1, start, start + kVocabSlice)
        .copy_(at::matmul(chunk_hidden, slice.to(chunk_hidden.scalar_type()).t()));
  }
  return logits;
}

// grad_logits [rows, V] @ weight [V, H] in the compute dtype, casting the weight slice by
// slice when it is lower precision.
at::Tensor project_back(const at::Tensor& grad_logits, const at::Tensor& weight) {
  if (weight.scalar_type() == grad_logits.scalar_type()) {
    return at::matmul(grad_logits, weight);
  }
  const int64_t vocab = weight.size(0);
  at::Tensor out = at::zeros({grad_logits.size(0), weight.size(1)}, grad_logits.options());
  for (int64_t start = 0; start < vocab; start += kVocabSlice) {
    const at::Tensor slice = weight.slice(0, start, start + kVocabSlice);
    out.addmm_(grad_logits.slice(1, start, start + kVocabSlice),
               slice.to(grad_logits.scalar_type()));
  }
  return out;
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
                                  int64_t ignore_index, int64_t chunk_size, int64_t num_labelled,
                                  double sign) {
  check_inputs(op_name, hidden, weight, targets, chunk_size);
  const at::ScalarType dtype = compute_dtype(hidden, weight);
  at::Tensor out = at::zeros({hidden.size(0)}, hidden.options().dtype(dtype));
  at::Tensor positions =
      labelled_positions(op_name, targets, ignore_index, weight.size(0), num_labelled);
  for (int64_t start = 0; start < positions.size(0); start += chunk_size) {
    const at::Tensor rows = positions.slice(0, start, start + chunk_size);
    at::Tensor logits = project(hidden.index_select(0, rows).to(dtype), weight);
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
    int64_t chunk_size, int64_t num_labelled, double sign, bool hidden_requires_grad,
    bool weight_requires_grad) {
  check_inputs(op_name, hidden, weight, targets, chunk_size);
  TORCH_CHECK_VALUE(grad_out.dim() == 1 && grad_out.size(0) == hidden.size(0), op_name,
                    ": grad must be [N] with N = ", hidden.size(0), ", got ", grad_out.sizes());
  const at::ScalarType dtype = compute_dtype(hidden, weight);
  // Ignored rows keep a zero gradient, so start from zeros and fill labelled rows only.
  at::Tensor grad_hidden = hidden_requires_grad ? at::zeros(hidden.sizes(), hidden.options())
                                                : at::empty({0}, hidden.options());
  // A trainable weight's gradient accumulates in the compute dtype across chunks and is cast
  // to the weight dtype once at the end (a bf16 running sum would lose small chunks).
  at::Tensor grad_weight = weight_requires_grad
                               ? at::zeros(weight.sizes(), weight.options().dtype(dtype))
                               : at::empty({0}, weight.options());
  if (!hidden_requires_grad && !weight_requires_grad) {
    return {grad_hidden, grad_weight};
  }
  at::Tensor positions =
      labelled_positions(op_name, targets, ignore_index, weight.size(0), num_labelled);
  for (int64_t start = 0; start < positions.size(0); start += chunk_size) {
    const at::Tensor rows = positions.slice(0, start, start + chunk_size);
    const at::Tensor chunk_hidden = hidden.index_select(0, rows).to(dtype);
    at::Tensor logits = project(chunk_hidden, weight);
    // d(sign * logprob) / d logits = sign * (onehot(target) - softmax(logits)), built in
    // place in the logits buffer so a chunk never holds two [chunk, V] tensors.
    const at::Tensor scale = grad_out.index_select(0, rows).to(dtype).mul(sign).unsqueeze(1);
    softmax_in_place(logits);
    at::Tensor& grad_logits = logits.mul_(scale.neg());
    grad_logits.scatter_add_(1, targets.index_select(0, rows).unsqueeze(1), scale);
    if (hidden_requires_grad) {
      grad_hidden.index_copy_(0, rows,
                              project_back(grad_logits, weight).to(hidden.scalar_type()));
    }
    if (weight_requires_grad) {
      grad_weight.addmm_(grad_logits.t(), chunk_hidden);
    }
  }
  return {grad_hidden, weight_requires_grad ? grad_weight.to(weight.scalar_type()) : grad_weight};
}

}  // namespace multitune
