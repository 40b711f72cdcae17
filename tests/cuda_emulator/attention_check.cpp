// Runs gptfast's CUDA attention kernels (fwd, bwd, decode) in the CPU emulator (emu.h),
// through their host launchers, and compares them with a float64 reference written here
// independently (causal softmax, dropout mask recomputed from Philox, gradients by the
// textbook formulas).  Plain host code: build.py links it with the emulated kernels.
// Usage: attention_check {fwd_bwd|decode} {quick|full}; exit status 0 iff every case is
// within tolerance (lse 1e-4; fp16 4e-3, bf16 3e-2, relative to max(1, |reference|max)).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "attention_common.cuh"
#include "check_main.h"
#include "philox.cuh"

using namespace gptfast::attention;

static float half_bits_to_float(uint16_t u, bool bf16) {
  if (bf16) {
    __nv_bfloat16 b;
    std::memcpy(&b, &u, 2);
    return __bfloat162float(b);
  }
  __half h;
  std::memcpy(&h, &u, 2);
  return __half2float(h);
}

static uint16_t to_bits(float f, bool bf16) {
  if (bf16) { __nv_bfloat16 b = __float2bfloat16_rn(f); uint16_t u; std::memcpy(&u, &b, 2); return u; }
  __half h = __float2half_rn(f); uint16_t u; std::memcpy(&u, &h, 2); return u;
}
static float from_bits(uint16_t u, bool bf16) { return half_bits_to_float(u, bf16); }

struct Tensor4 {  // logical (B, H, T, D) stored with a chosen layout
  int B, H, T, D; bool bthd; std::vector<uint16_t> data;
  Strides4 strides() const { return bthd ? Strides4{(int64_t)T * H * D, D, (int64_t)H * D} : Strides4{(int64_t)H * T * D, (int64_t)T * D, D}; }
  int64_t idx(int b, int h, int t, int d) const { auto s = strides(); return b * s.batch + h * s.head + t * s.token + d; }
};
static Tensor4 make(int B, int H, int T, int D, bool bthd, bool bf16, std::mt19937& rng) {
  Tensor4 x{B, H, T, D, bthd, std::vector<uint16_t>((size_t)B * H * T * D)};
  std::normal_distribution<float> n(0, 1);
  for (auto& v : x.data) v = to_bits(n(rng), bf16);
  return x;
}

static bool keep_ref(uint64_t seed, uint32_t bh, int i, int j, uint32_t thr) {
  uint4 r = gptfast::philox4x32_10(make_uint2((uint32_t)seed, (uint32_t)(seed >> 32)), make_uint4((uint32_t)j >> 1, (uint32_t)i >> 1, bh, 0));
  uint32_t w[4] = {r.x, r.y, r.z, r.w};
  return w[((i & 1) << 1) | (j & 1)] >= thr;
}

static int failures = 0;
// |got - ref|, or 1e30 where they differ in kind: a NaN or an infinity of the reference must come out
// exactly, and a number of the reference must come out a number (std::max would pass over a NaN).
static double diff(double got, double ref) {
  if (!std::isfinite(ref)) return (std::isnan(ref) ? std::isnan(got) : got == ref) ? 0.0 : 1e30;
  return std::isfinite(got) ? std::fabs(got - ref) : 1e30;
}
static double size_of(double ref) { return std::isfinite(ref) ? std::fabs(ref) : 0.0; }
static void report(const char* what, const std::string& cfg, double err, double mag, double tol) {
  bool ok = err <= tol * std::max(1.0, mag);
  if (!ok) ++failures;
  std::printf("%-5s %-48s max_err=%.3e max_ref=%.3e %s\n", what, cfg.c_str(), err, mag, ok ? "ok" : "FAIL");
}

// H query heads over Hkv key/value heads (grouped-query attention when Hkv < H).  `nan_rows`: the
// first query row of every head is NaN, so with dropout some of them have every weight dropped; the
// forward must keep them NaN (NaN * 0, as torch's dropout).  Their gradients reach keys a tile
// computes past the mask, which the reference here does not model, so only lse and out are compared.
// `nan_grads`: the first row of every head's upstream gradient is NaN: dQ of that row and dK of the keys it
// sees are NaN, and every other dQ/dK entry must stay finite (a key behind the mask gets no gradient from
// it).  dV is not compared: a tile multiplies its masked zeros by the NaN row, as the dense oracle does.
// `hidden_keys`: the first keys of every kv head are -inf in dimension 0, where every query is positive, so
// they score -inf (probability 0); the query tile's rows past Tq are zeros, which score NaN against them
// unless the kernel masks those rows.  Every query must see a later key: hidden_keys <= Tk - Tq.
static void run_case(bool bf16, int B, int H, int Hkv, int Tq, int Tk, int D, double p, bool bthd, bool nan_rows = false,
                     int hidden_keys = 0, bool nan_grads = false) {
  std::mt19937 rng(B * 1000 + Tq * 7 + Tk + D + H * 31 + Hkv);
  Tensor4 q = make(B, H, Tq, D, bthd, bf16, rng), k = make(B, Hkv, Tk, D, false, bf16, rng), v = make(B, Hkv, Tk, D, bthd, bf16, rng);
  if (nan_rows)
    for (int b = 0; b < B; ++b) for (int h = 0; h < H; ++h) q.data[q.idx(b, h, 0, 3)] = to_bits(NAN, bf16);
  for (int b = 0; b < B && hidden_keys > 0; ++b) {
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < Tq; ++i) q.data[q.idx(b, h, i, 0)] = to_bits(0.5f + std::fabs(from_bits(q.data[q.idx(b, h, i, 0)], bf16)), bf16);
    for (int hk = 0; hk < Hkv; ++hk)
      for (int j = 0; j < hidden_keys; ++j) k.data[k.idx(b, hk, j, 0)] = to_bits(-INFINITY, bf16);
  }
  const int group = H / Hkv;
  Tensor4 dout = make(B, H, Tq, D, bthd, bf16, rng);
  if (nan_grads)
    for (int b = 0; b < B; ++b) for (int h = 0; h < H; ++h) dout.data[dout.idx(b, h, 0, 3)] = to_bits(NAN, bf16);
  const float scale = 1.0f / std::sqrt((float)D);
  int64_t seed = 0x123456789abcLL;
  Dropout drop{p > 0, 0u, 1.f, &seed};
  if (p > 0) { drop.threshold = (uint32_t)(p * 4294967296.0); drop.inv_keep = (float)(1 / (1 - p)); }
  Shape shape{B, H, Hkv, Tq, Tk, D, bf16, scale};
  std::vector<uint16_t> out((size_t)B * H * Tq * D, 0xffff); std::vector<float> lse((size_t)B * H * Tq, NAN);
  FwdParams fp{shape, q.data.data(), k.data.data(), v.data.data(), q.strides(), k.strides(), v.strides(), out.data(), lse.data(), drop};
  if (launch_attention_fwd(fp, nullptr) != cudaSuccess) { std::printf("fwd launch failed\n"); ++failures; return; }
  std::vector<float> delta((size_t)B * H * Tq), dq((size_t)B * H * Tq * D, 0.f);
  std::vector<uint16_t> dk((size_t)B * Hkv * Tk * D, 0xffff), dv((size_t)B * Hkv * Tk * D, 0xffff);
  Strides4 oc{(int64_t)H * Tq * D, (int64_t)Tq * D, D};
  BwdParams bp{shape, q.data.data(), k.data.data(), v.data.data(), out.data(), dout.data.data(), q.strides(), k.strides(), v.strides(), oc, dout.strides(),
               lse.data(), delta.data(), dq.data(), dk.data(), dv.data(), drop};
  if (launch_attention_bwd(bp, nullptr) != cudaSuccess) { std::printf("bwd launch failed\n"); ++failures; return; }

  double el = 0, ml = 0, eo = 0, mo = 0, eq = 0, mq = 0, ek = 0, mk = 0, ev = 0, mv = 0;
  const int off = Tk - Tq;
  // dK/dV of each (b, kv head): the sums over its group's query heads.
  std::vector<double> dKall((size_t)B * Hkv * Tk * D, 0), dVall((size_t)B * Hkv * Tk * D, 0);
  for (int b = 0; b < B; ++b) for (int h = 0; h < H; ++h) {
    const uint32_t bh = b * H + h;
    const int hk = h / group;
    auto Q = [&](int i, int d) { return (double)from_bits(q.data[q.idx(b, h, i, d)], bf16); };
    auto K = [&](int j, int d) { return (double)from_bits(k.data[k.idx(b, hk, j, d)], bf16); };
    auto V = [&](int j, int d) { return (double)from_bits(v.data[v.idx(b, hk, j, d)], bf16); };
    auto G = [&](int i, int d) { return (double)from_bits(dout.data[dout.idx(b, h, i, d)], bf16); };
    std::vector<double> P((size_t)Tq * Tk, 0.0), M((size_t)Tq * Tk, 0.0), dS((size_t)Tq * Tk, 0.0);
    double* dK = dKall.data() + ((size_t)b * Hkv + hk) * Tk * D;
    double* dV = dVall.data() + ((size_t)b * Hkv + hk) * Tk * D;
    for (int i = 0; i < Tq; ++i) {
      double mx = -1e300;
      for (int j = 0; j <= off + i; ++j) { double s = 0; for (int d = 0; d < D; ++d) s += Q(i, d) * K(j, d); P[i * Tk + j] = s * scale; if (P[i * Tk + j] > mx) mx = P[i * Tk + j]; }
      double sum = 0;
      for (int j = 0; j <= off + i; ++j) { P[i * Tk + j] = std::exp(P[i * Tk + j] - mx); sum += P[i * Tk + j]; }
      for (int j = 0; j <= off + i; ++j) {
        P[i * Tk + j] /= sum;
        M[i * Tk + j] = p > 0 ? (keep_ref(seed, bh, i, j, drop.threshold) ? 1 / (1 - p) : 0.0) : 1.0;
      }
      // The saved log-sum-exp is in log2 units of scale*log2(e)*q.k.
      const double lse_ref = (mx + std::log(sum)) / std::log(2.0);
      el = std::max(el, diff(lse[bh * Tq + i], lse_ref));
      ml = std::max(ml, size_of(lse_ref));
      std::vector<double> o(D, 0), dP(Tk, 0);
      for (int j = 0; j <= off + i; ++j) for (int d = 0; d < D; ++d) o[d] += P[i * Tk + j] * M[i * Tk + j] * V(j, d);
      for (int d = 0; d < D; ++d) {
        double got = from_bits(out[((size_t)bh * Tq + i) * D + d], bf16);
        eo = std::max(eo, diff(got, o[d])); mo = std::max(mo, size_of(o[d]));
      }
      double dsum = 0;
      for (int j = 0; j <= off + i; ++j) { double x = 0; for (int d = 0; d < D; ++d) x += G(i, d) * V(j, d); dP[j] = x * M[i * Tk + j]; dsum += P[i * Tk + j] * dP[j]; }
      for (int j = 0; j <= off + i; ++j) dS[i * Tk + j] = P[i * Tk + j] * (dP[j] - dsum);
      for (int d = 0; d < D; ++d) {
        double x = 0; for (int j = 0; j <= off + i; ++j) x += dS[i * Tk + j] * K(j, d);
        x *= scale;
        eq = std::max(eq, diff(dq[((size_t)bh * Tq + i) * D + d], x)); mq = std::max(mq, size_of(x));
      }
      for (int j = 0; j <= off + i; ++j) for (int d = 0; d < D; ++d) {
        dK[j * D + d] += scale * dS[i * Tk + j] * Q(i, d);
        dV[j * D + d] += P[i * Tk + j] * M[i * Tk + j] * G(i, d);
      }
    }
  }
  for (size_t x = 0; x < dKall.size(); ++x) {
    double gk = from_bits(dk[x], bf16), gv = from_bits(dv[x], bf16);
    ek = std::max(ek, diff(gk, dKall[x])); mk = std::max(mk, size_of(dKall[x]));
    ev = std::max(ev, diff(gv, dVall[x])); mv = std::max(mv, size_of(dVall[x]));
  }
  char cfg[200];
  std::snprintf(cfg, sizeof cfg, "%s B%d H%d Hkv%d Tq%d Tk%d D%d p%.2f %s%s%s%s", bf16 ? "bf16" : "fp16", B, H, Hkv, Tq, Tk, D,
                p, bthd ? "bthd" : "bhtd", nan_rows ? " nan rows" : "", hidden_keys ? " -inf keys" : "",
                nan_grads ? " nan dO rows" : "");
  const double tol = bf16 ? 3e-2 : 4e-3;
  report("lse", cfg, el, ml, 1e-4);
  report("out", cfg, eo, mo, tol);
  if (nan_rows) return;
  report("dq", cfg, eq, mq, tol); report("dk", cfg, ek, mk, tol);
  if (!nan_grads) report("dv", cfg, ev, mv, tol);
}

// `poison`: a NaN in query head (0, 0), a NaN at one key of the last (batch, kv head) and +inf in the
// first key's value of (last batch, kv head 0), the key a chunk's padding slots would otherwise read.
// The reference's rows then hold NaN and inf, and the kernel must give exactly those.
static void run_decode(bool bf16, int B, int H, int Hkv, int Tk, int D, int sms, bool strided, bool poison = false) {
  std::mt19937 rng(Tk * 3 + D + sms + Hkv);
  const int Tmax = strided ? Tk + 24 : Tk, group = H / Hkv;
  Tensor4 q = make(B, H, 1, D, true, bf16, rng), k = make(B, Hkv, Tmax, D, false, bf16, rng), v = make(B, Hkv, Tmax, D, false, bf16, rng);
  if (poison) {
    q.data[q.idx(0, 0, 0, 3)] = to_bits(NAN, bf16);
    k.data[k.idx(B - 1, Hkv - 1, Tk / 2, 5)] = to_bits(NAN, bf16);
    v.data[v.idx(B - 1, 0, 0, 7)] = to_bits(INFINITY, bf16);
  }
  const float scale = 1.0f / std::sqrt((float)D);
  DecodeParams p{};
  p.shape = Shape{B, H, Hkv, 1, Tk, D, bf16, scale};
  decode_split((int64_t)B * H, Tk, sms, &p.splits, &p.chunk);
  std::vector<uint16_t> out((size_t)B * H * D, 0xffff);
  std::vector<float> acc((size_t)B * H * p.splits * D), mx((size_t)B * H * p.splits), sm((size_t)B * H * p.splits);
  p.q = q.data.data(); p.k = k.data.data(); p.v = v.data.data();
  p.q_stride = q.strides(); p.k_stride = k.strides(); p.v_stride = v.strides();
  p.out = out.data(); p.partial_acc = acc.data(); p.partial_max = mx.data(); p.partial_sum = sm.data();
  if (launch_decode_attention(p, nullptr) != cudaSuccess) { std::printf("decode launch failed\n"); ++failures; return; }
  double e = 0, m = 0;
  for (int b = 0; b < B; ++b) for (int h = 0; h < H; ++h) {
    std::vector<double> s(Tk); double best = -1e300;  // a NaN score is passed over here and spoils the sum
    for (int j = 0; j < Tk; ++j) { double x = 0; for (int d = 0; d < D; ++d) x += (double)from_bits(q.data[q.idx(b, h, 0, d)], bf16) * from_bits(k.data[k.idx(b, h / group, j, d)], bf16); s[j] = x * scale; if (s[j] > best) best = s[j]; }
    double sum = 0; for (auto& x : s) { x = std::exp(x - best); sum += x; }
    for (int d = 0; d < D; ++d) {
      double o = 0; for (int j = 0; j < Tk; ++j) o += s[j] / sum * from_bits(v.data[v.idx(b, h / group, j, d)], bf16);
      double got = from_bits(out[((size_t)b * H + h) * D + d], bf16);
      if (!std::isfinite(o)) {  // NaN where the reference has NaN, the same infinity where it has one
        if (std::isnan(o) ? !std::isnan(got) : got != o) e = 1e30;
        continue;
      }
      e = std::max(e, std::isfinite(got) ? std::fabs(got - o) : 1e30); m = std::max(m, std::fabs(o));
    }
  }
  char cfg[200];
  std::snprintf(cfg, sizeof cfg, "%s B%d H%d Hkv%d Tk%d D%d sms%d splits%d chunk%d%s%s", bf16 ? "bf16" : "fp16", B, H, Hkv, Tk, D, sms, p.splits, p.chunk, strided ? " strided" : "", poison ? " nan/inf" : "");
  report("dec", cfg, e, m, bf16 ? 3e-2 : 4e-3);
}

static void run_fwd_bwd_cases(bool full) {
  for (bool bf16 : {false, true}) {
    // (B, H, H_kv, Tq, Tk, D, dropout, (B,T,H,D) layout for q/v/dout)
    run_case(bf16, 1, 2, 2, 17, 17, 64, 0.0, true);
    run_case(bf16, 2, 1, 1, 33, 65, 128, 0.0, false);
    run_case(bf16, 1, 1, 1, 1, 37, 64, 0.0, false);
    run_case(bf16, 1, 2, 2, 40, 70, 64, 0.3, true);
    run_case(bf16, 1, 1, 1, 67, 67, 128, 0.5, false);
    run_case(bf16, 1, 4, 2, 33, 40, 64, 0.3, true);    // grouped-query, dropout
    run_case(bf16, 2, 4, 1, 20, 20, 128, 0.0, false);  // multi-query
    run_case(bf16, 2, 4, 2, 20, 20, 64, 0.9, false, true);  // NaN rows under dropout
    run_case(bf16, 1, 2, 1, 20, 100, 64, 0.0, false, false, 64);  // a whole key tile scoring -inf
    run_case(bf16, 1, 4, 2, 40, 40, 64, 0.0, false, false, 0, true);  // NaN upstream rows, grouped-query
    run_case(bf16, 1, 2, 2, 33, 70, 128, 0.3, true, false, 0, true);  // ... with dropout
    if (full) {
      run_case(bf16, 1, 8, 2, 70, 70, 64, 0.0, false);
      run_case(bf16, 1, 1, 1, 1, 1, 64, 0.0, false);
      run_case(bf16, 1, 1, 1, 70, 70, 64, 0.0, false);
      run_case(bf16, 1, 1, 1, 130, 130, 128, 0.0, true);
      run_case(bf16, 1, 1, 1, 5, 140, 64, 0.0, false);
      run_case(bf16, 1, 1, 1, 70, 70, 64, 0.3, true);
    }
  }
}

static void run_decode_cases(bool full) {
  for (bool bf16 : {false, true}) {
    // (B, H, H_kv, Tk, D, SM count that sets the split, KV cache longer than Tk)
    run_decode(bf16, 1, 3, 3, 1, 64, 132, false);
    run_decode(bf16, 2, 2, 2, 1000, 128, 4, true);
    run_decode(bf16, 1, 1, 1, 777, 64, 1, false);
    run_decode(bf16, 2, 8, 2, 300, 64, 4, true);  // grouped-query
    run_decode(bf16, 2, 4, 2, 37, 64, 132, false, true);  // NaN and inf, a padded chunk
    if (full) {
      run_decode(bf16, 1, 3, 3, 5, 128, 132, false);
      run_decode(bf16, 1, 2, 2, 300, 64, 132, true);
      run_decode(bf16, 2, 4, 2, 300, 128, 4, true, true);
    }
  }
}

int main(int argc, char** argv) {
  return check_main(argc, argv, "attention_check", {"fwd_bwd", run_fwd_bwd_cases}, {"decode", run_decode_cases},
                    failures);
}
