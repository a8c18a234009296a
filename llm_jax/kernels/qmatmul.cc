// Weight-only quantized matmul for XLA:CPU: y[M, O] = x[M, I] . dequantize(q, s)[I, O].
//
// The layout is llm_jax.ops.quant's: q int8 [I, O] (bits 8) or packed int4 [I / 2, O]
// (input 2p in the low nibble of row p, 2p + 1 in the high one), s float32 [G, O] with one
// scale per group of I / G consecutive inputs. The kernel reads every weight byte once and
// never writes a float copy of the weights: the weight rows stream through in steps of 8,
// each row segment converted to float in registers and multiplied into the sums of all M
// rows of x (kept in L1/L2), group by group, the group's sums scaled into the total. The
// work is cut into column chunks (whole rows at decode) times row slices, and the tasks
// are shared out dynamically (an atomic counter) between the caller and the kernel's own
// crew of worker threads (one per extra thread of XLA's intra-op pool), so a worker that
// the OS delays does not hold the others up.
//
// GCC/Clang vector extensions keep it portable (AVX2, AVX-512, NEON: whatever
// -march=native offers).

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef int8_t v8b __attribute__((vector_size(8)));


inline v8i load8(const int8_t* p) {
#ifdef __AVX2__
  // GCC's generic conversion of an 8-byte vector goes lane by lane; one vpmovsxbd does it.
  return (v8i)_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
#else
  v8b b;
  std::memcpy(&b, p, sizeof(b));
  return __builtin_convertvector(b, v8i);
#endif
}

inline v8f loadf(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void storef(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }

struct Problem {
  const float* x;   // [M, I]
  const int8_t* q;  // [I / pack, O]
  const float* s;   // [G, O]
  float* y;         // [M, O]
  int64_t m, i, o, g, bits;
};

constexpr int64_t kMaxRows = 64;  // M the kernel takes (the Python side dispatches)

constexpr int kStep = 8;  // weight rows per pass over the sums

// The values of weight rows r .. r + kStep - 1 at columns c .. c + 7, as floats.
inline void rows_at(const Problem& p, int64_t r, int64_t c, v8f w[kStep]) {
  if (p.bits == 8) {
    const int8_t* base = p.q + r * p.o + c;
    for (int k = 0; k < kStep; ++k) w[k] = __builtin_convertvector(load8(base + k * p.o), v8f);
    return;
  }
  const int8_t* base = p.q + (r / 2) * p.o + c;  // packed rows r / 2, r / 2 + 1, ...
  for (int k = 0; k < kStep / 2; ++k) {
    v8i b = load8(base + k * p.o);
    w[2 * k] = __builtin_convertvector((b << 28) >> 28, v8f);
    w[2 * k + 1] = __builtin_convertvector(b >> 4, v8f);
  }
}

inline float weight(const Problem& p, int64_t r, int64_t c) {
  if (p.bits == 8) return p.q[r * p.o + c];
  const int8_t b = p.q[(r / 2) * p.o + c];
  return (r % 2) ? (b >> 4) : static_cast<int8_t>(b << 4) >> 4;
}

// acc[m, :] += x[m, r0 : r1] . w[r0 : r1, c0 : c1] for every m; acc is [M, ld] from
// column c0. Rows go kStep at a time and each row segment is read once for all M rows of
// x. The next kStep rows are prefetched as these are read: the rows of a block are not
// one contiguous run unless c0 : c1 spans the row, and the hardware prefetchers lose
// track of eight interleaved short runs (a 3072 x 768 weight read 1.5x faster with it).
void accumulate(const Problem& p, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                float* __restrict acc, int64_t ld) {
  const int64_t width = c1 - c0, vec_end = c0 + (width / 8) * 8;
  const int pack = p.bits == 4 ? 2 : 1;
  int64_t r = r0;
  for (; r + kStep <= r1; r += kStep) {
    v8f xb[kMaxRows][kStep];
    for (int64_t mi = 0; mi < p.m; ++mi)
      for (int k = 0; k < kStep; ++k) xb[mi][k] = v8f{} + p.x[mi * p.i + r + k];
    const bool fetch = r + 2 * kStep <= p.i;
    for (int64_t c = c0; c < vec_end; c += 8) {
      if (fetch && (c - c0) % 64 == 0)
        for (int k = 0; k < kStep / pack; ++k)
          __builtin_prefetch(p.q + ((r + kStep) / pack + k) * p.o + c, 0, 1);
      v8f w[kStep];
      rows_at(p, r, c, w);
      for (int64_t mi = 0; mi < p.m; ++mi) {
        float* a = acc + mi * ld + (c - c0);
        v8f even = loadf(a), odd = xb[mi][1] * w[1];
        even += xb[mi][0] * w[0];
        for (int k = 2; k < kStep; k += 2) {
          even += xb[mi][k] * w[k];
          odd += xb[mi][k + 1] * w[k + 1];
        }
        storef(a, even + odd);
      }
    }
    for (int64_t c = vec_end; c < c1; ++c)
      for (int64_t mi = 0; mi < p.m; ++mi)
        for (int k = 0; k < kStep; ++k)
          acc[mi * ld + (c - c0)] += p.x[mi * p.i + r + k] * weight(p, r + k, c);
  }
  for (; r < r1; ++r)  // a group's last (size % kStep) rows
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t mi = 0; mi < p.m; ++mi)
        acc[mi * ld + (c - c0)] += p.x[mi * p.i + r] * weight(p, r, c);
}

// out[m, c0 : c1] = x[m, r0 : r1] . w[r0 : r1, c0 : c1], out [M, ld]: with groups (r0, r1
// on group bounds) each group's sums are scaled in; per channel they are left unscaled.
// `sums` holds M * (c1 - c0) floats.
void partial(const Problem& p, int64_t r0, int64_t r1, int64_t c0, int64_t c1, float* out,
             int64_t ld, float* sums) {
  const int64_t width = c1 - c0;
  for (int64_t mi = 0; mi < p.m; ++mi) std::fill(out + mi * ld, out + mi * ld + width, 0.0f);
  if (p.g == 1) return accumulate(p, r0, r1, c0, c1, out, ld);
  const int64_t group = p.i / p.g;
  for (int64_t gi = r0 / group; gi < r1 / group; ++gi) {
    std::fill(sums, sums + p.m * width, 0.0f);
    accumulate(p, gi * group, (gi + 1) * group, c0, c1, sums, width);
    const float* scale = p.s + gi * p.o + c0;
    for (int64_t mi = 0; mi < p.m; ++mi)
      for (int64_t c = 0; c < width; ++c) out[mi * ld + c] += sums[mi * width + c] * scale[c];
  }
}

// How a call is cut into tasks: column chunks (as wide as the sums of all M rows allow in
// L2, so at decode a task reads whole weight rows, one contiguous run) times row slices
// (so the threads share a weight even when it has one chunk). A slice's sums go to its
// own [M, O] buffer; whoever finishes a chunk's last slice adds the slices up into y.
struct Plan {
  int64_t width, chunks, slices, slice_rows;
};

constexpr int64_t kSumFloats = 32768;  // the sums of a task: 128 KiB, half of an L2

Plan plan(const Problem& p, int64_t threads) {
  Plan plan;
  plan.width = std::min(p.o, std::max<int64_t>(64, kSumFloats / p.m / 64 * 64));
  plan.chunks = (p.o + plan.width - 1) / plan.width;
  // Slices start on group bounds (on kStep rows per channel); two tasks a thread, so a
  // thread the OS delays leaves its second task to the others.
  const int64_t align = p.g > 1 ? p.i / p.g : kStep, units = (p.i + align - 1) / align;
  plan.slices = threads == 1 ? 1
                : std::min(units, std::max<int64_t>(1, (2 * threads + plan.chunks - 1) / plan.chunks));
  plan.slice_rows = (units + plan.slices - 1) / plan.slices * align;
  plan.slices = (p.i + plan.slice_rows - 1) / plan.slice_rows;
  return plan;
}

// One call's tasks, taken by the caller and the crew until none is left.
struct Call {
  Call(const Problem& p, const Plan& plan, float* parts)
      : p(p), plan(plan), parts(parts), done(new std::atomic<int64_t>[plan.chunks]) {
    for (int64_t c = 0; c < plan.chunks; ++c) done[c].store(0);
  }

  void operator()() {
    thread_local std::vector<float> sums;
    sums.resize(p.m * plan.width);
    for (int64_t t = next.fetch_add(1); t < plan.chunks * plan.slices; t = next.fetch_add(1))
      Task(t / plan.slices, t % plan.slices, sums.data());
  }

  void Task(int64_t chunk, int64_t slice, float* sums) {
    const int64_t c0 = chunk * plan.width, c1 = std::min(p.o, c0 + plan.width);
    const int64_t r0 = slice * plan.slice_rows, r1 = std::min(p.i, r0 + plan.slice_rows);
    if (plan.slices == 1) {
      partial(p, r0, r1, c0, c1, p.y + c0, p.o, sums);
      if (p.g == 1) Scale(c0, c1);
      return;
    }
    partial(p, r0, r1, c0, c1, parts + slice * p.m * p.o + c0, p.o, sums);
    // The chunk's last slice adds all up; the counter's order makes the others' sums
    // visible to it.
    if (done[chunk].fetch_add(1) + 1 < plan.slices) return;
    for (int64_t mi = 0; mi < p.m; ++mi) {
      float* y = p.y + mi * p.o;
      std::copy(parts + mi * p.o + c0, parts + mi * p.o + c1, y + c0);
      for (int64_t sl = 1; sl < plan.slices; ++sl) {
        const float* part = parts + (sl * p.m + mi) * p.o;
        for (int64_t c = c0; c < c1; ++c) y[c] += part[c];
      }
    }
    if (p.g == 1) Scale(c0, c1);
  }

  void Scale(int64_t c0, int64_t c1) {  // per channel: y[:, c0 : c1] *= s[c0 : c1]
    for (int64_t mi = 0; mi < p.m; ++mi)
      for (int64_t c = c0; c < c1; ++c) p.y[mi * p.o + c] *= p.s[c];
  }

  const Problem& p;
  const Plan plan;
  float* const parts;  // [slices, M, O] when slices > 1
  std::atomic<int64_t> next{0};
  std::unique_ptr<std::atomic<int64_t>[]> done;  // finished slices of each chunk
};

// The workers that help a call. XLA's intra-op pool wakes a sleeping thread for every
// call (tens of microseconds) and a decode step makes ~70 short calls one after another,
// so the crew's threads spin a little (kSpin) after each call, then sleep on a futex.
// One call at a time has the crew; a call that finds it busy (XLA runs independent
// thunks concurrently) does its work alone.
class Crew {
 public:
  explicit Crew(int64_t workers) {
    for (int64_t w = 0; w < workers; ++w) std::thread([this] { Serve(); }).detach();
  }

  // Runs `job` on the caller and every worker; returns once none of them is in it.
  template <typename Job>
  void Run(Job& job) {
    if (busy_.exchange(true)) return job();
    job_ = &job;
    call_ = [](void* j) { (*static_cast<Job*>(j))(); };
    epoch_.fetch_add(1);
    if (sleepers_.load() > 0) epoch_.notify_all();
    job();
    // A worker that counted itself in before this store runs the job to its end; one
    // that comes later finds no job. (Dekker's pattern: both sides are seq_cst.)
    job_.store(nullptr);
    while (active_.load() > 0) Pause();
    busy_.store(false);
  }

 private:
  static constexpr auto kSpin = std::chrono::microseconds(200);

  static void Pause() {
#ifdef __x86_64__
    __builtin_ia32_pause();
#endif
  }

  void Serve() {
    uint64_t seen = epoch_.load();
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + kSpin;
      for (int i = 0; epoch_.load() == seen; ++i) {
        Pause();
        if (i % 64 == 63 && std::chrono::steady_clock::now() > until) {
          sleepers_.fetch_add(1);
          epoch_.wait(seen);
          sleepers_.fetch_sub(1);
        }
      }
      seen = epoch_.load();
      active_.fetch_add(1);
      if (void* job = job_.load()) call_(job);
      active_.fetch_sub(1);
    }
  }

  std::atomic<bool> busy_{false};
  std::atomic<void*> job_{nullptr};
  void (*call_)(void*) = nullptr;  // written before epoch_'s increment publishes it
  std::atomic<uint64_t> epoch_{0};
  std::atomic<int64_t> sleepers_{0}, active_{0};
};

// The crew, made at the first call with one worker per extra thread of XLA's pool, and
// never destroyed: its detached threads outlive every call.
Crew& TheCrew(int64_t threads) {
  static Crew* crew = new Crew(threads - 1);
  return *crew;
}

ffi::Error QMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                       ffi::Buffer<ffi::S8> q, ffi::Buffer<ffi::F32> s,
                       ffi::ResultBuffer<ffi::F32> y, int64_t bits) {
  auto xd = x.dimensions(), qd = q.dimensions(), sd = s.dimensions();
  if (xd.size() != 2 || qd.size() != 2 || sd.size() != 2)
    return ffi::Error::InvalidArgument("qmatmul takes x [M, I], q [Ip, O], s [G, O]");
  const int64_t pack = bits == 4 ? 2 : 1;
  Problem p{x.typed_data(), q.typed_data(), s.typed_data(), y->typed_data(),
            xd[0], xd[1], qd[1], sd[0], bits};
  if ((bits != 8 && bits != 4) || qd[0] * pack != p.i || sd[1] != p.o || p.g < 1 ||
      p.i % p.g || (bits == 4 && (p.i / p.g) % 2))
    return ffi::Error::InvalidArgument("qmatmul: inconsistent shapes or bits");
  if (p.m > kMaxRows) return ffi::Error::InvalidArgument("qmatmul: more than 64 rows");
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  // A weight under ~64K multiply-adds is not worth waking the crew for.
  const bool alone = threads == 1 || p.m * p.i * p.o < (int64_t{1} << 16);
  const Plan cut = plan(p, alone ? 1 : threads);
  thread_local std::vector<float> parts;  // the caller's: it outlives every task
  if (cut.slices > 1) parts.resize(cut.slices * p.m * p.o);
  Call call(p, cut, parts.data());
  if (alone) {
    call();
  } else {
    TheCrew(threads).Run(call);
  }
  return ffi::Error::Success();
}

// The float32 product for a few rows against an output-major weight, y[M, O] =
// x[M, I] . w[O, I]^T: each weight row (one contiguous run) is read once and dotted with
// all M rows of x, 8 lanes at a time. XLA:CPU reads the weights of such a product 2-3x
// slower than of a single row's (speculative verification, batch 8, beams); at one row its
// own dot is as fast as this.
struct FProblem {
  const float* x;  // [M, I]
  const float* w;  // [O, I]
  float* y;        // [M, O]
  int64_t m, i, o;
};

// y[m0 : m0 + MR, o : o + R]: R weight rows against MR rows of x, MR * R independent
// sums (enough to hide the FMA latency), each x load used R times.
template <int MR, int R>
inline void fblock(const FProblem& p, int64_t m0, int64_t o) {
  const int64_t vec_end = p.i / 8 * 8;
  const float* w = p.w + o * p.i;
  const float* x = p.x + m0 * p.i;
  v8f acc[MR][R] = {};
  for (int64_t c = 0; c < vec_end; c += 8) {
    v8f wv[R];
    if (m0 == 0 && c % 16 == 0)
      for (int r = 0; r < R; ++r) __builtin_prefetch(w + r * p.i + c + 256, 0, 0);
    for (int r = 0; r < R; ++r) wv[r] = loadf(w + r * p.i + c);
    for (int m = 0; m < MR; ++m) {
      const v8f xv = loadf(x + m * p.i + c);
      for (int r = 0; r < R; ++r) acc[m][r] += xv * wv[r];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < R; ++r) {
      float sum = 0.0f;
      for (int k = 0; k < 8; ++k) sum += acc[m][r][k];
      for (int64_t c = vec_end; c < p.i; ++c) sum += x[m * p.i + c] * w[r * p.i + c];
      p.y[(m0 + m) * p.o + o + r] = sum;
    }
}

// y[:, o0 : o1]: four weight rows at a time, each read from memory once (the passes over
// further rows of x find them in L1/L2; the first pass prefetches ahead within each row's
// stream, a hint that never faults past the end).
void fdots(const FProblem& p, int64_t o0, int64_t o1) {
  int64_t o = o0;
  for (; o + 4 <= o1; o += 4) {
    int64_t m = 0;
    if (p.m % 2) {  // an odd row count starts with three rows, not a pass of one
      if (p.m >= 3) {
        fblock<3, 4>(p, 0, o);
        m = 3;
      } else {
        fblock<1, 4>(p, 0, o);
        m = 1;
      }
    }
    for (; m + 2 <= p.m; m += 2) fblock<2, 4>(p, m, o);
  }
  for (; o < o1; ++o) {
    int64_t m = 0;
    for (; m + 2 <= p.m; m += 2) fblock<2, 1>(p, m, o);
    if (m < p.m) fblock<1, 1>(p, m, o);
  }
}

// One call's tasks (chunks of weight rows), taken by the caller and the crew.
struct FCall {
  void operator()() {
    for (int64_t t = next.fetch_add(1); t < tasks; t = next.fetch_add(1)) {
      const int64_t o0 = t * chunk;
      fdots(p, o0, std::min(p.o, o0 + chunk));
    }
  }

  const FProblem& p;
  const int64_t chunk, tasks;
  std::atomic<int64_t> next{0};
};

ffi::Error FMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                       ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("fmatmul takes x [M, I] and w [O, I]");
  FProblem p{x.typed_data(), w.typed_data(), y->typed_data(), xd[0], xd[1], wd[0]};
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  const bool alone = threads == 1 || p.m * p.i * p.o < (int64_t{1} << 16);
  // Four tasks a thread, at least 16 weight rows each.
  const int64_t chunk = std::max<int64_t>(16, (p.o + 4 * threads - 1) / (4 * threads));
  FCall call{p, chunk, (p.o + chunk - 1) / chunk};
  if (alone) {
    call();
  } else {
    TheCrew(threads).Run(call);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmJaxFMatmul, FMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmJaxQMatmul, QMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits"));
