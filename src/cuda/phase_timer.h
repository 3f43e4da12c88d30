#pragma once
// Where a GPU training step spends its time, by phase, measured with CUDA events on the model's
// stream (no host synchronization inside the step). Off unless MTA_CUDA_PROFILE=1; then the model
// prints a table to stderr when it is destroyed (e.g. at the end of `mta bench train`). Time between
// two marks goes to the phase named by the later one; it includes any time the GPU waited for the
// host to launch work. Each timeline (begin .. collect) sums its phases; the table reports the median
// over timelines, so first-call costs (cuBLASLt algorithm choice, allocations) drop out.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "cuda/check.h"

namespace mta::cuda {

class PhaseTimer {
 public:
  // `title` heads the table: what one timeline is.
  explicit PhaseTimer(const char* title = "one per forward/backward, clip, step") : title_(title) {
    const char* e = std::getenv("MTA_CUDA_PROFILE");
    on_ = e != nullptr && std::string(e) == "1";
  }
  ~PhaseTimer() {
    if (!on_) return;
    report();
    for (auto ev : pool_) cudaEventDestroy(ev);
  }
  PhaseTimer(const PhaseTimer&) = delete;
  PhaseTimer& operator=(const PhaseTimer&) = delete;

  bool on() const { return on_; }
  // Starts a step's timeline (records its first event).
  void begin(cudaStream_t s) {
    if (!on_) return;
    marks_.clear();
    record("", s);
  }
  // The phase `name` ends here.
  void mark(const char* name, cudaStream_t s) {
    if (on_) record(name, s);
  }
  // Adds the timeline's phase times to the totals (waits for its last event).
  void collect() {
    if (!on_ || marks_.size() < 2) return;
    MTA_CUDA_CHECK(cudaEventSynchronize(pool_[marks_.size() - 1]));
    std::map<std::string, Total> step;
    for (size_t i = 1; i < marks_.size(); ++i) {
      float ms = 0;
      MTA_CUDA_CHECK(cudaEventElapsedTime(&ms, pool_[i - 1], pool_[i]));
      step[marks_[i]].ms += ms, step[marks_[i]].calls += 1;
    }
    for (const auto& [name, t] : step) {
      auto& h = history_[name];
      if (h.empty()) order_.push_back(name);
      h.push_back(t);
    }
    marks_.clear();
  }

 private:
  struct Total {
    double ms = 0;
    long long calls = 0;
  };
  void record(const char* name, cudaStream_t s) {
    const size_t i = marks_.size();
    if (i == pool_.size()) {
      cudaEvent_t ev;
      MTA_CUDA_CHECK(cudaEventCreate(&ev));
      pool_.push_back(ev);
    }
    MTA_CUDA_CHECK(cudaEventRecord(pool_[i], s));
    marks_.push_back(name);
  }
  static Total median(std::vector<Total> v) {
    std::sort(v.begin(), v.end(), [](const Total& a, const Total& b) { return a.ms < b.ms; });
    return v[v.size() / 2];
  }
  void report() const {
    std::map<std::string, Total> med;
    double all = 0;
    for (const auto& [n, h] : history_) med[n] = median(h), all += med[n].ms;
    if (all <= 0) return;
    std::fprintf(stderr, "# MTA_CUDA_PROFILE: GPU time by phase, median over timelines (%s)\n", title_.c_str());
    std::fprintf(stderr, "%-28s %10s %8s %8s %7s\n", "phase", "ms", "calls", "samples", "share");
    for (const auto& n : order_) {
      const Total& t = med.at(n);
      std::fprintf(stderr, "%-28s %10.3f %8lld %8zu %6.1f%%\n", n.c_str(), t.ms, t.calls, history_.at(n).size(),
                   100.0 * t.ms / all);
    }
  }

  std::string title_;
  bool on_ = false;
  std::vector<cudaEvent_t> pool_;
  std::vector<std::string> marks_;
  std::map<std::string, std::vector<Total>> history_;  // per phase: its sum in each timeline
  std::vector<std::string> order_;
};

}  // namespace mta::cuda
