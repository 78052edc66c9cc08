// The thread pool the kernel's ranges run on: torch's OpenMP team by default, or a help-first pool.
#pragma once
#include "common.h"

namespace {

// ---------------------------------------------------------------------------------------------
// A help-first thread pool. Work is cut into tasks (the kernel: one range of kept rows per
// thread; stream_read: 128 KiB chunks) that threads claim one at a time; the caller works too
// and then waits only for tasks *in progress*, never for a helper that has not started. On a
// machine shared with other jobs a helper thread is often not running when a call begins; with
// a fork-join region (OpenMP) every call -- seven per layer -- then waits for the scheduler to run it, which made 2 threads slower than 1 under load.
class Pool {
 public:
  // Runs fn(slot, task) for every task in [0, n) on the caller and up to `helpers` helpers;
  // slot < helpers + 1 tells which thread runs it (for per-thread sums).
  void run(int helpers, int64_t n, const std::function<void(int, int64_t)>& fn) {
    if (helpers <= 0 || n <= 1) {
      for (int64_t c = 0; c < n; ++c) fn(0, c);
      return;
    }
    if (use_openmp_team()) {  // torch's own OpenMP team (see use_openmp_team)
      std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(helpers + 1)
      {
        const int slot = omp_get_thread_num();
        int64_t c;
        while ((c = next.fetch_add(1)) < n) fn(slot, c);
      }
      return;
    }
    ensure(helpers);
    std::lock_guard<std::mutex> serial(call_mutex_);  // one job at a time (calls from several Python threads)
    fn_ = &fn;
    n_ = n;
    max_slots_ = helpers + 1;
    next_.store(0);
    slots_.store(1);
    const uint64_t g = (state_.load() >> 1) + 1;
    state_.store((g << 1) | 1);  // open: helpers may join from here on
    if (sleeping_.load() > 0) {
      std::lock_guard<std::mutex> lk(m_);
      cv_.notify_all();
    }
    work(0);
    state_.store(g << 1);  // closed: helpers that have not joined yet stay out
    while (pending_.load() != 0) _spin();
  }

 private:
  // By default chunks are claimed by the threads of an OpenMP parallel region. The extension
  // links the libgomp that torch loaded (same soname), so the region reuses torch's worker
  // threads, which keep spinning for a while after each torch op: a helper thread of our own
  // would wait for the core they hold, and most calls would run on one thread. On a quiet
  // 2-core Xeon this took compiled TEAL 50% decoding of the 135M default model from 23 to
  // 30-35 tok/s (docs/benchmarks.md).
  // ACTSCOPE_KERNEL_POOL=own (read once) selects the help-first pool below instead, which never
  // waits for a thread that the scheduler has not run: better on an oversubscribed machine.
  static bool use_openmp_team() {
    static const bool on = [] {
      const char* env = std::getenv("ACTSCOPE_KERNEL_POOL");
      return env == nullptr || std::string(env) != "own";
    }();
    return on;
  }

  static void _spin() {
#ifdef ACTSCOPE_X86
    _mm_pause();
#else
    std::this_thread::yield();
#endif
  }

  void work(int slot) {
    int64_t c;
    while ((c = next_.fetch_add(1)) < n_) (*fn_)(slot, c);
  }

  void ensure(int helpers) {
    std::lock_guard<std::mutex> lk(start_mutex_);
    while (static_cast<int>(threads_.size()) < helpers) {
      threads_.emplace_back([this] { loop(); });
      threads_.back().detach();  // lives as long as the process
    }
  }

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      uint64_t s = state_.load();
      for (int i = 0; (s >> 1) == seen || !(s & 1); ++i) {  // wait for a new open job
        if (i < 4000) {
          _spin();
        } else {
          std::unique_lock<std::mutex> lk(m_);
          sleeping_.fetch_add(1);
          cv_.wait_for(lk, std::chrono::milliseconds(50), [&] {
            const uint64_t t = state_.load();
            return (t >> 1) != seen && (t & 1);
          });
          sleeping_.fetch_sub(1);
          i = 0;
        }
        s = state_.load();
      }
      seen = s >> 1;
      pending_.fetch_add(1);
      if (state_.load() == s) {  // still open: join it (the caller now waits for this thread)
        const int slot = slots_.fetch_add(1);
        if (slot < max_slots_) work(slot);
      }
      pending_.fetch_sub(1);
    }
  }

  int max_slots_ = 1;
  std::mutex call_mutex_, start_mutex_, m_;
  std::condition_variable cv_;
  std::vector<std::thread> threads_;
  std::atomic<uint64_t> state_{0};
  std::atomic<int64_t> next_{0};
  std::atomic<int> pending_{0}, sleeping_{0}, slots_{1};
  const std::function<void(int, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: its threads outlive static destruction
  return *p;
}

}  // namespace
