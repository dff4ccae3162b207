// Deterministic packing of examples into fixed-capacity bins, spread over data-parallel ranks.
//
// 1. Examples are sorted longest first (ties: a seeded hash, then index) and dealt to ranks
//    largest first onto the least-loaded rank. Dealing examples rather than whole bins bounds
//    the token gap between any two ranks by one example's length: when the heaviest rank got
//    its last example it was the lightest.
// 2. Each rank packs its examples best-fit-decreasing: an example goes to the open bin with the
//    least remaining space that still fits it (an ordered set keyed by remaining space), else
//    to a new bin. O(n log n) overall.
// 3. Every rank must run the same number of steps, so ranks with fewer bins than the busiest
//    split their fullest multi-example bin in two until the counts match (splitting never
//    exceeds capacity and never moves an example across ranks). Only when a rank has fewer
//    examples than steps does it get empty bins; a caller runs those as zero-token steps.
// 4. Each rank's bin order is shuffled with the seed, so long examples do not all come first.
//
// The seed only breaks ties and orders bins; src/multitune/ops/packing.py holds a plain Python
// copy of this algorithm that must produce identical plans.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <numeric>
#include <queue>
#include <set>
#include <utility>
#include <vector>

#include "ops.h"

namespace multitune {
namespace {

using Bin = std::vector<int64_t>;  // example indices, in packing order

constexpr uint64_t kShuffleSalt = 0x5EED5EED5EED5EEDULL;

// splitmix64's output function: a portable 64-bit mix (std:: distributions are not portable).
uint64_t mix64(uint64_t x) {
  uint64_t z = x + 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

uint64_t hash_pair(uint64_t a, uint64_t b) { return mix64(mix64(a) ^ b); }

std::vector<int64_t> read_lengths(const at::Tensor& lengths, int64_t capacity) {
  TORCH_CHECK_VALUE(lengths.dim() == 1, "plan_packing: lengths must be 1-D, got shape ",
                    lengths.sizes());
  TORCH_CHECK_VALUE(at::isIntegralType(lengths.scalar_type(), /*includeBool=*/false),
                    "plan_packing: lengths must be integers, got ", lengths.scalar_type());
  const at::Tensor host = lengths.to(at::kCPU, at::kLong).contiguous();
  const int64_t* data = host.data_ptr<int64_t>();
  std::vector<int64_t> out(data, data + host.numel());
  for (size_t i = 0; i < out.size(); ++i) {
    TORCH_CHECK_VALUE(out[i] >= 0, "plan_packing: example ", i, " has negative length ",
                      out[i]);
    TORCH_CHECK_VALUE(out[i] <= capacity, "plan_packing: example ", i, " has length ", out[i],
                      ", longer than the packing capacity ", capacity,
                      "; truncate it or raise the capacity");
  }
  return out;
}

// Longest first; equal lengths in a seed-dependent but platform-independent order.
std::vector<int64_t> packing_order(const std::vector<int64_t>& lengths, uint64_t seed) {
  std::vector<uint64_t> tie_key(lengths.size());
  for (size_t i = 0; i < lengths.size(); ++i) {
    tie_key[i] = hash_pair(seed, i);
  }
  std::vector<int64_t> order(lengths.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    if (lengths[a] != lengths[b]) return lengths[a] > lengths[b];
    if (tie_key[a] != tie_key[b]) return tie_key[a] < tie_key[b];
    return a < b;
  });
  return order;
}

std::vector<std::vector<int64_t>> deal_to_ranks(const std::vector<int64_t>& order,
                                                const std::vector<int64_t>& lengths,
                                                int64_t num_ranks) {
  using Load = std::pair<int64_t, int64_t>;  // (tokens, rank): ties go to the lower rank
  std::priority_queue<Load, std::vector<Load>, std::greater<Load>> lightest;
  for (int64_t rank = 0; rank < num_ranks; ++rank) lightest.push({0, rank});
  std::vector<std::vector<int64_t>> per_rank(num_ranks);
  for (int64_t example : order) {
    auto [tokens, rank] = lightest.top();
    lightest.pop();
    per_rank[rank].push_back(example);
    lightest.push({tokens + lengths[example], rank});
  }
  return per_rank;
}

std::vector<Bin> best_fit_decreasing(const std::vector<int64_t>& examples,
                                     const std::vector<int64_t>& lengths, int64_t capacity) {
  std::vector<Bin> bins;
  std::set<std::pair<int64_t, int64_t>> open;  // (remaining space, bin id)
  for (int64_t example : examples) {
    const int64_t length = lengths[example];
    auto fit = open.lower_bound({length, -1});
    if (fit == open.end()) {
      bins.push_back({example});
      open.insert({capacity - length, static_cast<int64_t>(bins.size()) - 1});
      continue;
    }
    // Re-key the node in place: no allocation per example.
    auto node = open.extract(fit);
    bins[node.value().second].push_back(example);
    node.value().first -= length;
    open.insert(std::move(node));
  }
  return bins;
}

int64_t bin_tokens(const Bin& bin, const std::vector<int64_t>& lengths) {
  int64_t total = 0;
  for (int64_t example : bin) total += lengths[example];
  return total;
}

// Splits the fullest multi-example bin (ties: lowest id) until there are num_bins bins; each
// example goes to the lighter half (ties: the first), the first half keeps the bin's place.
void split_to_count(std::vector<Bin>& bins, size_t num_bins, const std::vector<int64_t>& lengths) {
  using Candidate = std::pair<int64_t, int64_t>;  // (tokens, -id): max-heap picks the fullest
  std::priority_queue<Candidate> splittable;
  for (size_t id = 0; id < bins.size(); ++id) {
    if (bins[id].size() >= 2) splittable.push({bin_tokens(bins[id], lengths), -int64_t(id)});
  }
  while (bins.size() < num_bins && !splittable.empty()) {
    const int64_t id = -splittable.top().second;
    splittable.pop();
    Bin first, second;
    int64_t first_tokens = 0, second_tokens = 0;
    for (int64_t example : bins[id]) {
      if (first_tokens <= second_tokens) {
        first.push_back(example);
        first_tokens += lengths[example];
      } else {
        second.push_back(example);
        second_tokens += lengths[example];
      }
    }
    bins[id] = std::move(first);
    bins.push_back(std::move(second));
    const int64_t new_id = static_cast<int64_t>(bins.size()) - 1;
    if (bins[id].size() >= 2) splittable.push({first_tokens, -id});
    if (bins[new_id].size() >= 2) splittable.push({second_tokens, -new_id});
  }
  bins.resize(num_bins);  // pads with empty bins when nothing is left to split
}

void shuffle_bins(std::vector<Bin>& bins, uint64_t seed, int64_t rank) {
  const uint64_t stream = hash_pair(seed ^ kShuffleSalt, static_cast<uint64_t>(rank));
  for (size_t i = bins.size(); i > 1; --i) {
    const size_t j = hash_pair(stream, i - 1) % i;
    std::swap(bins[i - 1], bins[j]);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> plan_packing(const at::Tensor& lengths, int64_t capacity,
                                                int64_t num_ranks, int64_t seed) {
  TORCH_CHECK_VALUE(capacity > 0, "plan_packing: capacity must be positive, got ", capacity);
  TORCH_CHECK_VALUE(num_ranks > 0, "plan_packing: num_ranks must be positive, got ",
                    num_ranks);
  const std::vector<int64_t> sizes = read_lengths(lengths, capacity);
  const uint64_t seed_bits = static_cast<uint64_t>(seed);

  const std::vector<int64_t> order = packing_order(sizes, seed_bits);
  std::vector<std::vector<Bin>> plan;
  size_t num_steps = 0;
  for (const std::vector<int64_t>& examples : deal_to_ranks(order, sizes, num_ranks)) {
    plan.push_back(best_fit_decreasing(examples, sizes, capacity));
    num_steps = std::max(num_steps, plan.back().size());
  }
  for (int64_t rank = 0; rank < num_ranks; ++rank) {
    split_to_count(plan[rank], num_steps, sizes);
    shuffle_bins(plan[rank], seed_bits, rank);
  }

  // Flat encoding (a schema cannot return nested lists): example indices rank-major, bin by
  // bin, plus the size of each of the num_ranks * num_steps bins.
  std::vector<int64_t> flat, bin_sizes;
  flat.reserve(sizes.size());
  for (const std::vector<Bin>& bins : plan) {
    for (const Bin& bin : bins) {
      flat.insert(flat.end(), bin.begin(), bin.end());
      bin_sizes.push_back(static_cast<int64_t>(bin.size()));
    }
  }
  auto as_tensor = [](const std::vector<int64_t>& values) {
    at::Tensor out = at::empty({static_cast<int64_t>(values.size())}, at::kLong);
    std::copy(values.begin(), values.end(), out.data_ptr<int64_t>());
    return out;
  };
  return {as_tensor(flat), as_tensor(bin_sizes)};
}

}  // namespace multitune
