/* Read-bandwidth probe for the roofline: every thread sums its share of a buffer far larger than
 * the caches, with wide vector loads; the best of several passes. Built by bench/run.py with
 * cc -O3 -march=native -ffast-math -fopenmp -shared. Prints nothing; returns GB/s. */
#include <omp.h>
#include <stdlib.h>
#include <string.h>

double read_bandwidth_gbs(size_t bytes, int passes, int threads) {
    size_t n = bytes / sizeof(float);
    float * buf = aligned_alloc(64, n * sizeof(float));
    if (!buf) return -1.0;
    memset(buf, 0, n * sizeof(float));
    double best = 0.0;
    volatile float sink = 0.0f;
    for (int p = 0; p < passes; ++p) {
        float total = 0.0f;
        double t0 = omp_get_wtime();
#pragma omp parallel for reduction(+ : total) num_threads(threads) schedule(static)
        for (size_t i = 0; i < n; ++i) total += buf[i];
        double s = omp_get_wtime() - t0;
        sink += total;
        if (bytes / s / 1e9 > best) best = bytes / s / 1e9;
    }
    free(buf);
    return best;
}
