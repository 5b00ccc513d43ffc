/* effc int8 x int8 -> int32 kernels with requantization (int8 activations end to end).

   y[m][n] = clamp(zy + rescale(bias[n] + sum_k x[m][k] * w[n][k], mult[n], shift[n]), lo, 127)
   where x holds int8 activations (their zero point is folded into bias at compile time) and w the int8 weights,
   pre-arranged by effc in channel pairs: for each pair (n, n+1), K/4 blocks of [4 bytes of row n][4 bytes of
   row n+1], then the K%4 tail bytes of row n and of row n+1 (an odd last channel is paired with a zero row).
   rescale(a, M, s) = round(round(a * M / 2^31) / 2^s): fixed-point multiplier M in [2^30, 2^31), shift s in
   [0, 31] (real multipliers below 1, as TFLite's MultiplyByQuantizedMultiplier).

   The micro-kernel computes 2 output channels x 2 columns per iteration. With EFFC_S8_DSP (Cortex-M4/M7/M33
   DSP extension) one 32-bit load + SXTB16 / SXTB16 ROR #8 gives the int16 pairs (x0, x2) and (x1, x3) of 4 int8
   values, and SMLAD does two multiply-accumulates: 8 SMLAD per 16 MACs. Without it (Cortex-M3) the same loop
   runs on plain C multiplies.

   Sources: Arm ACLE section 9.5 (SIMD32 intrinsics: __sxtb16, __smlad); TFLite / CMSIS-NN integer requantization
   ("Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference", Jacob et al.,
   CVPR 2018, section 2.2). */
#include <stdint.h>
#include <string.h>

#ifndef EFFC_S8_DSP
#define EFFC_S8_DSP 0
#endif
#ifndef EFFC_S8_CONV /* effc defines these to what the model uses (no unused code in flash) */
#define EFFC_S8_CONV 1
#endif
#ifndef EFFC_S8_MATMUL
#define EFFC_S8_MATMUL 1
#endif
#ifndef EFFC_S8_DWCONV
#define EFFC_S8_DWCONV 1
#endif
#if EFFC_S8_DSP && !defined(__ARM_FEATURE_DSP)
#undef EFFC_S8_DSP
#define EFFC_S8_DSP 0 /* built for a core without the DSP extension: the portable loop */
#endif
#if EFFC_S8_DSP
#include <arm_acle.h>
/* SXTB16 with its ROR #8 operand in one instruction (gcc 12 does not fold a rotate into __sxtb16). */
static inline int32_t effc_sxtb16_ror8(int32_t x) {
  int32_t r;
  __asm__("sxtb16 %0, %1, ror #8" : "=r"(r) : "r"(x));
  return r;
}
#endif

static inline int32_t effc_s8_read4(const int8_t* p) {
  int32_t v;
  memcpy(&v, p, 4); /* one LDR (unaligned access is allowed on Armv7-M) */
  return v;
}

static inline int8_t effc_s8_requant(int32_t acc, int32_t mult, int32_t shift, int32_t zy, int32_t lo) {
  /* round(acc * mult / 2^31), then a rounding right shift by `shift` (TFLite's two-step rescale) */
  int32_t y = (int32_t)(((int64_t)acc * mult + ((int64_t)1 << 30)) >> 31);
  y = ((y + ((1 << shift) >> 1)) >> shift) + zy; /* branch-free: shift 0 adds 0 */
  y = y < lo ? lo : y;
  return (int8_t)(y > 127 ? 127 : y);
}

#if EFFC_S8_CONV || EFFC_S8_MATMUL /* the dense tiles and their driver */
/* acc[0..3] += (rows n, n+1) x (columns a, b) over k4 blocks of 4 and a tail of `tail` values. */
static void effc_s8_dot_2x2(const int8_t* a, const int8_t* b, const int8_t* w, int32_t k4, int32_t tail,
                            int32_t* acc) {
  int32_t s00 = acc[0], s01 = acc[1], s10 = acc[2], s11 = acc[3];
  int32_t i;
#if EFFC_S8_DSP
  const int8_t* end = w + 8 * k4;
  while (w != end) { /* 4 loads, 8 SXTB16, 8 SMLAD = 16 MACs (unrolling further spills registers) */
    int32_t xa = effc_s8_read4(a), xb = effc_s8_read4(b);
    int32_t w0 = effc_s8_read4(w), w1 = effc_s8_read4(w + 4);
    int32_t xa_e = __sxtb16(xa), xa_o = effc_sxtb16_ror8(xa);
    int32_t xb_e = __sxtb16(xb), xb_o = effc_sxtb16_ror8(xb);
    int32_t w0_e = __sxtb16(w0), w0_o = effc_sxtb16_ror8(w0);
    int32_t w1_e = __sxtb16(w1), w1_o = effc_sxtb16_ror8(w1);
    s00 = __smlad(w0_o, xa_o, __smlad(w0_e, xa_e, s00));
    s01 = __smlad(w0_o, xb_o, __smlad(w0_e, xb_e, s01));
    s10 = __smlad(w1_o, xa_o, __smlad(w1_e, xa_e, s10));
    s11 = __smlad(w1_o, xb_o, __smlad(w1_e, xb_e, s11));
    a += 4;
    b += 4;
    w += 8;
  }
#else
  for (i = 0; i < k4; ++i) {
    int32_t j;
    for (j = 0; j < 4; ++j) {
      int32_t xa = a[j], xb = b[j], w0 = w[j], w1 = w[4 + j];
      s00 += w0 * xa;
      s01 += w0 * xb;
      s10 += w1 * xa;
      s11 += w1 * xb;
    }
    a += 4;
    b += 4;
    w += 8;
  }
#endif
  for (i = 0; i < tail; ++i) {
    int32_t w0 = w[i], w1 = w[tail + i];
    s00 += w0 * a[i];
    s01 += w0 * b[i];
    s10 += w1 * a[i];
    s11 += w1 * b[i];
  }
  acc[0] = s00;
  acc[1] = s01;
  acc[2] = s10;
  acc[3] = s11;
}

/* acc[0], acc[2] += (rows n, n+1) x column a (the last column when M is odd). */
static void effc_s8_dot_2x1(const int8_t* a, const int8_t* w, int32_t k4, int32_t tail, int32_t* acc) {
  int32_t s0 = acc[0], s1 = acc[2];
  int32_t i;
#if EFFC_S8_DSP
  const int8_t* end = w + 8 * k4;
  while (w != end) {
    int32_t xa = effc_s8_read4(a), w0 = effc_s8_read4(w), w1 = effc_s8_read4(w + 4);
    int32_t xa_e = __sxtb16(xa), xa_o = effc_sxtb16_ror8(xa);
    s0 = __smlad(__sxtb16(w0), xa_e, s0);
    s0 = __smlad(effc_sxtb16_ror8(w0), xa_o, s0);
    s1 = __smlad(__sxtb16(w1), xa_e, s1);
    s1 = __smlad(effc_sxtb16_ror8(w1), xa_o, s1);
    a += 4;
    w += 8;
  }
#else
  for (i = 0; i < k4; ++i) {
    int32_t j;
    for (j = 0; j < 4; ++j) {
      s0 += w[j] * a[j];
      s1 += w[4 + j] * a[j];
    }
    a += 4;
    w += 8;
  }
#endif
  for (i = 0; i < tail; ++i) {
    s0 += w[i] * a[i];
    s1 += w[tail + i] * a[i];
  }
  acc[0] = s0;
  acc[2] = s1;
}

/* acc[0..3] += (rows n..n+3) x column a: rows n, n+1 from pair w0, rows n+2, n+3 from pair w1. */
static void effc_s8_dot_4x1(const int8_t* a, const int8_t* w0, const int8_t* w1, int32_t k4, int32_t tail,
                            int32_t* acc) {
  int32_t s0 = acc[0], s1 = acc[1], s2 = acc[2], s3 = acc[3];
  int32_t i;
#if EFFC_S8_DSP
  const int8_t* end = w0 + 8 * k4;
  while (w0 != end) { /* 5 loads, 10 SXTB16, 8 SMLAD = 16 MACs */
    int32_t xa = effc_s8_read4(a);
    int32_t xa_e = __sxtb16(xa), xa_o = effc_sxtb16_ror8(xa);
    int32_t wa = effc_s8_read4(w0), wb = effc_s8_read4(w0 + 4);
    int32_t wc = effc_s8_read4(w1), wd = effc_s8_read4(w1 + 4);
    s0 = __smlad(effc_sxtb16_ror8(wa), xa_o, __smlad(__sxtb16(wa), xa_e, s0));
    s1 = __smlad(effc_sxtb16_ror8(wb), xa_o, __smlad(__sxtb16(wb), xa_e, s1));
    s2 = __smlad(effc_sxtb16_ror8(wc), xa_o, __smlad(__sxtb16(wc), xa_e, s2));
    s3 = __smlad(effc_sxtb16_ror8(wd), xa_o, __smlad(__sxtb16(wd), xa_e, s3));
    a += 4;
    w0 += 8;
    w1 += 8;
  }
#else
  for (i = 0; i < k4; ++i) {
    int32_t j;
    for (j = 0; j < 4; ++j) {
      s0 += w0[j] * a[j];
      s1 += w0[4 + j] * a[j];
      s2 += w1[j] * a[j];
      s3 += w1[4 + j] * a[j];
    }
    a += 4;
    w0 += 8;
    w1 += 8;
  }
#endif
  for (i = 0; i < tail; ++i) {
    s0 += w0[i] * a[i];
    s1 += w0[tail + i] * a[i];
    s2 += w1[i] * a[i];
    s3 += w1[tail + i] * a[i];
  }
  acc[0] = s0;
  acc[1] = s1;
  acc[2] = s2;
  acc[3] = s3;
}

/* The shared driver: columns come from `col(m)` (a row of x, or an im2col column), outputs go to
   y[m * ym + n * yn]. p = {M, N, K, zy, lo, ym, yn}. */
typedef const int8_t* (*effc_s8_col_fn)(const void* ctx, int32_t m, int8_t* buf);

static void effc_s8_gemm_driver(effc_s8_col_fn col, const void* ctx, int8_t* buf, const int8_t* w,
                                const int32_t* bias, const int32_t* mult, const int32_t* shift, int8_t* y,
                                const int32_t* p) {
  const int32_t M = p[0], N = p[1], K = p[2], zy = p[3], lo = p[4], ym = p[5], yn = p[6];
  const int32_t k4 = K / 4, tail = K % 4, pair_bytes = 2 * K;
  int32_t m, n, r;
  for (m = 0; m + 1 < M; m += 2) { /* 2 channels x 2 columns */
    const int8_t* a = col(ctx, m, buf);
    const int8_t* b = col(ctx, m + 1, buf + K);
    const int8_t* wp = w;
    for (n = 0; n < N; n += 2, wp += pair_bytes) {
      int32_t acc[4];
      acc[0] = acc[1] = bias[n];
      acc[2] = acc[3] = n + 1 < N ? bias[n + 1] : 0;
      effc_s8_dot_2x2(a, b, wp, k4, tail, acc);
      y[m * ym + n * yn] = effc_s8_requant(acc[0], mult[n], shift[n], zy, lo);
      y[(m + 1) * ym + n * yn] = effc_s8_requant(acc[1], mult[n], shift[n], zy, lo);
      if (n + 1 < N) {
        y[m * ym + (n + 1) * yn] = effc_s8_requant(acc[2], mult[n + 1], shift[n + 1], zy, lo);
        y[(m + 1) * ym + (n + 1) * yn] = effc_s8_requant(acc[3], mult[n + 1], shift[n + 1], zy, lo);
      }
    }
  }
  if (m < M) { /* the last column when M is odd (M = 1: a fully connected layer on one sample) */
    const int8_t* a = col(ctx, m, buf);
    const int8_t* wp = w;
    int32_t acc[4];
    for (n = 0; n + 3 < N; n += 4, wp += 2 * pair_bytes) {
      for (r = 0; r < 4; ++r) acc[r] = bias[n + r];
      effc_s8_dot_4x1(a, wp, wp + pair_bytes, k4, tail, acc);
      for (r = 0; r < 4; ++r) y[m * ym + (n + r) * yn] = effc_s8_requant(acc[r], mult[n + r], shift[n + r], zy, lo);
    }
    for (; n < N; n += 2, wp += pair_bytes) {
      acc[0] = bias[n];
      acc[2] = n + 1 < N ? bias[n + 1] : 0;
      effc_s8_dot_2x1(a, wp, k4, tail, acc);
      y[m * ym + n * yn] = effc_s8_requant(acc[0], mult[n], shift[n], zy, lo);
      if (n + 1 < N) y[m * ym + (n + 1) * yn] = effc_s8_requant(acc[2], mult[n + 1], shift[n + 1], zy, lo);
    }
  }
}
#endif /* EFFC_S8_CONV || EFFC_S8_MATMUL */

#if EFFC_S8_MATMUL
typedef struct {
  const int8_t* x;
  int32_t K;
} effc_s8_rows_ctx;

static const int8_t* effc_s8_row(const void* vctx, int32_t m, int8_t* buf) {
  const effc_s8_rows_ctx* ctx = (const effc_s8_rows_ctx*)vctx;
  (void)buf;
  return ctx->x + m * ctx->K;
}

/* Gemm/MatMul: x (M, K) int8 row-major, y (M, N) int8 row-major. */
int32_t effc_s8_matmul(int8_t* x, int8_t* w, int32_t* bias, int32_t* mult, int32_t* shift, int8_t* y,
                       int32_t M, int32_t N, int32_t K, int32_t zy, int32_t lo) {
  effc_s8_rows_ctx ctx;
  int32_t p[7];
  ctx.x = x;
  ctx.K = K;
  p[0] = M; p[1] = N; p[2] = K; p[3] = zy; p[4] = lo; p[5] = N; p[6] = 1;
  effc_s8_gemm_driver(effc_s8_row, &ctx, 0, w, bias, mult, shift, y, p);
  return 0;
}
#endif /* EFFC_S8_MATMUL */

#if EFFC_S8_CONV
/* Conv2d, NCHW, one image, groups 1: x (C, H, W) int8, y (N, OH, OW) int8; im2col column of output position m:
   K = C * KH * KW values, padding filled with the input zero point zx. g = {C, H, W, KH, KW, SH, SW, PH, PW, DH,
   DW, OH, OW, zx}. */
typedef struct {
  const int8_t* x;
  const int32_t* g;
} effc_s8_conv_ctx;

static const int8_t* effc_s8_im2col(const void* vctx, int32_t m, int8_t* buf) {
  /* geometry in locals: stores through int8_t* may alias anything, so fields would be reloaded per byte */
  const effc_s8_conv_ctx* ctx = (const effc_s8_conv_ctx*)vctx;
  const int32_t* g = ctx->g;
  const int32_t C = g[0], H = g[1], W = g[2], KH = g[3], KW = g[4], DH = g[9], DW = g[10];
  const int32_t HW = H * W, row = KH * KW;
  const int8_t pad = (int8_t)g[13];
  const int32_t h0 = (m / g[12]) * g[5] - g[7], v0 = (m % g[12]) * g[6] - g[8];
  const int32_t inside = v0 >= 0 && v0 + (KW - 1) * DW < W;
  int32_t c, i, j;
  for (i = 0; i < KH; ++i) {
    const int32_t h = h0 + i * DH;
    int8_t* out = buf + i * KW;
    const int8_t* src = ctx->x + h * W + v0;
    if (h < 0 || h >= H) {
      for (c = 0; c < C; ++c, out += row)
        for (j = 0; j < KW; ++j) out[j] = pad;
    } else if (inside && DW == 1 && KW == 3) {
      for (c = 0; c < C; ++c, out += row, src += HW) {
        out[0] = src[0];
        out[1] = src[1];
        out[2] = src[2];
      }
    } else if (inside) {
      for (c = 0; c < C; ++c, out += row, src += HW)
        for (j = 0; j < KW; ++j) out[j] = src[j * DW];
    } else {
      for (c = 0; c < C; ++c, out += row, src += HW)
        for (j = 0; j < KW; ++j) {
          const int32_t v = v0 + j * DW;
          out[j] = (v >= 0 && v < W) ? src[j * DW] : pad;
        }
    }
  }
  return buf;
}

int32_t effc_s8_conv2d(int8_t* x, int8_t* w, int32_t* bias, int32_t* mult, int32_t* shift, int32_t* geom,
                       int8_t* y, int8_t* cols, int32_t N, int32_t zy, int32_t lo) {
  effc_s8_conv_ctx ctx;
  int32_t p[7];
  ctx.x = x;
  ctx.g = geom;
  p[0] = geom[11] * geom[12]; p[1] = N; p[2] = geom[0] * geom[3] * geom[4]; p[3] = zy; p[4] = lo;
  p[5] = 1; p[6] = p[0];
  effc_s8_gemm_driver(effc_s8_im2col, &ctx, cols, w, bias, mult, shift, y, p);
  return 0;
}
#endif /* EFFC_S8_CONV */

#if EFFC_S8_DWCONV
/* Depthwise conv2d (groups = channels, one image): x (C, H, W) int8, w (C, KH*KW) int8 row-major, y (C, OH, OW);
   padded taps read the input zero point zx (folded into bias like the dense conv). Plain C on every core: each
   weight meets only OH*OW inputs of its own channel, so there is no channel pair to feed SMLAD. Same geometry
   vector g as effc_s8_conv2d. */
int32_t effc_s8_dwconv2d(int8_t* x, int8_t* w, int32_t* bias, int32_t* mult, int32_t* shift, int32_t* geom,
                         int8_t* y, int32_t C, int32_t zy, int32_t lo) {
  const int32_t H = geom[1], W = geom[2], KH = geom[3], KW = geom[4], SH = geom[5], SW = geom[6];
  const int32_t PH = geom[7], PW = geom[8], DH = geom[9], DW = geom[10], OH = geom[11], OW = geom[12];
  const int32_t zx = geom[13];
  int32_t c, oh, ow, i, j;
  for (c = 0; c < C; ++c) {
    const int8_t* plane = x + c * H * W;
    const int8_t* wc = w + c * KH * KW;
    int8_t* out = y + c * OH * OW;
    for (oh = 0; oh < OH; ++oh) {
      const int32_t h0 = oh * SH - PH;
      const int32_t rows_in = h0 >= 0 && h0 + (KH - 1) * DH < H;
      for (ow = 0; ow < OW; ++ow) {
        const int32_t v0 = ow * SW - PW;
        int32_t acc = bias[c];
        if (rows_in && v0 >= 0 && v0 + (KW - 1) * DW < W) {
          const int8_t* src = plane + h0 * W + v0;
          const int8_t* wk = wc;
          for (i = 0; i < KH; ++i, src += DH * W, wk += KW)
            for (j = 0; j < KW; ++j) acc += src[j * DW] * wk[j];
        } else {
          for (i = 0; i < KH; ++i) {
            const int32_t h = h0 + i * DH;
            for (j = 0; j < KW; ++j) {
              const int32_t v = v0 + j * DW;
              const int32_t xv = (h >= 0 && h < H && v >= 0 && v < W) ? plane[h * W + v] : zx;
              acc += xv * wc[i * KW + j];
            }
          }
        }
        out[oh * OW + ow] = effc_s8_requant(acc, mult[c], shift[c], zy, lo);
      }
    }
  }
  return 0;
}
#endif /* EFFC_S8_DWCONV */
