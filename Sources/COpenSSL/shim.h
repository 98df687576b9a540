// OpenSSL for FerryTLS: the library's headers plus wrappers for what Swift cannot call
// (function-like macros) and the PSK callbacks, which must be C function pointers.
#ifndef FERRY_COPENSSL_SHIM_H
#define FERRY_COPENSSL_SHIM_H

#include <openssl/ssl.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>
#include <stdlib.h>
#include <string.h>

static inline int ferry_ssl_ctx_set_min_tls12(SSL_CTX *ctx) {
    return (int)SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
}

static inline int ferry_ssl_ctx_set_min_tls13(SSL_CTX *ctx) {
    return (int)SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
}

/// Partial writes and a moving buffer: a non-blocking SSL_write may be retried with the
/// rest of the data from another address.
static inline void ferry_ssl_ctx_set_modes(SSL_CTX *ctx) {
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION);
    // No session tickets unless asked for (ferry_ssl_ctx_enable_resumption): a client
    // reads a ticket as post-handshake data, which only a channel with a reader consumes.
    SSL_CTX_set_num_tickets(ctx, 0);
    // Bulk transfer: read several records per syscall, and prefer AES-128-GCM (as strong
    // as needed, a third cheaper than AES-256 on AES-NI).
    SSL_CTX_set_read_ahead(ctx, 1);
    SSL_CTX_set_ciphersuites(ctx, "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256");
}

/// Server: one TLS 1.3 ticket per handshake (written within the handshake), so a client
/// that reconnects (a postcopy recovery, its urgent channel) resumes without certificates
/// or signatures. The session id context is what lets a session that verified the client's
/// certificate be resumed at all.
static inline int ferry_ssl_ctx_enable_resumption(SSL_CTX *ctx) {
    SSL_CTX_set_num_tickets(ctx, 1);
    static const unsigned char context[] = "ferry-migration";
    return SSL_CTX_set_session_id_context(ctx, context, sizeof(context) - 1);
}

static inline void ferry_ssl_ctx_require_peer_cert(SSL_CTX *ctx, int require) {
    SSL_CTX_set_verify(ctx, require ? (SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT) : SSL_VERIFY_PEER, NULL);
}

/// End of stream without close_notify reads as EOF: the migration stream's own framing
/// tells a complete stream from a cut one.
static inline void ferry_ssl_ignore_unexpected_eof(SSL *ssl) {
    SSL_set_options(ssl, SSL_OP_IGNORE_UNEXPECTED_EOF);
}

static inline int ferry_ssl_set_sni(SSL *ssl, const char *name) {
    return (int)SSL_set_tlsext_host_name(ssl, name);
}

static inline int ferry_ssl_expect_ip(SSL *ssl, const char *ip) {
    return X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), ip);
}

static inline const char *ferry_ssl_cipher_name(const SSL *ssl) {
    const SSL_CIPHER *c = SSL_get_current_cipher(ssl);
    return c ? SSL_CIPHER_get_name(c) : "none";
}

// MARK: pre-shared keys (QEMU's tls-creds-psk: keys.psk lines "identity:hexkey")

struct ferry_psk {
    int is_server;
    char identity[129];
    unsigned char key[256];
    unsigned int key_len;
    /// Server: every identity/key pair of the file.
    unsigned int count;
    char (*identities)[129];
    unsigned char (*keys)[256];
    unsigned int *key_lens;
};

static unsigned int ferry_psk_client_cb(SSL *ssl, const char *hint, char *identity, unsigned int max_identity_len,
                                        unsigned char *psk, unsigned int max_psk_len) {
    (void)hint;
    struct ferry_psk *p = (struct ferry_psk *)SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), 0);
    if (!p || strlen(p->identity) + 1 > max_identity_len || p->key_len > max_psk_len) return 0;
    strcpy(identity, p->identity);
    memcpy(psk, p->key, p->key_len);
    return p->key_len;
}

static unsigned int ferry_psk_server_cb(SSL *ssl, const char *identity, unsigned char *psk, unsigned int max_psk_len) {
    struct ferry_psk *p = (struct ferry_psk *)SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), 0);
    if (!p || !identity) return 0;
    for (unsigned int i = 0; i < p->count; i++) {
        if (strcmp(p->identities[i], identity) == 0 && p->key_lens[i] <= max_psk_len) {
            memcpy(psk, p->keys[i], p->key_lens[i]);
            return p->key_lens[i];
        }
    }
    return 0;
}

/// Client: one identity and key. Server: `count` pairs. Copies everything; the copy lives
/// as long as the context (freed by ferry_ssl_ctx_free).
static inline int ferry_ssl_ctx_set_psk(SSL_CTX *ctx, int is_server, unsigned int count,
                                        const char *const *identities, const unsigned char *const *keys,
                                        const unsigned int *key_lens) {
    struct ferry_psk *p = (struct ferry_psk *)calloc(1, sizeof *p);
    if (!p || count == 0) { free(p); return 0; }
    p->is_server = is_server;
    p->count = count;
    p->identities = calloc(count, sizeof *p->identities);
    p->keys = calloc(count, sizeof *p->keys);
    p->key_lens = calloc(count, sizeof *p->key_lens);
    if (!p->identities || !p->keys || !p->key_lens) return 0;
    for (unsigned int i = 0; i < count; i++) {
        if (strlen(identities[i]) > 128 || key_lens[i] > 256) return 0;
        strcpy(p->identities[i], identities[i]);
        memcpy(p->keys[i], keys[i], key_lens[i]);
        p->key_lens[i] = key_lens[i];
    }
    strcpy(p->identity, p->identities[0]);
    memcpy(p->key, p->keys[0], p->key_lens[0]);
    p->key_len = p->key_lens[0];
    SSL_CTX_set_ex_data(ctx, 0, p);
    if (is_server) SSL_CTX_set_psk_server_callback(ctx, ferry_psk_server_cb);
    else SSL_CTX_set_psk_client_callback(ctx, ferry_psk_client_cb);
    // TLS 1.3 uses these callbacks only with a SHA-256 suite.
    SSL_CTX_set_ciphersuites(ctx, "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256");
    return 1;
}

static inline void ferry_ssl_ctx_free(SSL_CTX *ctx) {
    struct ferry_psk *p = (struct ferry_psk *)SSL_CTX_get_ex_data(ctx, 0);
    if (p) {
        OPENSSL_cleanse(p->keys, p->count * sizeof *p->keys);
        OPENSSL_cleanse(p->key, sizeof p->key);
        free(p->identities); free(p->keys); free(p->key_lens); free(p);
    }
    SSL_CTX_free(ctx);
}

#endif
