// Weight-only quantized matmul for XLA:CPU: y[M, O] = x[M, I] . dequantize(q, s)[I, O].
//
// The layout is llm_jax.ops.quant's: q int8 [I, O] (bits 8) or packed int4 [I / 2, O]
// (input 2p in the low nibble of row p, 2p + 1 in the high one), s float32 [G, O] with one
// scale per group of I / G consecutive inputs. The kernel reads every weight byte once and
// never writes a float copy of the weights: the output columns are cut into chunks (at
// most 2048 wide); for a chunk, the weight rows stream through in steps of 8 contiguous
// row segments, each converted to float in registers and multiplied into the sums of all
// M rows of x (kept in L1/L2), group by group, the group's sums scaled into the total.
// Chunks are shared out dynamically (an atomic counter) between the caller and XLA's
// intra-op thread pool, so a worker that the OS delays does not hold the others up.
//
// GCC/Clang vector extensions keep it portable (AVX2, AVX-512, NEON: whatever
// -march=native offers).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

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

// acc[m, :] += x[m, r0 : r1] . w[r0 : r1, c0 : c1] for every m; acc is [M, c1 - c0].
// Rows go kStep at a time and each row segment is read once for all M rows of x, so the
// weights stream through contiguous runs of c1 - c0 bytes (or half that for int4).
void accumulate(const Problem& p, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                float* __restrict acc) {
  const int64_t width = c1 - c0, vec_end = c0 + (width / 8) * 8;
  int64_t r = r0;
  for (; r + kStep <= r1; r += kStep) {
    v8f xb[kMaxRows][kStep];
    for (int64_t mi = 0; mi < p.m; ++mi)
      for (int k = 0; k < kStep; ++k) xb[mi][k] = v8f{} + p.x[mi * p.i + r + k];
    for (int64_t c = c0; c < vec_end; c += 8) {
      v8f w[kStep];
      rows_at(p, r, c, w);
      for (int64_t mi = 0; mi < p.m; ++mi) {
        float* a = acc + mi * width + (c - c0);
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
          acc[mi * width + (c - c0)] += p.x[mi * p.i + r + k] * weight(p, r + k, c);
  }
  for (; r < r1; ++r)  // a group's last (size % kStep) rows
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t mi = 0; mi < p.m; ++mi)
        acc[mi * width + (c - c0)] += p.x[mi * p.i + r] * weight(p, r, c);
}

// y[:, c0 : c1]. Per channel (G = 1) the sums are scaled once at the end; with groups,
// each group's sums are scaled into the total.
void column_chunk(const Problem& p, int64_t c0, int64_t c1, float* total, float* part) {
  const int64_t width = c1 - c0, group = p.i / p.g;
  std::fill(total, total + p.m * width, 0.0f);
  for (int64_t gi = 0; gi < p.g; ++gi) {
    float* sums = p.g == 1 ? total : part;
    if (p.g > 1) std::fill(part, part + p.m * width, 0.0f);
    accumulate(p, gi * group, (gi + 1) * group, c0, c1, sums);
    if (p.g == 1) break;
    const float* scale = p.s + gi * p.o + c0;
    for (int64_t mi = 0; mi < p.m; ++mi)
      for (int64_t c = 0; c < width; ++c) total[mi * width + c] += part[mi * width + c] * scale[c];
  }
  for (int64_t mi = 0; mi < p.m; ++mi)
    for (int64_t c = 0; c < width; ++c)
      p.y[mi * p.o + c0 + c] = p.g == 1 ? total[mi * width + c] * p.s[c0 + c] : total[mi * width + c];
}

// Takes column chunks from `next` until none is left.
void work(const Problem& p, std::atomic<int64_t>* next, int64_t chunk) {
  std::unique_ptr<float[]> total(new float[p.m * chunk]), part(new float[p.m * chunk]);
  const int64_t chunks = (p.o + chunk - 1) / chunk;
  for (int64_t b = next->fetch_add(1); b < chunks; b = next->fetch_add(1)) {
    column_chunk(p, b * chunk, std::min(p.o, (b + 1) * chunk), total.get(), part.get());
  }
}

// What a call shares with its helpers; they own it too, so a helper that starts after the
// call returned touches only this (and leaves at once: `closed`).
struct Shared {
  Shared(const Problem& p, int64_t chunk) : p(p), chunk(chunk) {}
  const Problem p;
  const int64_t chunk;
  std::atomic<int64_t> next{0}, active{0};
  std::atomic<bool> closed{false};
};

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
  // Two chunks a thread (so a delayed worker's share is picked up), multiples of 64
  // columns, at most 2048 (the sums of one chunk stay in L1/L2).
  int64_t chunk = (p.o + 2 * threads - 1) / (2 * threads);
  chunk = std::min<int64_t>(std::max<int64_t>((chunk + 63) / 64 * 64, 64), 2048);
  const int64_t chunks = (p.o + chunk - 1) / chunk;
  // Helpers from XLA's pool join in, the caller works too, then waits only for helpers
  // that have started: one still queued (its pool thread may be running another kernel
  // that waits in turn) finds the call closed and leaves, so no call waits on the queue.
  auto shared = std::make_shared<Shared>(p, chunk);
  const int64_t helpers = std::min<int64_t>(threads - 1, chunks - 1);
  for (int64_t h = 0; h < helpers; ++h) {
    pool.Schedule([shared] {
      shared->active.fetch_add(1);
      if (!shared->closed.load()) work(shared->p, &shared->next, shared->chunk);
      shared->active.fetch_sub(1);
    });
  }
  work(p, &shared->next, chunk);
  shared->closed.store(true);
  while (shared->active.load() > 0) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmJaxQMatmul, QMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits"));
