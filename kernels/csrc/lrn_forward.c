/* LRN and oLRN forward on CPU: the loop over T in C, one batch row at a time (kernels/cpu_native.py).
 *
 *   i_t = σ(k_t + h_{t−1}),  f_t = σ(q_t − h_{t−1}),  c_t = i_t ⊙ v_t + f_t ⊙ h_{t−1}
 *   LRN:  h_t = tanh(c_t)            oLRN:  h_t = σ(o_t − c_t) ⊙ c_t
 *
 * q, k, v, o: [B, T, D] with D contiguous and any batch and time strides (in elements; o NULL for
 * LRN); h0: [B, D] contiguous or NULL (zeros); out: [B, T, D] contiguous. The inner loop over D is
 * vectorized, expf/tanhf through glibc's vector math library (libmvec) where it exists. The caller
 * runs batch ranges on its own threads (no OpenMP runtime beside torch's).
 */
#include <math.h>
#include <stdint.h>

#ifndef RNNPIPE_NO_MVEC
/* What glibc's <bits/math-vector.h> declares under -ffast-math, without fast-math's other effects
 * (NaN and inf keep their meaning: a non-finite loss must still show). */
extern float expf(float) __attribute__((simd("notinbranch")));
extern float tanhf(float) __attribute__((simd("notinbranch")));
extern double exp(double) __attribute__((simd("notinbranch")));
extern double tanh(double) __attribute__((simd("notinbranch")));
#endif

#define LRN_FORWARD(NAME, T_, EXP, TANH, ONE)                                                      \
    void NAME(const T_* q, const T_* k, const T_* v, const T_* o, const int64_t* strides,          \
              const T_* h0, T_* out, int64_t B, int64_t T, int64_t D) {                            \
        /* strides: batch and time stride of q, k, v and o, in that order (8 values) */            \
        for (int64_t b = 0; b < B; b++) {                                                          \
            const T_* h = h0 ? h0 + b * D : 0;                                                     \
            for (int64_t t = 0; t < T; t++) {                                                      \
                const T_* qt = q + b * strides[0] + t * strides[1];                                \
                const T_* kt = k + b * strides[2] + t * strides[3];                                \
                const T_* vt = v + b * strides[4] + t * strides[5];                                \
                T_* ht = out + (b * T + t) * D;                                                    \
                if (o) {                                                                           \
                    const T_* ot = o + b * strides[6] + t * strides[7];                            \
                    _Pragma("GCC ivdep") for (int64_t d = 0; d < D; d++) {                        \
                        T_ hp = h ? h[d] : 0;                                                      \
                        T_ f = ONE / (ONE + EXP(hp - qt[d]));                                      \
                        T_ i = ONE / (ONE + EXP(-(kt[d] + hp)));                                   \
                        T_ c = f * hp + i * vt[d];                                                 \
                        ht[d] = c / (ONE + EXP(c - ot[d]));                                        \
                    }                                                                              \
                } else {                                                                           \
                    _Pragma("GCC ivdep") for (int64_t d = 0; d < D; d++) {                        \
                        T_ hp = h ? h[d] : 0;                                                      \
                        T_ f = ONE / (ONE + EXP(hp - qt[d]));                                      \
                        T_ i = ONE / (ONE + EXP(-(kt[d] + hp)));                                   \
                        ht[d] = TANH(f * hp + i * vt[d]);                                          \
                    }                                                                              \
                }                                                                                  \
                h = ht;                                                                            \
            }                                                                                      \
        }                                                                                          \
    }

LRN_FORWARD(lrn_forward_f32, float, expf, tanhf, 1.0f)
LRN_FORWARD(lrn_forward_f64, double, exp, tanh, 1.0)
