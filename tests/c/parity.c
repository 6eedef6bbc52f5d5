/* A plain-C (C99) driver over the public ABI, for comparing one build of the library with another
 * (tests/test_aarch64.py runs it natively and under qemu-aarch64 on a cross build).
 *
 *   parity MODEL.gguf PIXELS.f32 ASPECT_RATIO_ID N_TILES PROMPT.i32 N_STEPS OUT_DIR
 *
 * PIXELS.f32: raw float32, max_tiles x channels x tile x tile (what mllama_context_encode_image takes).
 * PROMPT.i32: raw int32 prompt tokens; rows from the first <|image|> token on attend to the image.
 * Loads the model on the CPU (2 threads), encodes the image into slot 0, decodes the prompt in one
 * call keeping the logits of every row, then runs N_STEPS greedy steps (argmax of the last logits,
 * decoded at the next position). Writes OUT_DIR/features.f32 (the vision output), OUT_DIR/logits.f32
 * (the prompt rows, then one row per step, n_vocab float32 each) and OUT_DIR/tokens.i32 (the greedy
 * tokens). Any failure prints the reason and exits non-zero.
 */
#include "mllama.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(const char * what, mllama_status st) {
    fprintf(stderr, "parity: %s: %s: %s\n", what, mllama_status_name(st), mllama_last_error());
    return 1;
}

/* Read a whole file of elem-sized values into *out (malloc'd); returns the element count or -1. */
static long read_file(const char * path, size_t elem, void ** out) {
    FILE * f = fopen(path, "rb");
    long size;
    void * buf;
    *out = NULL;
    if (f == NULL) {
        fprintf(stderr, "parity: cannot open %s: %s\n", path, strerror(errno));
        return -1;
    }
    if (fseek(f, 0, SEEK_END) != 0 || (size = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        fprintf(stderr, "parity: cannot size %s\n", path);
        fclose(f);
        return -1;
    }
    if (size == 0 || size % (long) elem != 0) {
        fprintf(stderr, "parity: %s: %ld bytes is not a positive multiple of %lu\n", path, size, (unsigned long) elem);
        fclose(f);
        return -1;
    }
    buf = malloc((size_t) size);
    if (buf == NULL || fread(buf, 1, (size_t) size, f) != (size_t) size) {
        fprintf(stderr, "parity: cannot read %s\n", path);
        free(buf);
        fclose(f);
        return -1;
    }
    fclose(f);
    *out = buf;
    return size / (long) elem;
}

static int write_file(const char * dir, const char * name, const void * data, size_t n_bytes) {
    char path[4096];
    FILE * f;
    int ok;
    if ((size_t) snprintf(path, sizeof path, "%s/%s", dir, name) >= sizeof path) {
        fprintf(stderr, "parity: output path too long\n");
        return 1;
    }
    f = fopen(path, "wb");
    if (f == NULL) {
        fprintf(stderr, "parity: cannot create %s: %s\n", path, strerror(errno));
        return 1;
    }
    ok = fwrite(data, 1, n_bytes, f) == n_bytes;
    ok = (fclose(f) == 0) && ok;
    if (!ok) {
        fprintf(stderr, "parity: cannot write %s\n", path);
        return 1;
    }
    return 0;
}

static int32_t argmax(const float * row, int32_t n) {
    int32_t best = 0;
    int32_t i;
    for (i = 1; i < n; i++) {
        if (row[i] > row[best]) best = i;
    }
    return best;
}

static int parse_int(const char * text, const char * what, long lo, long hi, long * out) {
    char * end = NULL;
    long v;
    errno = 0;
    v = strtol(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || v < lo || v > hi) {
        fprintf(stderr, "parity: bad %s '%s'\n", what, text);
        return 1;
    }
    *out = v;
    return 0;
}

int main(int argc, char ** argv) {
    mllama_model * model = NULL;
    mllama_context * ctx = NULL;
    mllama_model_params mparams = mllama_model_default_params();
    mllama_context_params cparams = mllama_context_default_params();
    mllama_hparams hp;
    mllama_status st;
    float * pixels = NULL;
    int32_t * prompt = NULL;
    float * features = NULL;
    float * logits = NULL;
    int32_t * out_tokens = NULL;
    int32_t * rows = NULL;
    uint8_t * table = NULL;
    long n_pixels_file, n_prompt, aspect_ratio_id, n_tiles, n_steps, i;
    int64_t n_pixels, n_features;
    int32_t n_vocab, n_past;
    int rc = 1;
    int seen_image = 0;
    uint8_t attend = 1;
    int32_t row0 = 0;

    if (argc != 8) {
        fprintf(stderr, "usage: %s MODEL.gguf PIXELS.f32 ASPECT_RATIO_ID N_TILES PROMPT.i32 N_STEPS OUT_DIR\n", argv[0]);
        return 2;
    }
    if (parse_int(argv[3], "aspect_ratio_id", 0, 1L << 20, &aspect_ratio_id) ||
        parse_int(argv[4], "n_tiles", 1, 1L << 20, &n_tiles) ||
        parse_int(argv[6], "n_steps", 0, 1L << 20, &n_steps)) {
        return 2;
    }
    n_pixels_file = read_file(argv[2], sizeof(float), (void **) &pixels);
    if (n_pixels_file < 0) goto done;
    n_prompt = read_file(argv[5], sizeof(int32_t), (void **) &prompt);
    if (n_prompt < 0) goto done;

    mparams.n_threads = 2;
    mparams.device = "cpu";
    st = mllama_model_load(argv[1], NULL, &mparams, &model);
    if (st != MLLAMA_OK) { rc = fail("mllama_model_load", st); goto done; }
    st = mllama_model_get_hparams(model, &hp);
    if (st != MLLAMA_OK) { rc = fail("mllama_model_get_hparams", st); goto done; }
    n_vocab = hp.n_vocab;

    n_pixels = (int64_t) hp.v_max_tiles * hp.v_n_channels * hp.v_image_size * hp.v_image_size;
    if ((int64_t) n_pixels_file != n_pixels) {
        fprintf(stderr, "parity: %s holds %ld floats, the model wants %lld\n", argv[2], n_pixels_file,
                (long long) n_pixels);
        goto done;
    }
    n_features = (int64_t) hp.v_max_tiles * hp.v_n_positions * hp.v_output_dim;

    cparams.n_ctx = (int32_t) (n_prompt + n_steps + 1);
    cparams.n_batch = (int32_t) n_prompt;
    cparams.n_threads = 2;
    cparams.n_image_slots = 1;
    st = mllama_context_init(model, &cparams, &ctx);
    if (st != MLLAMA_OK) { rc = fail("mllama_context_init", st); goto done; }

    features = (float *) malloc((size_t) n_features * sizeof(float));
    logits = (float *) malloc((size_t) (n_prompt + n_steps) * (size_t) n_vocab * sizeof(float));
    out_tokens = (int32_t *) malloc((size_t) (n_steps > 0 ? n_steps : 1) * sizeof(int32_t));
    rows = (int32_t *) malloc((size_t) n_prompt * sizeof(int32_t));
    table = (uint8_t *) malloc((size_t) n_prompt);
    if (features == NULL || logits == NULL || out_tokens == NULL || rows == NULL || table == NULL) {
        fprintf(stderr, "parity: out of memory\n");
        goto done;
    }

    st = mllama_context_encode_image(ctx, 0, pixels, n_pixels, (int32_t) aspect_ratio_id, (int32_t) n_tiles,
                                     features, n_features);
    if (st != MLLAMA_OK) { rc = fail("mllama_context_encode_image", st); goto done; }

    for (i = 0; i < n_prompt; i++) {
        if (prompt[i] == hp.image_token_id) seen_image = 1;
        table[i] = (uint8_t) seen_image;
        rows[i] = (int32_t) i;
    }
    if (!seen_image) {
        fprintf(stderr, "parity: the prompt has no <|image|> token (%d)\n", hp.image_token_id);
        goto done;
    }
    st = mllama_context_decode(ctx, prompt, (int32_t) n_prompt, 0, 1, table, rows, (int32_t) n_prompt, logits);
    if (st != MLLAMA_OK) { rc = fail("mllama_context_decode (prompt)", st); goto done; }

    n_past = (int32_t) n_prompt;
    for (i = 0; i < n_steps; i++) {
        const float * last = logits + (size_t) (n_prompt + i - 1) * (size_t) n_vocab;
        int32_t token = argmax(last, n_vocab);
        out_tokens[i] = token;
        st = mllama_context_decode(ctx, &token, 1, n_past, 1, &attend, &row0, 1,
                                   logits + (size_t) (n_prompt + i) * (size_t) n_vocab);
        if (st != MLLAMA_OK) { rc = fail("mllama_context_decode (step)", st); goto done; }
        n_past++;
    }

    if (write_file(argv[7], "features.f32", features, (size_t) n_features * sizeof(float)) ||
        write_file(argv[7], "logits.f32", logits, (size_t) (n_prompt + n_steps) * (size_t) n_vocab * sizeof(float)) ||
        write_file(argv[7], "tokens.i32", out_tokens, (size_t) n_steps * sizeof(int32_t))) {
        goto done;
    }
    printf("prompt %ld tokens, %ld steps, n_vocab %d, features %lld\n", n_prompt, n_steps, n_vocab,
           (long long) n_features);
    rc = 0;

done:
    mllama_context_free(ctx);
    mllama_model_free(model);
    free(pixels);
    free(prompt);
    free(features);
    free(logits);
    free(out_tokens);
    free(rows);
    free(table);
    return rc;
}
