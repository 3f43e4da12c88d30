#pragma once
// The attention op of docs/mta-semantics.md one query row at a time, for incremental decoding: a
// state per layer and sequence holds what the rows still to come will read, so a new token costs
// O(T * D) per head instead of recomputing the T x T matrices.
//
// What a new row i reads (everything else in the op is per row):
//   - logits S[i, j] = s q_i . k_j for j <= i: the keys (and, for the output, the values) of all
//     positions so far;
//   - kq_pre: rows i-cq+1 .. i of S0 (S with the future set to 0). The first causal mask is applied
//     before the convolution, so row ii of S0 reads only keys jj <= ii: whatever the key padding, a
//     row is final once computed and later tokens never change it. The last cq rows are kept;
//   - kq_post: rows i-cq+1 .. i of A (the softmax output, zero in the future), likewise final once
//     computed; the last cq rows are kept;
//   - head mixing, group norm, depth scaling and the gate read only row i.
// So the state is K and V of every position plus the last cq_pre rows of S0 and the last cq_post
// rows of A per head: per token O(T * D + (cq_pre * ck_pre + cq_post * ck_post + g) * T) per head.
#include <vector>

#include "attention/attention_op.h"

namespace mta {

template <typename T>
class MtaIncremental {
 public:
  // H = spec.heads query/key heads of dim spec.head_dim, and value_heads value heads of dim value_dim;
  // query head h reads value head h / (H / value_heads) (DIFF attention: two sub-heads share one).
  MtaIncremental(const AttentionSpec& spec, int value_heads, int value_dim);

  int length() const { return len_; }  // positions appended so far
  void reset();

  // Appends position t = length() with its key k [H*D] (RoPE applied) and value v [value_heads*value_dim],
  // and computes its output row out [H*value_dim] from its query q [H*D] (all heads of one token,
  // head-major within the token). Equals row t of mta_forward over positions 0..t.
  void step(const T* q, const T* k, const T* v, const AttnParams<T>& p, T* out);

 private:
  AttentionSpec spec_;
  int H_, D_, Hv_, Dv_;
  int len_ = 0;
  std::vector<T> keys_, values_;  // [t][H][D], [t][Hv][Dv]
  // Ring of the last cq rows of S0 (kq_pre) and of A (kq_post), per head: row ii sits in slot ii % cq.
  std::vector<std::vector<std::vector<T>>> pre_rows_, post_rows_;  // [H][cq][row]
  std::vector<std::vector<T>> x_, y_;  // per-head working rows, length t + 1
};

}  // namespace mta
