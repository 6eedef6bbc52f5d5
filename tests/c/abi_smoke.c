/* The public header used from plain C (C99, -pedantic -Werror): the ABI carries no C++ types. */
#include "mllama.h"

#include <stdio.h>
#include <string.h>

int main(int argc, char ** argv) {
    mllama_model * model = NULL;
    mllama_model_params params = mllama_model_default_params();
    mllama_hparams hp;
    mllama_status st;

    if (mllama_abi_version() != MLLAMA_ABI_VERSION) return 10;
    st = mllama_model_load("/nonexistent/model.gguf", NULL, &params, &model);
    if (st != MLLAMA_ERR_IO || model != NULL || strlen(mllama_last_error()) == 0) return 11;
    st = mllama_model_load(NULL, NULL, &params, &model);
    if (st != MLLAMA_ERR_INVALID_ARGUMENT) return 12;
    if (mllama_model_get_hparams(NULL, &hp) != MLLAMA_ERR_INVALID_ARGUMENT) return 13;
    if (argc < 2) return 0;
    st = mllama_model_load(argv[1], NULL, &params, &model);
    if (st != MLLAMA_OK) {
        fprintf(stderr, "%s: %s\n", mllama_status_name(st), mllama_last_error());
        return 14;
    }
    if (mllama_model_get_hparams(model, &hp) != MLLAMA_OK) return 15;
    printf("n_vocab=%d n_vocab_embd=%d n_layer=%d v_n_layer=%d\n", hp.n_vocab, hp.n_vocab_embd, hp.n_layer, hp.v_n_layer);
    mllama_model_free(model);
    return 0;
}
