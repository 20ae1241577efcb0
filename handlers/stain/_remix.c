/* Macenko's per-pixel steps on the CPU for uint8 patches, fused (see handlers/stain/fused.py).
 *
 * remix_uint8(x, remix, bias, out, n_patches, n_px, n_threads) -> None
 *   out[b, c, p] = exp(min(0, bias[b, c] + sum_k remix[b, c, k] * log1p(x[b, k, p])))
 *   x: n_patches * 3 * n_px bytes; remix: n_patches * 9 float32; bias: n_patches * 3 float32;
 *   out: writable, n_patches * 3 * n_px float32. This is what handlers/stain/macenko.py computes
 *   with eager torch ops (log1p, baddbmm, clamp, exp); fused, each value is read once and
 *   written once, the log comes from a 256-entry table and the exp from a short polynomial
 *   that the compiler vectorises (an x86-64-v3 (AVX2) clone, picked at load time where the
 *   chip has it). Patches are split over n_threads OpenMP threads with the GIL released.
 *
 * sampled_optical_density(x, out, n_patches, height_px, width_px, stride, log_io, n_threads) -> None
 *   out[b, c, i * w + j] = log_io - log1p(x[b, c, i * stride, j * stride]), w = ceil(width_px / stride):
 *   the optical density of a regular sub-grid, as x[..., ::stride, ::stride] in torch, on
 *   n_threads OpenMP threads. The sampled rows lie far apart, so each is prefetched a few rows
 *   early: reading them one by one from memory was latency-bound (2.6 ms cold, 0.9 ms now).
 *
 * Buffers are C-contiguous (checked by size here, by layout in fused.py).
 *
 * Threads: OpenMP, linked as libgomp.so.1. torch's wheels ship and load their own libgomp.so.1
 * first (fused.py imports torch before this module), so the loader reuses it and these loops run
 * on torch's own intra-op threads. Separate POSIX threads were 1.3-1.6x slower on a 2-core CPU:
 * they competed with torch's OpenMP workers, which spin for milliseconds after each torch op.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK_PX 256
#define PREFETCH_ROWS 8

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define VECTOR_CLONES
#endif

static float log1p_table[256];

/* exp(y) for y <= 0 (Cephes' expf: |relative error| < 2e-7); below -87 the result is ~1e-38.
 * Branch-free (selects, a truncating conversion), so the compiler vectorises the loop around it. */
static inline float exp_nonpositive(float y) {
    float x = y > -87.0f ? y : -87.0f;
    float fx = x * 1.44269504088896341f + 0.5f;
    int32_t k = (int32_t)fx;
    k -= (float)k > fx;  /* floor: truncation rounds negative values up */
    float n = (float)k;
    x = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * x + 1.3981999507e-3f;
    p = p * x + 8.3334519073e-3f;
    p = p * x + 4.1665795894e-2f;
    p = p * x + 1.6666665459e-1f;
    p = p * x + 5.0000001201e-1f;
    p = p * x * x + x + 1.0f;
    int32_t bits = (k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* One patch: 3 planes of n_px uint8 in, 3 planes of n_px float32 out. */
VECTOR_CLONES
static void remix_patch(const uint8_t *x, const float *m, const float *bias, float *out, Py_ssize_t n_px) {
    float r[BLOCK_PX], g[BLOCK_PX], b[BLOCK_PX];
    for (Py_ssize_t start = 0; start < n_px; start += BLOCK_PX) {
        Py_ssize_t n = n_px - start < BLOCK_PX ? n_px - start : BLOCK_PX;
        for (Py_ssize_t i = 0; i < n; ++i) {
            r[i] = log1p_table[x[start + i]];
            g[i] = log1p_table[x[n_px + start + i]];
            b[i] = log1p_table[x[2 * n_px + start + i]];
        }
        for (int c = 0; c < 3; ++c) {
            const float m0 = m[3 * c], m1 = m[3 * c + 1], m2 = m[3 * c + 2], shift = bias[c];
            float *dst = out + c * n_px + start;
            for (Py_ssize_t i = 0; i < n; ++i) {
                float y = shift + m0 * r[i] + m1 * g[i] + m2 * b[i];
                dst[i] = exp_nonpositive(y < 0.0f ? y : 0.0f);
            }
        }
    }
}

/* Every patch, split over n_threads OpenMP threads. */
static void remix_patches(const uint8_t *x, const float *remix, const float *bias, float *out, Py_ssize_t n_patches,
                          Py_ssize_t n_px, int n_threads) {
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (Py_ssize_t p = 0; p < n_patches; ++p)
        remix_patch(x + p * 3 * n_px, remix + 9 * p, bias + 3 * p, out + p * 3 * n_px, n_px);
}

static int check_size(const Py_buffer *buf, Py_ssize_t expected, const char *name) {
    if (buf->len != expected) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, expected %zd", name, buf->len, expected);
        return -1;
    }
    return 0;
}

static PyObject *remix_uint8(PyObject *self, PyObject *args) {
    Py_buffer x, remix, bias, out;
    Py_ssize_t n_patches, n_px;
    int n_threads;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*y*w*nni", &x, &remix, &bias, &out, &n_patches, &n_px, &n_threads))
        return NULL;
    PyObject *result = NULL;
    if (n_patches < 0 || n_px < 0) {
        PyErr_SetString(PyExc_ValueError, "n_patches and n_px must not be negative");
    } else if (check_size(&x, n_patches * 3 * n_px, "x") == 0 &&
               check_size(&remix, n_patches * 9 * (Py_ssize_t)sizeof(float), "remix") == 0 &&
               check_size(&bias, n_patches * 3 * (Py_ssize_t)sizeof(float), "bias") == 0 &&
               check_size(&out, n_patches * 3 * n_px * (Py_ssize_t)sizeof(float), "out") == 0) {
        int threads = n_threads < 1 ? 1 : n_threads;
        Py_BEGIN_ALLOW_THREADS
        remix_patches(x.buf, remix.buf, bias.buf, out.buf, n_patches, n_px, threads);
        Py_END_ALLOW_THREADS
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&remix);
    PyBuffer_Release(&bias);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *sampled_optical_density(PyObject *self, PyObject *args) {
    Py_buffer x, out;
    Py_ssize_t n_patches, height_px, width_px, stride;
    float log_io;
    int n_threads;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*w*nnnnfi", &x, &out, &n_patches, &height_px, &width_px, &stride, &log_io,
                          &n_threads))
        return NULL;
    PyObject *result = NULL;
    if (n_patches < 0 || height_px < 0 || width_px < 0 || stride < 1) {
        PyErr_SetString(PyExc_ValueError, "sizes must not be negative and stride must be at least 1");
    } else {
        const Py_ssize_t rows = (height_px + stride - 1) / stride, cols = (width_px + stride - 1) / stride;
        const Py_ssize_t planes = n_patches * 3;
        if (check_size(&x, planes * height_px * width_px, "x") == 0 &&
            check_size(&out, planes * rows * cols * (Py_ssize_t)sizeof(float), "out") == 0) {
            const uint8_t *src = x.buf;
            float *out_px = out.buf;
            const Py_ssize_t n_rows = planes * rows;
            const int threads = n_threads < 1 ? 1 : n_threads;
            Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for num_threads(threads) schedule(static)
            for (Py_ssize_t r = 0; r < n_rows; ++r) {
                const uint8_t *row = src + ((r / rows) * height_px + (r % rows) * stride) * width_px;
                if (r + PREFETCH_ROWS < n_rows) {  /* sampled rows are far apart: ask for them early */
                    const Py_ssize_t ahead = r + PREFETCH_ROWS;
                    const uint8_t *next = src + ((ahead / rows) * height_px + (ahead % rows) * stride) * width_px;
                    for (Py_ssize_t byte = 0; byte < width_px; byte += 64) __builtin_prefetch(next + byte);
                }
                float *dst = out_px + r * cols;
                for (Py_ssize_t j = 0; j < cols; ++j) dst[j] = log_io - log1p_table[row[j * stride]];
            }
            Py_END_ALLOW_THREADS
            result = Py_NewRef(Py_None);
        }
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"remix_uint8", remix_uint8, METH_VARARGS,
     "remix_uint8(x, remix, bias, out, n_patches, n_px, n_threads): Macenko's remix of uint8 patches into out."},
    {"sampled_optical_density", sampled_optical_density, METH_VARARGS,
     "sampled_optical_density(x, out, n_patches, height_px, width_px, stride, log_io, n_threads): OD of a sub-grid."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_remix", "Fused CPU Macenko steps for uint8 patches.", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__remix(void) {
    for (int v = 0; v < 256; ++v) log1p_table[v] = (float)log1p((double)v);
    return PyModule_Create(&module);
}
