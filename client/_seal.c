/* client._seal: a batch's record contents sealed in one call.
 *
 * seal_many(key, contents, aads, nonces) -> (payloads, starts) | None
 *
 * Each content (a dict of str -> str or list of str: what the gate keeps) is
 * written as compact JSON and sealed with AES-256-GCM under its 12-byte nonce
 * (nonces: 12 bytes a record, back to back) with its 16-byte aad (aads: the
 * records' rids, back to back): payload = nonce || ciphertext || tag, the same
 * bytes as client.store.Keys.seal with cryptography's AESGCM. The payloads come
 * back back to back, with their n + 1 start offsets as native uint64 (an
 * array('Q')).
 *
 * The cipher is OpenSSL's libcrypto, loaded at the first call (client/aead.h).
 * None (and the caller's Python path) where it cannot be loaded, or where a content is not of that plain shape (any other value type,
 * a string that is not valid UTF-8). The encryption runs without the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "aead.h"
#include "json_out.h"

/* ---- compact JSON of a plain content dict ---------------------------------------- */

/* 0: written; 1: not a plain string (the caller's Python path); -1: no memory */
static int put_str(Bytes *b, PyObject *s) {
    if (!PyUnicode_Check(s)) return 1;
    Py_ssize_t len;
    const char *u = PyUnicode_AsUTF8AndSize(s, &len); /* cached; ASCII: the data */
    if (!u) {
        PyErr_Clear(); /* e.g. a lone surrogate */
        return 1;
    }
    if (bytes_room(b, 6 * (size_t)len + 2) < 0) return -1; /* \u00XX: 6 bytes at most */
    unsigned char *end = json_string(b->p + b->n, (const unsigned char *)u, (size_t)len);
    b->n = (size_t)(end - b->p);
    return 0;
}

static int put_char(Bytes *b, char c) {
    if (bytes_room(b, 1) < 0) return -1;
    b->p[b->n++] = (unsigned char)c;
    return 0;
}

/* the content as {"key":value,...} in its key order (as orjson.dumps writes it) */
static int put_content(Bytes *b, PyObject *d) {
    if (!PyDict_CheckExact(d)) return 1;
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    int first = 1, r;
    if (put_char(b, '{') < 0) return -1;
    while (PyDict_Next(d, &pos, &k, &v)) {
        if (!first && put_char(b, ',') < 0) return -1;
        first = 0;
        if ((r = put_str(b, k))) return r;
        if (put_char(b, ':') < 0) return -1;
        if (PyList_CheckExact(v)) {
            if (put_char(b, '[') < 0) return -1;
            for (Py_ssize_t i = 0; i < PyList_GET_SIZE(v); i++) {
                if (i && put_char(b, ',') < 0) return -1;
                if ((r = put_str(b, PyList_GET_ITEM(v, i)))) return r;
            }
            if (put_char(b, ']') < 0) return -1;
        } else if ((r = put_str(b, v))) {
            return r;
        }
    }
    return put_char(b, '}');
}

/* ---- sealing ------------------------------------------------------------------- */

static PyObject *py_seal_many(PyObject *Py_UNUSED(mod), PyObject *args) {
    Py_buffer key, aads, nonces;
    PyObject *contents;
    if (!PyArg_ParseTuple(args, "y*Oy*y*", &key, &contents, &aads, &nonces)) return NULL;
    PyObject *seq = NULL, *result = NULL, *payloads = NULL, *starts = NULL;
    Bytes json = {0};
    size_t *ends = NULL;
    if (key.len != 32) {
        PyErr_SetString(PyExc_ValueError, "seal_many(): a 32-byte key");
        goto done;
    }
    seq = PySequence_Fast(contents, "seal_many(): contents must be a list");
    if (!seq) goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (aads.len != AAD * n || nonces.len != NONCE * n) {
        PyErr_SetString(PyExc_ValueError,
                        "seal_many(): 16 bytes of aad and 12 of nonce a content");
        goto done;
    }
    if (load_crypto() < 0) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    ends = PyMem_Malloc((n + 1) * sizeof *ends);
    if (!ends) {
        PyErr_NoMemory();
        goto done;
    }
    size_t total = 0;
    for (Py_ssize_t j = 0; j < n; j++) {
        int r = put_content(&json, PySequence_Fast_GET_ITEM(seq, j));
        if (r < 0) {
            PyErr_NoMemory();
            goto done;
        }
        if (r > 0) { /* not plain: the caller's path for the whole batch */
            result = Py_NewRef(Py_None);
            goto done;
        }
        ends[j] = json.n;
        if (json.n > (size_t)INT_MAX) {
            result = Py_NewRef(Py_None);
            goto done;
        }
    }
    total = json.n + (size_t)n * (NONCE + TAG);
    payloads = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    starts = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)((n + 1) * sizeof(uint64_t)));
    if (!payloads || !starts) goto done;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(payloads);
    uint64_t *st = (uint64_t *)PyBytes_AS_STRING(starts);
    const unsigned char *k = key.buf, *aad = aads.buf, *iv = nonces.buf;
    const unsigned char *pt = json.p;
    int ok = 1;
    Py_BEGIN_ALLOW_THREADS
    EVP_CIPHER_CTX *ctx = aead_begin(k);
    ok = ctx != NULL;
    size_t at = 0, from = 0;
    for (Py_ssize_t j = 0; ok && j < n; j++) {
        int len = (int)(ends[j] - from);
        st[j] = at;
        ok = aead_seal(ctx, iv + NONCE * j, aad + AAD * j, pt + from, len, out + at);
        at += NONCE + (size_t)len + TAG;
        from = ends[j];
    }
    st[n] = at;
    aead_end(ctx);
    Py_END_ALLOW_THREADS
    if (!ok) {
        PyErr_SetString(PyExc_RuntimeError, "seal_many(): libcrypto's AES-GCM failed");
        goto done;
    }
    result = PyTuple_Pack(2, payloads, starts);
done:
    Py_XDECREF(payloads);
    Py_XDECREF(starts);
    Py_XDECREF(seq);
    PyMem_Free(json.p);
    PyMem_Free(ends);
    PyBuffer_Release(&key);
    PyBuffer_Release(&aads);
    PyBuffer_Release(&nonces);
    return result;
}

static PyObject *py_available(PyObject *Py_UNUSED(mod), PyObject *Py_UNUSED(arg)) {
    return PyBool_FromLong(load_crypto() > 0);
}

static PyMethodDef methods[] = {
    {"seal_many", py_seal_many, METH_VARARGS,
     "seal_many(key, contents, aads, nonces) -> (payloads, starts) | None"},
    {"available", py_available, METH_NOARGS,
     "available() -> bool: libcrypto's AES-GCM could be loaded."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_seal", NULL, -1, methods};

PyMODINIT_FUNC PyInit__seal(void) { return PyModule_Create(&module); }
