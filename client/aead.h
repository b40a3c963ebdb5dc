/* AES-256-GCM through OpenSSL's libcrypto, loaded at run time (the library
 * Python's own _hashlib and cryptography's wheels build against): no headers or link
 * flags at build time. Included by client/_seal.c and client/_native.c. */
#ifndef FEDSTREAM_AEAD_H
#define FEDSTREAM_AEAD_H
#include <dlfcn.h>
#include <stddef.h>
#include <string.h>

typedef struct evp_cipher_ctx EVP_CIPHER_CTX;
typedef struct evp_cipher EVP_CIPHER;
typedef struct engine ENGINE;

static EVP_CIPHER_CTX *(*ctx_new)(void);
static void (*ctx_free)(EVP_CIPHER_CTX *);
static const EVP_CIPHER *(*aes_256_gcm)(void);
static int (*encrypt_init)(EVP_CIPHER_CTX *, const EVP_CIPHER *, ENGINE *,
                           const unsigned char *, const unsigned char *);
static int (*encrypt_update)(EVP_CIPHER_CTX *, unsigned char *, int *,
                             const unsigned char *, int);
static int (*encrypt_final)(EVP_CIPHER_CTX *, unsigned char *, int *);
static int (*ctx_ctrl)(EVP_CIPHER_CTX *, int, int, void *);

#define CTRL_GCM_GET_TAG 0x10
#define NONCE 12
#define TAG 16
#define AAD 16

static int crypto_state; /* 0: not tried, 1: loaded, -1: not available */

static int load_crypto(void) {
    if (crypto_state) return crypto_state;
    static const char *names[] = {"libcrypto.so.3", "libcrypto.so", "libcrypto.dylib"};
    void *lib = NULL;
    for (size_t i = 0; i < sizeof names / sizeof *names && !lib; i++)
        lib = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
    crypto_state = -1;
    if (!lib) return crypto_state;
    *(void **)&ctx_new = dlsym(lib, "EVP_CIPHER_CTX_new");
    *(void **)&ctx_free = dlsym(lib, "EVP_CIPHER_CTX_free");
    *(void **)&aes_256_gcm = dlsym(lib, "EVP_aes_256_gcm");
    *(void **)&encrypt_init = dlsym(lib, "EVP_EncryptInit_ex");
    *(void **)&encrypt_update = dlsym(lib, "EVP_EncryptUpdate");
    *(void **)&encrypt_final = dlsym(lib, "EVP_EncryptFinal_ex");
    *(void **)&ctx_ctrl = dlsym(lib, "EVP_CIPHER_CTX_ctrl");
    if (ctx_new && ctx_free && aes_256_gcm && encrypt_init && encrypt_update &&
        encrypt_final && ctx_ctrl)
        crypto_state = 1;
    return crypto_state;
}

/* Seals pt (len bytes) with aad (16 bytes) under nonce (12 bytes) with a context
 * set up by aead_begin: out = nonce || ciphertext || tag (len + 28 bytes). 1: done. */
static int aead_seal(EVP_CIPHER_CTX *ctx, const unsigned char *nonce,
                     const unsigned char *aad, const unsigned char *pt, int len,
                     unsigned char *out) {
    int got = 0, fin = 0, dummy = 0;
    memcpy(out, nonce, NONCE);
    return encrypt_init(ctx, NULL, NULL, NULL, nonce) == 1 &&
           encrypt_update(ctx, NULL, &dummy, aad, AAD) == 1 &&
           encrypt_update(ctx, out + NONCE, &got, pt, len) == 1 &&
           encrypt_final(ctx, out + NONCE + got, &fin) == 1 && got + fin == len &&
           ctx_ctrl(ctx, CTRL_GCM_GET_TAG, TAG, out + NONCE + len) == 1;
}

/* A context for a batch under a 32-byte key (NULL: failed); aead_end frees it. */
static EVP_CIPHER_CTX *aead_begin(const unsigned char *key) {
    EVP_CIPHER_CTX *ctx = ctx_new();
    if (ctx && encrypt_init(ctx, aes_256_gcm(), NULL, key, NULL) != 1) {
        ctx_free(ctx);
        return NULL;
    }
    return ctx;
}

static void aead_end(EVP_CIPHER_CTX *ctx) {
    if (ctx) ctx_free(ctx);
}
#endif
