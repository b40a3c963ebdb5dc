/* Native hot paths of ingestion: the gate's fast path for the common record shape,
 * and the near-duplicate index for client.ingest: word 3-gram MinHash sketches and a
 * banded LSH over the last `horizon` records; and a Bloom filter over the store's
 * dedup keys, so that the store is asked only about keys it may hold.
 *
 * Tokens are hashed here with rensa's FxHash-style byte hash (rensa src/utils.rs,
 * checked against rensa's own `hash_token_sets` in the tests); sketches() turns them
 * into rensa's R-MinHash digests here too (byte for byte rensa's, also tested), and
 * the index below keeps the digests.
 *
 * A record is a near-duplicate when it shares a whole band (rows consecutive digest
 * values) with an indexed record whose digest agrees with its own in at least
 * `threshold` of the positions.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "aead.h"
#include "json_out.h"
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if PY_LITTLE_ENDIAN != 1
#error "client._native assumes a little-endian host"
#endif

/* ---- rensa's token hash (src/utils.rs: calculate_hash_fast) ------------------ */

static inline uint64_t rd64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v; /* little-endian host (x86-64, aarch64) */
}

static inline uint32_t rd32(const unsigned char *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline uint64_t mix(uint64_t x, uint64_t y) {
    unsigned __int128 full = (unsigned __int128)x * y;
    return (uint64_t)full ^ (uint64_t)(full >> 64);
}

static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static uint64_t token_hash(const unsigned char *b, size_t len) {
    uint64_t s0 = 0x243f6a8885a308d3ULL, s1 = 0x13198a2e03707344ULL;
    if (len <= 16) {
        if (len >= 8) {
            s0 ^= rd64(b);
            s1 ^= rd64(b + len - 8);
        } else if (len >= 4) {
            s0 ^= rd32(b);
            s1 ^= rd32(b + len - 4);
        } else if (len > 0) {
            s0 ^= b[0];
            s1 ^= ((uint64_t)b[len - 1] << 8) | b[len / 2];
        }
    } else {
        size_t off = 0;
        while (off < len - 16) {
            uint64_t t = mix(s0 ^ rd64(b + off), 0xa4093822299f31d0ULL ^ rd64(b + off + 8));
            s0 = s1;
            s1 = t;
            off += 16;
        }
        s0 ^= rd64(b + len - 16);
        s1 ^= rd64(b + len - 8);
    }
    uint64_t h = mix(s0, s1) ^ (uint64_t)len;
    return rotl64(h * 0xf1357aea2e62a9c5ULL, 26);
}

/* ---- shingles of an ASCII key text: word 3-grams, as client.ingest.shingles ---- */

static inline int is_word(unsigned char c) {
    /* a bitmap of [0-9] (48-57) and of [A-Z] _ [a-z] (65-90, 95, 97-122) */
    static const uint64_t map[2] = {0x03ff000000000000ULL, 0x07fffffe87fffffeULL};
    return c < 128 && (map[c >> 6] >> (c & 63)) & 1;
}

typedef struct {
    uint64_t *h;
    Py_ssize_t n, cap;
} HashVec;

static int push(HashVec *v, uint64_t x) {
    if (v->n == v->cap) {
        Py_ssize_t cap = v->cap ? 2 * v->cap : 64;
        uint64_t *h = PyMem_Realloc(v->h, cap * sizeof(uint64_t));
        if (!h) return -1;
        v->h = h;
        v->cap = cap;
    }
    v->h[v->n++] = x;
    return 0;
}

/* Words are the runs of [A-Za-z0-9_] (ASCII \w); a shingle is three consecutive
 * words joined by one space; fewer than three words make one shingle of them all. */
static int ascii_shingles(const unsigned char *s, Py_ssize_t len, HashVec *out,
                          unsigned char **buf, Py_ssize_t *bufcap) {
    Py_ssize_t starts[3], ends[3]; /* the last three words, as a ring */
    Py_ssize_t words = 0;
    if (*bufcap < len + 3) {
        unsigned char *nb = PyMem_Realloc(*buf, len + 3);
        if (!nb) return -1;
        *buf = nb;
        *bufcap = len + 3;
    }
    Py_ssize_t i = 0;
    while (i < len) {
        while (i < len && !is_word(s[i])) i++;
        if (i >= len) break;
        Py_ssize_t st = i;
        while (i < len && is_word(s[i])) i++;
        starts[words % 3] = st;
        ends[words % 3] = i;
        words++;
        if (words >= 3) {
            Py_ssize_t w0 = (words - 3) % 3, w1 = (words - 2) % 3, w2 = (words - 1) % 3;
            if (starts[w1] == ends[w0] + 1 && starts[w2] == ends[w1] + 1 &&
                s[ends[w0]] == ' ' && s[ends[w1]] == ' ') {
                /* joined by single spaces in the text itself (the usual case) */
                if (push(out, token_hash(s + starts[w0], ends[w2] - starts[w0])) < 0) return -1;
                continue;
            }
            Py_ssize_t k = 0;
            for (Py_ssize_t w = words - 3; w < words; w++) {
                Py_ssize_t wl = ends[w % 3] - starts[w % 3];
                if (k) (*buf)[k++] = ' ';
                memcpy(*buf + k, s + starts[w % 3], wl);
                k += wl;
            }
            if (push(out, token_hash(*buf, k)) < 0) return -1;
        }
    }
    if (words < 3) {
        Py_ssize_t k = 0;
        for (Py_ssize_t w = 0; w < words; w++) {
            Py_ssize_t wl = ends[w] - starts[w];
            if (k) (*buf)[k++] = ' ';
            memcpy(*buf + k, s + starts[w], wl);
            k += wl;
        }
        if (push(out, token_hash(*buf, k)) < 0) return -1;
    }
    return 0;
}

/* ---- the index --------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD int num_perm, bands, rows;
    Py_ssize_t horizon;
    double threshold;
    uint32_t *dig;     /* (horizon, num_perm) */
    int64_t *keys;     /* (horizon,) key held by the slot, -1 when empty */
    uint64_t *bh;      /* (horizon, bands) band hashes */
    int32_t *nxt, *prv; /* (horizon, bands) chain links, -1 at the ends */
    int32_t *heads;    /* (bands, nbuckets) */
    uint32_t mask;
    int64_t next_key;
    Py_ssize_t size;
    uint32_t *stamp; /* (horizon,) last query that verified the slot */
    uint32_t query_no;
} NearIndex;

static uint64_t band_hash(const uint32_t *v, int rows) {
    uint64_t h = 0x9e3779b97f4a7c15ULL;
    for (int i = 0; i < rows; i++) h = (h ^ v[i]) * 0xff51afd7ed558ccdULL;
    return h ^ (h >> 29);
}

static void NearIndex_dealloc(NearIndex *self) {
    PyMem_Free(self->dig);
    PyMem_Free(self->keys);
    PyMem_Free(self->bh);
    PyMem_Free(self->nxt);
    PyMem_Free(self->prv);
    PyMem_Free(self->heads);
    PyMem_Free(self->stamp);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int NearIndex_init(NearIndex *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"num_perm", "bands", "horizon", "threshold", NULL};
    int num_perm, bands;
    Py_ssize_t horizon;
    double threshold;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "$iind", names, &num_perm, &bands, &horizon,
                                     &threshold))
        return -1;
    if (num_perm <= 0 || bands <= 0 || num_perm % bands || horizon < 0 ||
        horizon > (1 << 28)) {
        PyErr_SetString(PyExc_ValueError,
                        "num_perm must be a positive multiple of bands, horizon in 0..2**28");
        return -1;
    }
    if (self->dig) {
        PyErr_SetString(PyExc_RuntimeError, "NearIndex is already initialised");
        return -1;
    }
    self->num_perm = num_perm;
    self->bands = bands;
    self->rows = num_perm / bands;
    self->horizon = horizon;
    self->threshold = threshold;
    if (horizon == 0) horizon = 1; /* a horizon of 0 keeps nothing; one spare slot */
    uint32_t nb = 1;
    while (nb < 2 * (uint64_t)horizon) nb <<= 1;
    self->mask = nb - 1;
    self->dig = PyMem_Malloc((size_t)horizon * num_perm * sizeof(uint32_t));
    self->keys = PyMem_Malloc((size_t)horizon * sizeof(int64_t));
    self->bh = PyMem_Malloc((size_t)horizon * bands * sizeof(uint64_t));
    self->nxt = PyMem_Malloc((size_t)horizon * bands * sizeof(int32_t));
    self->prv = PyMem_Malloc((size_t)horizon * bands * sizeof(int32_t));
    self->heads = PyMem_Malloc((size_t)nb * bands * sizeof(int32_t));
    self->stamp = PyMem_Calloc((size_t)horizon, sizeof(uint32_t));
    if (!self->dig || !self->keys || !self->bh || !self->nxt ||
        !self->prv || !self->heads || !self->stamp) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < horizon; i++) self->keys[i] = -1;
    for (size_t i = 0; i < (size_t)nb * bands; i++) self->heads[i] = -1;
    return 0;
}

/* digests argument: a C-contiguous buffer of (n, num_perm) uint32 */
static const uint32_t *row_of(NearIndex *self, Py_buffer *view, Py_ssize_t row) {
    Py_ssize_t width = (Py_ssize_t)self->num_perm * 4;
    if (view->len % width || row < 0 || row >= view->len / width) {
        PyErr_SetString(PyExc_IndexError, "digest row out of range");
        return NULL;
    }
    return (const uint32_t *)((const char *)view->buf + row * width);
}

#define MAX_BANDS 64

/* the chain heads a digest's bands start at, asked for ahead of its query */
static void prefetch_heads(const NearIndex *self, const uint32_t *d) {
    for (int band = 0; band < self->bands; band++) {
        uint64_t h = band_hash(d + band * self->rows, self->rows);
        __builtin_prefetch(&self->heads[(size_t)band * (self->mask + 1) + (h & self->mask)]);
    }
}

static int query_digest(NearIndex *self, const uint32_t *d) {
    int rows = self->rows, n = self->num_perm;
    uint64_t hs[MAX_BANDS];
    if (++self->query_no == 0) { /* wrapped: forget old stamps */
        memset(self->stamp, 0, self->horizon * sizeof(uint32_t));
        self->query_no = 1;
    }
    /* The bands' chain heads are random places in a table of a few MB: ask for all of
     * them first, so that their cache misses overlap instead of queueing. */
    int prefetched = self->bands <= MAX_BANDS;
    for (int band = 0; prefetched && band < self->bands; band++) {
        hs[band] = band_hash(d + band * rows, rows);
        __builtin_prefetch(&self->heads[(size_t)band * (self->mask + 1) + (hs[band] & self->mask)]);
    }
    for (int band = 0; band < self->bands; band++) {
        const uint32_t *bv = d + band * rows;
        uint64_t h = prefetched ? hs[band] : band_hash(bv, rows);
        int32_t slot = self->heads[(size_t)band * (self->mask + 1) + (h & self->mask)];
        while (slot >= 0) {
            size_t sb = (size_t)slot * self->bands + band;
            const uint32_t *other = self->dig + (size_t)slot * n;
            if (self->bh[sb] == h && self->stamp[slot] != self->query_no &&
                memcmp(other + band * rows, bv, rows * sizeof(uint32_t)) == 0) {
                self->stamp[slot] = self->query_no;
                int agree = 0;
                for (int i = 0; i < n; i++) agree += other[i] == d[i];
                if ((double)agree / (double)n >= self->threshold) return 1;
            }
            slot = self->nxt[sb];
        }
    }
    return 0;
}

static void unlink_slot(NearIndex *self, int32_t slot) {
    for (int band = 0; band < self->bands; band++) {
        size_t sb = (size_t)slot * self->bands + band;
        int32_t p = self->prv[sb], x = self->nxt[sb];
        if (p >= 0)
            self->nxt[(size_t)p * self->bands + band] = x;
        else
            self->heads[(size_t)band * (self->mask + 1) + (self->bh[sb] & self->mask)] = x;
        if (x >= 0) self->prv[(size_t)x * self->bands + band] = p;
    }
    self->keys[slot] = -1;
    self->size--;
}

static int64_t add_digest(NearIndex *self, const uint32_t *d) {
    int64_t key = self->next_key++;
    if (self->horizon == 0) return key; /* evicted at once */
    int32_t slot = (int32_t)(key % self->horizon);
    if (self->keys[slot] >= 0) unlink_slot(self, slot); /* the oldest record leaves */
    memcpy(self->dig + (size_t)slot * self->num_perm, d, self->num_perm * sizeof(uint32_t));
    for (int band = 0; band < self->bands; band++) {
        size_t sb = (size_t)slot * self->bands + band;
        uint64_t h = band_hash(d + band * self->rows, self->rows);
        int32_t *head = &self->heads[(size_t)band * (self->mask + 1) + (h & self->mask)];
        self->bh[sb] = h;
        self->prv[sb] = -1;
        self->nxt[sb] = *head;
        if (*head >= 0) self->prv[(size_t)*head * self->bands + band] = slot;
        *head = slot;
    }
    self->keys[slot] = key;
    self->stamp[slot] = 0;
    self->size++;
    return key;
}

static PyObject *NearIndex_query(NearIndex *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t row;
    if (!PyArg_ParseTuple(args, "y*n", &view, &row)) return NULL;
    const uint32_t *d = row_of(self, &view, row);
    int found = d ? query_digest(self, d) : -1;
    PyBuffer_Release(&view);
    if (found < 0) return NULL;
    return PyBool_FromLong(found);
}

static PyObject *NearIndex_add(NearIndex *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t row;
    if (!PyArg_ParseTuple(args, "y*n", &view, &row)) return NULL;
    const uint32_t *d = row_of(self, &view, row);
    if (!d) {
        PyBuffer_Release(&view);
        return NULL;
    }
    int64_t key = add_digest(self, d);
    PyBuffer_Release(&view);
    return PyLong_FromLongLong(key);
}

/* query, then add when it is not a near-duplicate: the key, or -1 */
static PyObject *NearIndex_offer(NearIndex *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t row;
    if (!PyArg_ParseTuple(args, "y*n", &view, &row)) return NULL;
    const uint32_t *d = row_of(self, &view, row);
    if (!d) {
        PyBuffer_Release(&view);
        return NULL;
    }
    int64_t key = query_digest(self, d) ? -1 : add_digest(self, d);
    PyBuffer_Release(&view);
    return PyLong_FromLongLong(key);
}

static void forget_key(NearIndex *self, long long key) {
    if (key < 0 || key >= self->next_key || self->horizon == 0) return;
    int32_t slot = (int32_t)(key % self->horizon);
    if (self->keys[slot] == key) unlink_slot(self, slot);
    /* Removing the newest keys (a failed commit) hands their slots back; the older
     * records they pushed out of a full horizon stay out (the batch decided again
     * pushes out the same ones; after a commit that failed for good, the horizon
     * is that many records short until more arrive). */
    while (self->next_key > 0 &&
           self->keys[(self->next_key - 1) % self->horizon] != self->next_key - 1)
        self->next_key--;
}

static PyObject *NearIndex_remove(NearIndex *self, PyObject *arg) {
    long long key = PyLong_AsLongLong(arg);
    if (key == -1 && PyErr_Occurred()) return NULL;
    forget_key(self, key);
    Py_RETURN_NONE;
}

/* A set of 16-byte keys (pointers into blobs that outlive it), open addressing. */
typedef struct {
    const unsigned char **slot;
    size_t mask;
} KeySet;

static int keyset_init(KeySet *ks, Py_ssize_t n) {
    size_t cap = 16;
    while (cap < 2 * (size_t)n + 2) cap <<= 1;
    ks->slot = PyMem_Calloc(cap, sizeof *ks->slot);
    ks->mask = cap - 1;
    return ks->slot ? 0 : -1;
}

/* 1 if key is in, else 0 (and added when add) */
static int keyset_has(KeySet *ks, const unsigned char *key, int add) {
    size_t i = rd64(key) & ks->mask; /* keyed hashes: uniform already */
    while (ks->slot[i]) {
        if (!memcmp(ks->slot[i], key, 16)) return 1;
        i = (i + 1) & ks->mask;
    }
    if (add) ks->slot[i] = key;
    return 0;
}

/* key in a Python set of bytes (only asked when the set is not empty) */
static int pyset_has(PyObject *set, const unsigned char *key) {
    if (PySet_GET_SIZE(set) == 0) return 0;
    PyObject *b = PyBytes_FromStringAndSize((const char *)key, 16);
    if (!b) return -1;
    int hit = PySet_Contains(set, b);
    Py_DECREF(b);
    return hit;
}

static int key_blob(PyObject *o, Py_buffer *view, const char *what) {
    if (PyObject_GetBuffer(o, view, PyBUF_SIMPLE) < 0) return -1;
    if (view->len % 16) {
        PyErr_Format(PyExc_ValueError, "decide(): %s must hold whole 16-byte keys", what);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* decide(digests, rids, chashes, known_rids, known_content, prev_rids, prev_chashes)
 * -> [int]: a batch's duplicate decisions, in order. rids, chashes: the batch's
 * 16-byte keys, one blob each; prev_*: those of the batch whose commit is in flight
 * (its records count as stored). -2 (DUP_ID): its rid is in known_rids, prev_rids
 * or earlier in the batch among the kept; -3 (DUP_CONTENT): its content hash is;
 * -1 (DUP_NEAR): offer refused it; else the key offer gave it. On an error nothing
 * stays indexed. client/near_py.py has the same in Python. */
static PyObject *NearIndex_decide(NearIndex *self, PyObject *args) {
    Py_buffer view, rv = {0}, cv = {0}, prv = {0}, pcv = {0};
    PyObject *rids, *chashes, *known_rids, *known_content, *prev_r, *prev_c;
    if (!PyArg_ParseTuple(args, "y*OOO!O!OO", &view, &rids, &chashes, &PySet_Type,
                          &known_rids, &PySet_Type, &known_content, &prev_r, &prev_c))
        return NULL;
    PyObject *out = NULL;
    KeySet seen_r = {0}, seen_c = {0};
    Py_ssize_t j = 0, n = 0;
    int got = 0;
    if (key_blob(rids, &rv, "rids") < 0) goto done;
    got = 1;
    if (key_blob(chashes, &cv, "chashes") < 0) goto done;
    got = 2;
    if (key_blob(prev_r, &prv, "prev_rids") < 0) goto done;
    got = 3;
    if (key_blob(prev_c, &pcv, "prev_chashes") < 0) goto done;
    got = 4;
    n = rv.len / 16;
    if (cv.len / 16 != n) {
        PyErr_SetString(PyExc_ValueError, "decide(): rids and chashes differ in length");
        goto done;
    }
    if (keyset_init(&seen_r, n + prv.len / 16) < 0 ||
        keyset_init(&seen_c, n + pcv.len / 16) < 0) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < prv.len / 16; i++)
        keyset_has(&seen_r, (const unsigned char *)prv.buf + 16 * i, 1);
    for (Py_ssize_t i = 0; i < pcv.len / 16; i++)
        keyset_has(&seen_c, (const unsigned char *)pcv.buf + 16 * i, 1);
    out = PyList_New(n);
    if (!out) goto done;
    for (j = 0; j < n; j++) {
        const unsigned char *rid = (const unsigned char *)rv.buf + 16 * j;
        const unsigned char *chash = (const unsigned char *)cv.buf + 16 * j;
        long long verdict;
        if (j + 1 < n && view.len >= (j + 2) * (Py_ssize_t)self->num_perm * 4)
            prefetch_heads(self, (const uint32_t *)view.buf + (j + 1) * self->num_perm);
        int hit = pyset_has(known_rids, rid);
        if (hit == 0) hit = keyset_has(&seen_r, rid, 0);
        if (hit < 0) goto fail;
        if (hit) {
            verdict = -2;
        } else {
            hit = pyset_has(known_content, chash);
            if (hit == 0) hit = keyset_has(&seen_c, chash, 0);
            if (hit < 0) goto fail;
            if (hit) {
                verdict = -3;
            } else {
                const uint32_t *d = row_of(self, &view, j);
                if (!d) goto fail;
                verdict = query_digest(self, d) ? -1 : add_digest(self, d);
                if (verdict >= 0) {
                    keyset_has(&seen_r, rid, 1);
                    keyset_has(&seen_c, chash, 1);
                }
            }
        }
        PyObject *v = PyLong_FromLongLong(verdict);
        if (!v) {
            if (verdict >= 0) forget_key(self, verdict);
            goto fail;
        }
        PyList_SET_ITEM(out, j, v);
    }
    goto done;
fail:
    for (Py_ssize_t i = j - 1; i >= 0; i--) {
        long long key = PyLong_AsLongLong(PyList_GET_ITEM(out, i));
        if (key >= 0) forget_key(self, key);
    }
    Py_CLEAR(out);
done:
    PyMem_Free(seen_r.slot);
    PyMem_Free(seen_c.slot);
    if (got >= 1) PyBuffer_Release(&rv);
    if (got >= 2) PyBuffer_Release(&cv);
    if (got >= 3) PyBuffer_Release(&prv);
    if (got >= 4) PyBuffer_Release(&pcv);
    PyBuffer_Release(&view);
    return out;
}

static PyObject *NearIndex_candidates(NearIndex *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t row;
    if (!PyArg_ParseTuple(args, "y*n", &view, &row)) return NULL;
    const uint32_t *d = row_of(self, &view, row);
    PyObject *out = d ? PySet_New(NULL) : NULL;
    if (!out) {
        PyBuffer_Release(&view);
        return NULL;
    }
    for (int band = 0; band < self->bands; band++) {
        const uint32_t *bv = d + band * self->rows;
        uint64_t h = band_hash(bv, self->rows);
        int32_t slot = self->heads[(size_t)band * (self->mask + 1) + (h & self->mask)];
        while (slot >= 0) {
            size_t sb = (size_t)slot * self->bands + band;
            if (self->bh[sb] == h &&
                memcmp(self->dig + (size_t)slot * self->num_perm + band * self->rows, bv,
                       self->rows * sizeof(uint32_t)) == 0) {
                PyObject *k = PyLong_FromLongLong(self->keys[slot]);
                if (!k || PySet_Add(out, k) < 0) {
                    Py_XDECREF(k);
                    Py_DECREF(out);
                    PyBuffer_Release(&view);
                    return NULL;
                }
                Py_DECREF(k);
            }
            slot = self->nxt[sb];
        }
    }
    PyBuffer_Release(&view);
    return out;
}

static Py_ssize_t NearIndex_len(NearIndex *self) { return self->size; }

static PyMethodDef NearIndex_methods[] = {
    {"query", (PyCFunction)NearIndex_query, METH_VARARGS,
     "query(digests, row) -> bool: is the row a near-duplicate of an indexed record?"},
    {"add", (PyCFunction)NearIndex_add, METH_VARARGS,
     "add(digests, row) -> key: index the row, the oldest record leaving at the horizon."},
    {"offer", (PyCFunction)NearIndex_offer, METH_VARARGS,
     "offer(digests, row) -> key, or -1 for a near-duplicate (then nothing is added)."},
    {"remove", (PyCFunction)NearIndex_remove, METH_O, "remove(key): drop a record."},
    {"decide", (PyCFunction)NearIndex_decide, METH_VARARGS,
     "decide(digests, rids, chashes, known_rids, known_content, prev_rids, prev_chashes)"
     " -> [verdict | key]."},
    {"candidates", (PyCFunction)NearIndex_candidates, METH_VARARGS,
     "candidates(digests, row) -> set of keys sharing a whole band with the row."},
    {NULL, NULL, 0, NULL}};

static PySequenceMethods NearIndex_as_sequence = {.sq_length = (lenfunc)NearIndex_len};

static PyTypeObject NearIndexType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "client._native.NearIndex",
    .tp_basicsize = sizeof(NearIndex),
    .tp_dealloc = (destructor)NearIndex_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Banded MinHash LSH over the last `horizon` records.",
    .tp_methods = NearIndex_methods,
    .tp_as_sequence = &NearIndex_as_sequence,
    .tp_init = (initproc)NearIndex_init,
    .tp_new = PyType_GenericNew,
};

/* ---- the dedup-key filter ---------------------------------------------------------
 * A Bloom filter over 16-byte keyed hashes (HMAC outputs, so their bits are already
 * uniform: the k probe positions come straight from the key, h1 + i * h2). A key it
 * never saw is certainly not stored; "maybe" keys are looked up in the store. */

typedef struct {
    PyObject_HEAD uint64_t *bits;
    int log2, k;
    Py_ssize_t added;
} KeyFilter;

static void KeyFilter_dealloc(KeyFilter *self) {
    PyMem_Free(self->bits);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int KeyFilter_init(KeyFilter *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"log2_bits", "k", NULL};
    int log2, k;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "$ii", names, &log2, &k)) return -1;
    if (log2 < 6 || log2 > 34 || k < 1 || k > 16) {
        PyErr_SetString(PyExc_ValueError, "log2_bits in 6..34, k in 1..16");
        return -1;
    }
    if (self->bits) {
        PyErr_SetString(PyExc_RuntimeError, "KeyFilter is already initialised");
        return -1;
    }
    size_t words = (size_t)1 << (log2 - 6);
    /* zeroed and touched now: the filter's memory is what it is from the start */
    self->bits = PyMem_Calloc(words, sizeof(uint64_t));
    if (!self->bits) {
        PyErr_NoMemory();
        return -1;
    }
    memset(self->bits, 0, words * sizeof(uint64_t));
    self->log2 = log2;
    self->k = k;
    return 0;
}

/* The key's bytes as a pointer, or NULL (TypeError/ValueError set). */
static const unsigned char *filter_key(PyObject *item) {
    if (!PyBytes_Check(item) || PyBytes_GET_SIZE(item) < 16) {
        PyErr_SetString(PyExc_TypeError, "KeyFilter keys are bytes of at least 16");
        return NULL;
    }
    return (const unsigned char *)PyBytes_AS_STRING(item);
}

static inline uint64_t filter_pos(const KeyFilter *f, uint64_t h1, uint64_t h2, int i) {
    return (h1 + (uint64_t)i * h2) >> (64 - f->log2);
}

static inline void filter_set(KeyFilter *self, const unsigned char *key) {
    uint64_t h1 = rd64(key), h2 = rd64(key + 8) | 1;
    for (int i = 0; i < self->k; i++) {
        uint64_t p = filter_pos(self, h1, h2, i);
        self->bits[p >> 6] |= (uint64_t)1 << (p & 63);
    }
}

static inline int filter_has(const KeyFilter *self, const unsigned char *key) {
    uint64_t h1 = rd64(key), h2 = rd64(key + 8) | 1;
    for (int i = 0; i < self->k; i++) {
        uint64_t p = filter_pos(self, h1, h2, i);
        if (!((self->bits[p >> 6] >> (p & 63)) & 1)) return 0;
    }
    return 1;
}

/* The k words of a key are random places in megabytes of bits: asking for those of a
 * key a few keys ahead lets the cache misses of several keys overlap. */
static inline void filter_prefetch(const KeyFilter *self, const unsigned char *key) {
    uint64_t h1 = rd64(key), h2 = rd64(key + 8) | 1;
    for (int i = 0; i < self->k; i++)
        __builtin_prefetch(&self->bits[filter_pos(self, h1, h2, i) >> 6]);
}

/* keys: a sequence of bytes (at least 16 each), or one bytes of 16-byte keys */
static int blob_keys(PyObject *keys, const unsigned char **blob, Py_ssize_t *n) {
    if (!PyBytes_Check(keys)) return 0;
    if (PyBytes_GET_SIZE(keys) % 16) {
        PyErr_SetString(PyExc_ValueError, "a KeyFilter blob holds whole 16-byte keys");
        return -1;
    }
    *blob = (const unsigned char *)PyBytes_AS_STRING(keys);
    *n = PyBytes_GET_SIZE(keys) / 16;
    return 1;
}

static PyObject *KeyFilter_add(KeyFilter *self, PyObject *keys) {
    const unsigned char *blob;
    Py_ssize_t n;
    int is_blob = blob_keys(keys, &blob, &n);
    if (is_blob < 0) return NULL;
    if (is_blob) {
        for (Py_ssize_t j = 0; j < n; j++) {
            if (j + 8 < n) filter_prefetch(self, blob + 16 * (j + 8));
            filter_set(self, blob + 16 * j);
        }
        self->added += n;
        Py_RETURN_NONE;
    }
    PyObject *seq = PySequence_Fast(keys, "KeyFilter.add takes a sequence of bytes");
    if (!seq) return NULL;
    n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t j = 0; j < n; j++) {
        const unsigned char *key = filter_key(items[j]);
        if (!key) {
            Py_DECREF(seq);
            return NULL;
        }
        filter_set(self, key);
    }
    self->added += n;
    Py_DECREF(seq);
    Py_RETURN_NONE;
}

static PyObject *KeyFilter_maybe(KeyFilter *self, PyObject *keys) {
    const unsigned char *blob;
    Py_ssize_t n;
    int is_blob = blob_keys(keys, &blob, &n);
    if (is_blob < 0) return NULL;
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    if (is_blob) {
        for (Py_ssize_t j = 0; j < n; j++) {
            if (j + 8 < n) filter_prefetch(self, blob + 16 * (j + 8));
            if (!filter_has(self, blob + 16 * j)) continue;
            PyObject *key = PyBytes_FromStringAndSize((const char *)blob + 16 * j, 16);
            if (!key || PyList_Append(out, key) < 0) {
                Py_XDECREF(key);
                Py_DECREF(out);
                return NULL;
            }
            Py_DECREF(key);
        }
        return out;
    }
    PyObject *seq = PySequence_Fast(keys, "KeyFilter.maybe takes a sequence of bytes");
    if (!seq) {
        Py_DECREF(out);
        return NULL;
    }
    n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t j = 0; j < n; j++) {
        const unsigned char *key = filter_key(items[j]);
        if (!key) goto fail;
        if (filter_has(self, key) && PyList_Append(out, items[j]) < 0) goto fail;
    }
    Py_DECREF(seq);
    return out;
fail:
    Py_DECREF(seq);
    Py_DECREF(out);
    return NULL;
}

static Py_ssize_t KeyFilter_len(KeyFilter *self) { return self->added; }

static PyMethodDef KeyFilter_methods[] = {
    {"add", (PyCFunction)KeyFilter_add, METH_O, "add(keys): remember the keys."},
    {"maybe", (PyCFunction)KeyFilter_maybe, METH_O,
     "maybe(keys) -> [key]: the keys that may have been added (no false negatives)."},
    {NULL, NULL, 0, NULL}};

static PySequenceMethods KeyFilter_as_sequence = {.sq_length = (lenfunc)KeyFilter_len};

static PyTypeObject KeyFilterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "client._native.KeyFilter",
    .tp_basicsize = sizeof(KeyFilter),
    .tp_dealloc = (destructor)KeyFilter_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Bloom filter over 16-byte keyed hashes (len: keys added).",
    .tp_methods = KeyFilter_methods,
    .tp_as_sequence = &KeyFilter_as_sequence,
    .tp_init = (initproc)KeyFilter_init,
    .tp_new = PyType_GenericNew,
};

/* ---- normalise: " ".join(text.split()).lower() for ASCII text -------------------
 * str.split()'s whitespace in ASCII is \t \n \v \f \r, \x1c-\x1f and the space. */

static PyObject *normalised_ascii(const unsigned char *s, Py_ssize_t n);

static PyObject *py_normalise(PyObject *Py_UNUSED(mod), PyObject *text) {
    if (!PyUnicode_Check(text)) {
        PyErr_SetString(PyExc_TypeError, "normalise takes a str");
        return NULL;
    }
    if (PyUnicode_READY(text) < 0) return NULL;
    if (!PyUnicode_IS_ASCII(text)) Py_RETURN_NONE; /* Unicode rules: Python's path */
    return normalised_ascii(PyUnicode_1BYTE_DATA(text), PyUnicode_GET_LENGTH(text));
}

static PyObject *py_token_hash(PyObject *Py_UNUSED(mod), PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    uint64_t h = token_hash(view.buf, view.len);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong(h);
}

/* token_hashes(items) -> (hashes, offsets): the token hashes of every item, flat, as
 * native uint64 bytes, and len(items) + 1 row offsets into them. An item is an ASCII
 * key text (shingled here) or a list of str tokens (shingled by the caller). */
static PyObject *py_token_hashes(PyObject *Py_UNUSED(mod), PyObject *items) {
    PyObject *seq = PySequence_Fast(items, "token_hashes() takes a list");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    HashVec hv = {0};
    unsigned char *buf = NULL;
    Py_ssize_t bufcap = 0;
    PyObject *offsets = PyBytes_FromStringAndSize(NULL, (n + 1) * sizeof(uint64_t));
    if (!offsets) goto fail;
    uint64_t *off = (uint64_t *)PyBytes_AS_STRING(offsets);
    off[0] = 0;
    for (Py_ssize_t j = 0; j < n; j++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, j);
        if (PyUnicode_Check(item)) {
            if (!PyUnicode_IS_ASCII(item)) {
                PyErr_SetString(PyExc_ValueError, "token_hashes(): a str item must be ASCII");
                goto fail;
            }
            if (ascii_shingles(PyUnicode_1BYTE_DATA(item), PyUnicode_GET_LENGTH(item), &hv,
                               &buf, &bufcap) < 0)
                goto nomem;
        } else {
            PyObject *toks = PySequence_Fast(item, "token_hashes(): an item is a str or a list");
            if (!toks) goto fail;
            for (Py_ssize_t t = 0; t < PySequence_Fast_GET_SIZE(toks); t++) {
                Py_ssize_t len;
                const char *s = PyUnicode_AsUTF8AndSize(PySequence_Fast_GET_ITEM(toks, t), &len);
                if (!s || push(&hv, token_hash((const unsigned char *)s, len)) < 0) {
                    Py_DECREF(toks);
                    if (!s) goto fail;
                    goto nomem;
                }
            }
            Py_DECREF(toks);
        }
        off[j + 1] = (uint64_t)hv.n;
    }
    PyObject *hashes = PyBytes_FromStringAndSize((const char *)hv.h, hv.n * sizeof(uint64_t));
    PyMem_Free(hv.h);
    PyMem_Free(buf);
    Py_DECREF(seq);
    if (!hashes) {
        Py_DECREF(offsets);
        return NULL;
    }
    return Py_BuildValue("(NN)", hashes, offsets);
nomem:
    PyErr_NoMemory();
fail:
    PyMem_Free(hv.h);
    PyMem_Free(buf);
    Py_DECREF(seq);
    Py_XDECREF(offsets);
    return NULL;
}

/* rows_to_bytes(rows, width) -> bytes: a list of `width` int lists (rensa's digests)
 * as one (len(rows), width) uint32 matrix. */
static PyObject *py_rows_to_bytes(PyObject *Py_UNUSED(mod), PyObject *args) {
    PyObject *rows;
    Py_ssize_t width;
    if (!PyArg_ParseTuple(args, "On", &rows, &width)) return NULL;
    PyObject *seq = PySequence_Fast(rows, "rows_to_bytes() takes a list");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * width * 4);
    if (!out) goto fail;
    uint32_t *dst = (uint32_t *)PyBytes_AS_STRING(out);
    for (Py_ssize_t j = 0; j < n; j++) {
        PyObject *row = PySequence_Fast(PySequence_Fast_GET_ITEM(seq, j), "a row is a list");
        if (!row) goto fail;
        if (PySequence_Fast_GET_SIZE(row) != width) {
            Py_DECREF(row);
            PyErr_SetString(PyExc_ValueError, "rows_to_bytes(): a row of the wrong width");
            goto fail;
        }
        for (Py_ssize_t i = 0; i < width; i++) {
            unsigned long v = PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(row, i));
            if (v == (unsigned long)-1 && PyErr_Occurred()) {
                Py_DECREF(row);
                goto fail;
            }
            dst[j * width + i] = (uint32_t)v;
        }
        Py_DECREF(row);
    }
    Py_DECREF(seq);
    return out;
fail:
    Py_DECREF(seq);
    Py_XDECREF(out);
    return NULL;
}

/* ---- sketches: rensa's R-MinHash digests, computed here ------------------------
 *
 * sketches(items, num_perm, seed) -> bytes: the (len(items), num_perm) uint32 matrix,
 * row-major, that token_hashes(items) fed to rensa's
 * RMinHash.digest_matrix_from_flat_token_hashes(hashes, offsets, num_perm, seed)
 * gives (through to_rows() and rows_to_bytes()), without the Python ints between.
 *
 * rensa 0.5.0's R-MinHash (ALGORITHM_VERSION 2, src/rminhash/bucket.rs; checked bit
 * for bit against the installed rensa in tests/unit/test_sketches.py):
 *
 *   (a_i, b_i), i < num_perm: Xoshiro256++ seeded with seed_from_u64(seed) (the state
 *     is four SplitMix64 outputs from seed), a_i = next() | 1, b_i = next().
 *   Every slot starts at u32::MAX (so does the whole row of an empty item); for each
 *   token hash h, with sm = the SplitMix64 finaliser:
 *   - three bucket rounds r = 0, 1, 2: x = sm(h ^ b_0 ^ BUCKET ^ r * ROUND) picks
 *     slot lemire(x, num_perm) (the low word times num_perm, high word; a rejected
 *     low word re-mixes x with sm) and offers rank (r << 30) | (x >> 34) to it;
 *   - fallback: f = sm(h ^ a_0 ^ FALLBACK_DOMAIN) offers every slot i the rank
 *     (3 << 30) | (((a_i * f + b_i) mod 2^64) >> 34).
 *   A slot keeps the least rank offered. Round ranks are below 3 << 30, so the
 *   fallback decides only the slots no round reached: computed for those alone. */

#define RM_BUCKET_DOMAIN 0x6a09e667f3bcc909ULL
#define RM_ROUND_DOMAIN 0x3c6ef372fe94f82bULL
#define RM_FALLBACK_DOMAIN 0xbb67ae8584caa73bULL
#define RM_FALLBACK (3u << 30)
#define RM_MAX_PERM (1 << 20)

static inline uint64_t splitmix64(uint64_t v) {
    v += 0x9e3779b97f4a7c15ULL;
    v = (v ^ (v >> 30)) * 0xbf58476d1ce4e5b9ULL;
    v = (v ^ (v >> 27)) * 0x94d049bb133111ebULL;
    return v ^ (v >> 31);
}

/* The permutations of (num_perm, seed), built per call: 2 * num_perm Xoshiro256++
 * steps, well under a microsecond for 128, next to a batch's sketches. */
typedef struct {
    Py_ssize_t num_perm;
    uint64_t *a, *b;
    uint64_t stage[3], fallback_seed;
    uint32_t threshold; /* 2^32 mod num_perm: low words below it are rejected */
    int shift;          /* 32 - log2(num_perm) for a power of two, else -1 */
} RPerms;

static int rperms_init(RPerms *p, Py_ssize_t num_perm, uint64_t seed) {
    uint64_t *a = PyMem_Malloc(num_perm * sizeof(uint64_t));
    uint64_t *b = PyMem_Malloc(num_perm * sizeof(uint64_t));
    p->a = a;
    p->b = b;
    if (!a || !b) return -1;
    uint64_t s[4], x = seed;
    for (int i = 0; i < 4; i++) {
        s[i] = splitmix64(x);
        x += 0x9e3779b97f4a7c15ULL;
    }
    for (Py_ssize_t i = 0; i < 2 * num_perm; i++) {
        uint64_t out = rotl64(s[0] + s[3], 23) + s[0], t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = rotl64(s[3], 45);
        if (i & 1)
            b[i / 2] = out;
        else
            a[i / 2] = out | 1;
    }
    p->num_perm = num_perm;
    for (uint64_t r = 0; r < 3; r++) p->stage[r] = b[0] ^ RM_BUCKET_DOMAIN ^ (r * RM_ROUND_DOMAIN);
    p->fallback_seed = a[0] ^ RM_FALLBACK_DOMAIN;
    uint32_t n = (uint32_t)num_perm;
    p->threshold = (uint32_t)(0u - n) % n;
    p->shift = (n & (n - 1)) == 0 ? 32 - __builtin_ctz(n) : -1;
    return 0;
}

static inline uint32_t rm_bucket(const RPerms *p, uint64_t x) {
    if (p->shift >= 0) return (uint32_t)((uint64_t)(uint32_t)x >> p->shift);
    for (;;) {
        uint64_t product = (uint64_t)(uint32_t)x * (uint64_t)p->num_perm;
        if ((uint32_t)product >= p->threshold) return (uint32_t)(product >> 32);
        x = splitmix64(x);
    }
}

/* raw[i] = min over j of the high word of a[i] * f[j] + b[i]: the hot loop, in plain C
 * that gcc vectorises; built also for AVX2 and for AVX-512 (whose vpmullq multiplies
 * 64-bit lanes in one instruction), and the best the CPU runs is chosen when the
 * module loads. FEDSTREAM_SKETCH_KERNEL=baseline|avx2 holds it at most at that one
 * (the tests check every kernel the CPU has); sketch_kernel names the one in use. */
typedef void (*FallbackFn)(const uint64_t *, const uint64_t *, Py_ssize_t, const uint64_t *,
                           Py_ssize_t, uint32_t *);

static inline __attribute__((always_inline)) void fallback_min_body(
    const uint64_t *restrict a, const uint64_t *restrict b, Py_ssize_t m,
    const uint64_t *restrict f, Py_ssize_t k, uint32_t *restrict raw) {
    for (Py_ssize_t i = 0; i < m; i++) raw[i] = UINT32_MAX;
    for (Py_ssize_t j = 0; j < k; j++) {
        uint64_t fj = f[j];
        for (Py_ssize_t i = 0; i < m; i++) {
            uint32_t v = (uint32_t)((a[i] * fj + b[i]) >> 32);
            raw[i] = v < raw[i] ? v : raw[i];
        }
    }
}

static void fallback_min(const uint64_t *a, const uint64_t *b, Py_ssize_t m, const uint64_t *f,
                         Py_ssize_t k, uint32_t *raw) {
    fallback_min_body(a, b, m, f, k, raw);
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2"))) static void fallback_min_avx2(const uint64_t *a,
                                                              const uint64_t *b, Py_ssize_t m,
                                                              const uint64_t *f, Py_ssize_t k,
                                                              uint32_t *raw) {
    fallback_min_body(a, b, m, f, k, raw);
}

__attribute__((target("avx512f,avx512dq,avx512vl"))) static void fallback_min_avx512(
    const uint64_t *a, const uint64_t *b, Py_ssize_t m, const uint64_t *f, Py_ssize_t k,
    uint32_t *raw) {
    fallback_min_body(a, b, m, f, k, raw);
}
#endif

static FallbackFn fallback_min_fn = fallback_min;
static const char *sketch_kernel = "baseline";

static void choose_sketch_kernel(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    const char *cap = getenv("FEDSTREAM_SKETCH_KERNEL");
    int limit = 2; /* 0: baseline, 1: avx2, 2: avx512 */
    if (cap && strcmp(cap, "baseline") == 0) limit = 0;
    if (cap && strcmp(cap, "avx2") == 0) limit = 1;
    __builtin_cpu_init();
    if (limit >= 2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl")) {
        fallback_min_fn = fallback_min_avx512;
        sketch_kernel = "avx512";
    } else if (limit >= 1 && __builtin_cpu_supports("avx2")) {
        fallback_min_fn = fallback_min_avx2;
        sketch_kernel = "avx2";
    }
#endif
}

typedef struct {
    uint64_t *a, *b, *f; /* a, b: (num_perm,) of the slots left; f: (tokens,) */
    uint32_t *raw, *idx;
    Py_ssize_t fcap;
} RScratch;

static int sketch_row(const RPerms *p, const uint64_t *h, Py_ssize_t k, uint32_t *out,
                      RScratch *s) {
    Py_ssize_t n = p->num_perm;
    for (Py_ssize_t i = 0; i < n; i++) out[i] = UINT32_MAX;
    if (k == 0) return 0;
    for (uint32_t r = 0; r < 3; r++) {
        uint64_t stage = p->stage[r];
        uint32_t prefix = r << 30;
        for (Py_ssize_t j = 0; j < k; j++) {
            uint64_t x = splitmix64(h[j] ^ stage);
            uint32_t slot = rm_bucket(p, x), rank = prefix | (uint32_t)(x >> 34);
            out[slot] = rank < out[slot] ? rank : out[slot];
        }
        if (k >= n) { /* every slot may be taken: then later rounds change nothing */
            uint32_t next = (r + 1) << 30, all = 1;
            for (Py_ssize_t i = 0; i < n; i++) all &= out[i] < next;
            if (all) return 0;
        }
    }
    Py_ssize_t m = 0; /* the slots left, gathered without branches (half are left) */
    for (Py_ssize_t i = 0; i < n; i++) {
        s->idx[m] = (uint32_t)i;
        s->a[m] = p->a[i];
        s->b[m] = p->b[i];
        m += out[i] == UINT32_MAX;
    }
    if (m == 0) return 0;
    if (k > s->fcap) {
        uint64_t *f = PyMem_Realloc(s->f, k * sizeof(uint64_t));
        if (!f) return -1;
        s->f = f;
        s->fcap = k;
    }
    for (Py_ssize_t j = 0; j < k; j++) s->f[j] = splitmix64(h[j] ^ p->fallback_seed);
    fallback_min_fn(s->a, s->b, m, s->f, k, s->raw);
    for (Py_ssize_t i = 0; i < m; i++) out[s->idx[i]] = RM_FALLBACK | (s->raw[i] >> 2);
    return 0;
}

/* The token hashes of one item of token_hashes() (an ASCII str, or a list of str
 * tokens) into hv, from its start; -1 with an exception set. */
static int item_token_hashes(PyObject *item, HashVec *hv, unsigned char **buf,
                             Py_ssize_t *bufcap) {
    hv->n = 0;
    if (PyUnicode_Check(item)) {
        if (!PyUnicode_IS_ASCII(item)) {
            PyErr_SetString(PyExc_ValueError, "sketches(): a str item must be ASCII");
            return -1;
        }
        if (ascii_shingles(PyUnicode_1BYTE_DATA(item), PyUnicode_GET_LENGTH(item), hv, buf,
                           bufcap) < 0) {
            PyErr_NoMemory();
            return -1;
        }
        return 0;
    }
    PyObject *toks = PySequence_Fast(item, "sketches(): an item is a str or a list");
    if (!toks) return -1;
    for (Py_ssize_t t = 0; t < PySequence_Fast_GET_SIZE(toks); t++) {
        Py_ssize_t len;
        const char *s = PyUnicode_AsUTF8AndSize(PySequence_Fast_GET_ITEM(toks, t), &len);
        if (!s || push(hv, token_hash((const unsigned char *)s, len)) < 0) {
            Py_DECREF(toks);
            if (s) PyErr_NoMemory();
            return -1;
        }
    }
    Py_DECREF(toks);
    return 0;
}

static PyObject *py_sketches(PyObject *Py_UNUSED(mod), PyObject *args) {
    PyObject *items, *seed_obj;
    Py_ssize_t num_perm;
    if (!PyArg_ParseTuple(args, "OnO", &items, &num_perm, &seed_obj)) return NULL;
    if (num_perm < 1 || num_perm > RM_MAX_PERM) {
        PyErr_Format(PyExc_ValueError, "sketches(): num_perm must be in 1..%d", RM_MAX_PERM);
        return NULL;
    }
    PyObject *seed_int = PyNumber_Index(seed_obj);
    if (!seed_int) return NULL;
    unsigned long long seed = PyLong_AsUnsignedLongLong(seed_int);
    Py_DECREF(seed_int);
    if (seed == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    PyObject *seq = PySequence_Tuple(items); /* held: an item's iterator may run code */
    if (!seq) return NULL;
    Py_ssize_t rows = PyTuple_GET_SIZE(seq);
    HashVec hv = {0};
    unsigned char *buf = NULL;
    Py_ssize_t bufcap = 0;
    RScratch s = {0};
    RPerms perms = {0};
    PyObject *out = NULL;
    if (rperms_init(&perms, num_perm, (uint64_t)seed) < 0) {
        PyErr_NoMemory();
        goto fail;
    }
    if (rows > PY_SSIZE_T_MAX / 4 / num_perm) {
        PyErr_NoMemory();
        goto fail;
    }
    out = PyBytes_FromStringAndSize(NULL, rows * num_perm * 4);
    if (!out) goto fail;
    s.a = PyMem_Malloc(num_perm * sizeof(uint64_t));
    s.b = PyMem_Malloc(num_perm * sizeof(uint64_t));
    s.raw = PyMem_Malloc(num_perm * sizeof(uint32_t));
    s.idx = PyMem_Malloc(num_perm * sizeof(uint32_t));
    if (!s.a || !s.b || !s.raw || !s.idx) {
        PyErr_NoMemory();
        goto fail;
    }
    uint32_t *dst = (uint32_t *)PyBytes_AS_STRING(out);
    for (Py_ssize_t j = 0; j < rows; j++) {
        if (item_token_hashes(PyTuple_GET_ITEM(seq, j), &hv, &buf, &bufcap) < 0)
            goto fail;
        if (sketch_row(&perms, hv.h, hv.n, dst + j * num_perm, &s) < 0) {
            PyErr_NoMemory();
            goto fail;
        }
    }
    goto done;
fail:
    Py_CLEAR(out);
done:
    PyMem_Free(hv.h);
    PyMem_Free(buf);
    PyMem_Free(s.a);
    PyMem_Free(s.b);
    PyMem_Free(s.f);
    PyMem_Free(s.raw);
    PyMem_Free(s.idx);
    PyMem_Free(perms.a);
    PyMem_Free(perms.b);
    Py_DECREF(seq);
    return out;
}

/* ---- the gate's fast path: the common record shape, parsed and checked ---------
 *
 * simple_records(raws, max_raw_bytes, max_text_bytes, max_tags, max_field_chars)
 * -> list of (content, ts) or None per input. An input gets a result only when it is
 * an ASCII JSON object of the usual shape ("text", optional "label", "id" strings,
 * "tags" list of strings, "ts" a non-negative number), with no escapes beyond
 * \" \\ \/ \n \r \t, no duplicate keys, and every check of client.gate passing; for
 * such an input client.gate's own path yields exactly this content (same key order)
 * and ts: control-character stripping and NFC change nothing in it. Anything else
 * (None) takes client.gate's own path, which also gives every rejection its reason.
 */

typedef struct {
    const unsigned char *p, *end;
} Cursor;

static inline void skip_ws(Cursor *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r'))
        c->p++;
}

/* A JSON string at c->p, decoded into buf (cap bytes); its length, or -1 when it is
 * outside the fast subset. */
static Py_ssize_t parse_string(Cursor *c, char *buf, Py_ssize_t cap) {
    if (c->p >= c->end || *c->p != '"') return -1;
    c->p++;
    Py_ssize_t n = 0;
    while (c->p < c->end) {
        unsigned char ch = *c->p++;
        if (ch == '"') return n;
        if (ch < 0x20 || ch >= 0x7f) return -1; /* invalid JSON, DEL, or non-ASCII */
        if (ch == '\\') {
            if (c->p >= c->end) return -1;
            switch (*c->p++) {
            case '"': ch = '"'; break;
            case '\\': ch = '\\'; break;
            case '/': ch = '/'; break;
            case 'n': ch = '\n'; break;
            case 'r': ch = '\r'; break;
            case 't': ch = '\t'; break;
            default: return -1;
            }
        }
        if (n >= cap) return -1;
        buf[n++] = (char)ch;
    }
    return -1;
}

static PyObject *ascii_str(const char *s, Py_ssize_t n) {
    PyObject *o = PyUnicode_New(n, 127);
    if (o) memcpy(PyUnicode_1BYTE_DATA(o), s, n);
    return o;
}

enum { F_TEXT = 1, F_LABEL = 2, F_ID = 4, F_TAGS = 8, F_TS = 16 };

/* A record of the fast shape, parsed: its strings decoded into one arena (spans are
 * offsets into it; a length < 0: the field is absent). */
typedef struct {
    Py_ssize_t text, text_n, label, label_n, id, id_n;
    Py_ssize_t ntags, *tag, *tag_n; /* tag: max_tags offsets, tag_n: their lengths */
    int has_tags;
    double ts;
} Simple;

/* The arena's size for these limits: text, label, id and every tag at their longest */
static Py_ssize_t simple_arena(Py_ssize_t max_text, Py_ssize_t max_tags, Py_ssize_t max_field) {
    return max_text + (2 + max_tags) * max_field + 1;
}

/* 1: parsed into *r (strings in arena); 0: not the fast shape (the caller's exact
 * path decides it). Touches no Python object. */
static int parse_simple(const unsigned char *raw, Py_ssize_t len, Py_ssize_t max_text,
                        Py_ssize_t max_tags, Py_ssize_t max_field, char *arena, Simple *r) {
    Cursor c = {raw, raw + len};
    Py_ssize_t used = 0;
    int seen = 0;
    r->ts = 0.0;
    r->text_n = r->label_n = r->id_n = -1;
    r->ntags = 0;
    r->has_tags = 0;
    skip_ws(&c);
    if (c.p >= c.end || *c.p++ != '{') return 0;
    skip_ws(&c);
    if (c.p < c.end && *c.p == '}') return 0; /* {} has no text: the slow path says so */
    for (;;) {
        char key[8];
        Py_ssize_t kn = parse_string(&c, key, sizeof key);
        int field = 0;
        if (kn == 4 && !memcmp(key, "text", 4)) field = F_TEXT;
        else if (kn == 5 && !memcmp(key, "label", 5)) field = F_LABEL;
        else if (kn == 2 && !memcmp(key, "id", 2)) field = F_ID;
        else if (kn == 4 && !memcmp(key, "tags", 4)) field = F_TAGS;
        else if (kn == 2 && !memcmp(key, "ts", 2)) field = F_TS;
        if (!field || (seen & field)) return 0;
        seen |= field;
        skip_ws(&c);
        if (c.p >= c.end || *c.p++ != ':') return 0;
        skip_ws(&c);
        if (field == F_TEXT || field == F_LABEL || field == F_ID) {
            Py_ssize_t cap = field == F_TEXT ? max_text : max_field;
            Py_ssize_t n = parse_string(&c, arena + used, cap);
            if (n <= 0) return 0; /* empty, too long, or outside the subset */
            if (field == F_TEXT) {
                const char *t = arena + used;
                Py_ssize_t i = 0;
                while (i < n && (t[i] == ' ' || t[i] == '\t' || t[i] == '\n' || t[i] == '\r'))
                    i++;
                if (i == n) return 0; /* whitespace only */
                r->text = used;
                r->text_n = n;
            } else if (field == F_LABEL) {
                r->label = used;
                r->label_n = n;
            } else {
                r->id = used;
                r->id_n = n;
            }
            used += n;
        } else if (field == F_TAGS) {
            if (c.p >= c.end || *c.p++ != '[') return 0;
            r->has_tags = 1;
            skip_ws(&c);
            if (c.p < c.end && *c.p == ']') {
                c.p++;
            } else {
                for (;;) {
                    Py_ssize_t n = parse_string(&c, arena + used, max_field);
                    if (n <= 0 || r->ntags >= max_tags) return 0;
                    r->tag[r->ntags] = used;
                    r->tag_n[r->ntags++] = n;
                    used += n;
                    skip_ws(&c);
                    if (c.p < c.end && *c.p == ',') {
                        c.p++;
                        skip_ws(&c);
                        continue;
                    }
                    if (c.p < c.end && *c.p == ']') {
                        c.p++;
                        break;
                    }
                    return 0;
                }
            }
        } else { /* ts: digits, an optional fraction and exponent; no sign */
            const unsigned char *st = c.p;
            char num[64];
            if (c.p >= c.end || *c.p < '0' || *c.p > '9') return 0;
            if (*c.p == '0' && c.p + 1 < c.end && c.p[1] >= '0' && c.p[1] <= '9') return 0;
            while (c.p < c.end && *c.p >= '0' && *c.p <= '9') c.p++;
            if (c.p < c.end && *c.p == '.') {
                c.p++;
                if (c.p >= c.end || *c.p < '0' || *c.p > '9') return 0;
                while (c.p < c.end && *c.p >= '0' && *c.p <= '9') c.p++;
            }
            if (c.p < c.end && (*c.p == 'e' || *c.p == 'E')) {
                c.p++;
                if (c.p < c.end && (*c.p == '+' || *c.p == '-')) c.p++;
                if (c.p >= c.end || *c.p < '0' || *c.p > '9') return 0;
                while (c.p < c.end && *c.p >= '0' && *c.p <= '9') c.p++;
            }
            if (c.p - st >= (Py_ssize_t)sizeof num) return 0;
            memcpy(num, st, c.p - st);
            num[c.p - st] = 0;
            /* glibc strtod rounds correctly, as orjson and json do */
            r->ts = strtod(num, NULL);
            if (!(r->ts >= 0.0 && r->ts < 1e11)) return 0;
        }
        skip_ws(&c);
        if (c.p < c.end && *c.p == ',') {
            c.p++;
            skip_ws(&c);
            continue;
        }
        if (c.p < c.end && *c.p == '}') {
            c.p++;
            break;
        }
        return 0;
    }
    skip_ws(&c);
    return c.p == c.end && r->text_n > 0;
}

/* A parsed record as client.gate's content dict, in its key order: text, label, id,
 * tags. NULL with an exception set. */
static PyObject *simple_content(const Simple *r, const char *arena) {
    PyObject *content = PyDict_New(), *o = NULL;
    if (!content) return NULL;
    if (!(o = ascii_str(arena + r->text, r->text_n)) ||
        PyDict_SetItemString(content, "text", o) < 0)
        goto fail;
    Py_CLEAR(o);
    if (r->label_n >= 0) {
        if (!(o = ascii_str(arena + r->label, r->label_n)) ||
            PyDict_SetItemString(content, "label", o) < 0)
            goto fail;
        Py_CLEAR(o);
    }
    if (r->id_n >= 0) {
        if (!(o = ascii_str(arena + r->id, r->id_n)) ||
            PyDict_SetItemString(content, "id", o) < 0)
            goto fail;
        Py_CLEAR(o);
    }
    if (r->has_tags) {
        if (!(o = PyList_New(r->ntags))) goto fail;
        for (Py_ssize_t i = 0; i < r->ntags; i++) {
            PyObject *t = ascii_str(arena + r->tag[i], r->tag_n[i]);
            if (!t) goto fail;
            PyList_SET_ITEM(o, i, t);
        }
        if (PyDict_SetItemString(content, "tags", o) < 0) goto fail;
        Py_CLEAR(o);
    }
    return content;
fail:
    Py_XDECREF(o);
    Py_DECREF(content);
    return NULL;
}

/* The scratch a batch's parses share: the arena and the tags' spans. */
typedef struct {
    char *arena;
    Py_ssize_t *tag;
    Simple r;
} SimpleScratch;

static int simple_scratch(SimpleScratch *s, Py_ssize_t max_text, Py_ssize_t max_tags,
                          Py_ssize_t max_field) {
    s->arena = PyMem_Malloc(simple_arena(max_text, max_tags, max_field));
    s->tag = PyMem_Malloc((2 * max_tags + 1) * sizeof *s->tag);
    s->r.tag = s->tag;
    s->r.tag_n = s->tag ? s->tag + max_tags : NULL;
    return s->arena && s->tag ? 0 : -1;
}

static void simple_scratch_free(SimpleScratch *s) {
    PyMem_Free(s->arena);
    PyMem_Free(s->tag);
}

/* 1: parsed into *content / *ts; 0: not the fast shape; -1: Python error */
static int simple_record(const unsigned char *raw, Py_ssize_t len, Py_ssize_t max_text,
                         Py_ssize_t max_tags, Py_ssize_t max_field, SimpleScratch *s,
                         PyObject **content, double *ts) {
    if (!parse_simple(raw, len, max_text, max_tags, max_field, s->arena, &s->r)) return 0;
    *ts = s->r.ts;
    *content = simple_content(&s->r, s->arena);
    return *content ? 1 : -1;
}

static PyObject *finished_record(PyObject *content, double ts, PyTypeObject *clean,
                                 PyObject *no_pii);

/* The records of a batch through simple_record: (content, ts) or None each; with a
 * record type `clean` (clean_records), a text the PII screen passes comes back as
 * clean(content, ts, key_text, no_pii) instead. */
static PyObject *parse_records(PyObject *raws, Py_ssize_t max_raw, Py_ssize_t max_text,
                               Py_ssize_t max_tags, Py_ssize_t max_field,
                               PyTypeObject *clean, PyObject *no_pii) {
    PyObject *seq = PySequence_Fast(raws, "the records must be a list");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    SimpleScratch scratch = {0};
    int have = simple_scratch(&scratch, max_text, max_tags, max_field) == 0;
    PyObject *out = PyList_New(n);
    if (!have || !out) goto fail;
    for (Py_ssize_t j = 0; j < n; j++) {
        PyObject *raw = PySequence_Fast_GET_ITEM(seq, j), *item = Py_None, *content = NULL;
        double ts;
        int got = 0;
        if (PyBytes_CheckExact(raw) && PyBytes_GET_SIZE(raw) <= max_raw) {
            got = simple_record((const unsigned char *)PyBytes_AS_STRING(raw),
                                PyBytes_GET_SIZE(raw), max_text, max_tags, max_field,
                                &scratch, &content, &ts);
            if (got < 0) goto fail;
        }
        if (!got) {
            Py_INCREF(Py_None);
        } else if (clean == NULL) {
            item = Py_BuildValue("(Nd)", content, ts);
            if (!item) goto fail;
        } else {
            item = finished_record(content, ts, clean, no_pii);
            if (!item) goto fail;
        }
        PyList_SET_ITEM(out, j, item);
    }
    simple_scratch_free(&scratch);
    Py_DECREF(seq);
    return out;
fail:
    if (!have) PyErr_NoMemory();
    simple_scratch_free(&scratch);
    Py_DECREF(seq);
    Py_XDECREF(out);
    return NULL;
}

static PyObject *py_simple_records(PyObject *Py_UNUSED(mod), PyObject *args) {
    PyObject *raws;
    Py_ssize_t max_raw, max_text, max_tags, max_field;
    if (!PyArg_ParseTuple(args, "Onnnn", &raws, &max_raw, &max_text, &max_tags, &max_field))
        return NULL;
    return parse_records(raws, max_raw, max_text, max_tags, max_field, NULL, NULL);
}

/* ---- keyed hashes: HMAC-SHA256 truncated to 16 bytes, as client.store.keyed_hash -- */

static const uint32_t K256[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
    0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
    0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
    0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
    0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
    0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
    0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2};

static inline uint32_t ror32(uint32_t x, int r) { return (x >> r) | (x << (32 - r)); }

static void sha256_block(uint32_t st[8], const unsigned char *blk) {
    uint32_t w[64];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)blk[4 * i] << 24 | (uint32_t)blk[4 * i + 1] << 16 |
               (uint32_t)blk[4 * i + 2] << 8 | blk[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ror32(w[i - 15], 7) ^ ror32(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ror32(w[i - 2], 17) ^ ror32(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = st[0], b = st[1], c = st[2], d = st[3], e = st[4], f = st[5], g = st[6],
             h = st[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = h + (ror32(e, 6) ^ ror32(e, 11) ^ ror32(e, 25)) + ((e & f) ^ (~e & g)) +
                      K256[i] + w[i];
        uint32_t t2 = (ror32(a, 2) ^ ror32(a, 13) ^ ror32(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        h = g;
        g = f;
        f = e;
        e = d + t1;
        d = c;
        c = b;
        b = a;
        a = t1 + t2;
    }
    st[0] += a;
    st[1] += b;
    st[2] += c;
    st[3] += d;
    st[4] += e;
    st[5] += f;
    st[6] += g;
    st[7] += h;
}

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>

/* The same block function with the CPU's SHA extensions: the rounds run two at a time
 * in sha256rnds2 on (ABEF, CDGH), the message schedule four words at a time in
 * sha256msg1/sha256msg2 (a scalar schedule made this 3x slower than OpenSSL's). */
__attribute__((target("sha,sse4.1,ssse3"))) static void sha256_block_ni(
    uint32_t st[8], const unsigned char *blk) {
    const __m128i swap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    __m128i w[4];
    for (int i = 0; i < 4; i++)
        w[i] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(blk + 16 * i)), swap);
    __m128i tmp = _mm_loadu_si128((const __m128i *)&st[0]);
    __m128i s1 = _mm_loadu_si128((const __m128i *)&st[4]);
    tmp = _mm_shuffle_epi32(tmp, 0xB1);       /* CDAB */
    s1 = _mm_shuffle_epi32(s1, 0x1B);         /* EFGH */
    __m128i s0 = _mm_alignr_epi8(tmp, s1, 8); /* ABEF */
    s1 = _mm_blend_epi16(s1, tmp, 0xF0);      /* CDGH */
    __m128i abef = s0, cdgh = s1;
    for (int g = 0; g < 16; g++) { /* words 4g..4g+3, in w[g % 4] */
        __m128i msg = _mm_add_epi32(w[g & 3], _mm_loadu_si128((const __m128i *)&K256[4 * g]));
        s1 = _mm_sha256rnds2_epu32(s1, s0, msg);
        msg = _mm_shuffle_epi32(msg, 0x0E);
        s0 = _mm_sha256rnds2_epu32(s0, s1, msg);
        if (g < 12) { /* words 4g+16..: from groups g..g+3 */
            __m128i next = _mm_sha256msg1_epu32(w[g & 3], w[(g + 1) & 3]);
            next = _mm_add_epi32(next, _mm_alignr_epi8(w[(g + 3) & 3], w[(g + 2) & 3], 4));
            w[g & 3] = _mm_sha256msg2_epu32(next, w[(g + 3) & 3]);
        }
    }
    s0 = _mm_add_epi32(s0, abef);
    s1 = _mm_add_epi32(s1, cdgh);
    tmp = _mm_shuffle_epi32(s0, 0x1B);   /* FEBA */
    s1 = _mm_shuffle_epi32(s1, 0xB1);    /* DCHG */
    s0 = _mm_blend_epi16(tmp, s1, 0xF0); /* DCBA */
    s1 = _mm_alignr_epi8(s1, tmp, 8);    /* ABEF */
    _mm_storeu_si128((__m128i *)&st[0], s0);
    _mm_storeu_si128((__m128i *)&st[4], s1);
}

static int cpu_has_sha(void) {
    unsigned int a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    return (b >> 29) & 1;
}
#endif

static void (*sha_block)(uint32_t st[8], const unsigned char *blk) = sha256_block;

typedef struct {
    uint32_t st[8];
    unsigned char blk[64];
    size_t fill;
    uint64_t total;
} Sha256;

static void sha_update(Sha256 *s, const unsigned char *p, size_t n) {
    s->total += n;
    while (n) {
        size_t take = 64 - s->fill < n ? 64 - s->fill : n;
        memcpy(s->blk + s->fill, p, take);
        s->fill += take;
        p += take;
        n -= take;
        if (s->fill == 64) {
            sha_block(s->st, s->blk);
            s->fill = 0;
        }
    }
}

static void sha_final(Sha256 *s, unsigned char out[32]) {
    uint64_t bits = s->total * 8;
    /* 0x80, zeros to 56 bytes mod 64, the bit length: written in place */
    s->blk[s->fill++] = 0x80;
    if (s->fill > 56) {
        memset(s->blk + s->fill, 0, 64 - s->fill);
        sha_block(s->st, s->blk);
        s->fill = 0;
    }
    memset(s->blk + s->fill, 0, 56 - s->fill);
    for (int i = 0; i < 8; i++) s->blk[56 + i] = (unsigned char)(bits >> (56 - 8 * i));
    sha_block(s->st, s->blk);
    s->fill = 0;
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (unsigned char)(s->st[i] >> 24);
        out[4 * i + 1] = (unsigned char)(s->st[i] >> 16);
        out[4 * i + 2] = (unsigned char)(s->st[i] >> 8);
        out[4 * i + 3] = (unsigned char)s->st[i];
    }
}

static const uint32_t SHA_IV[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};

/* keyed_hashes(key, prefix, items) -> [HMAC-SHA256(key, prefix + item.encode())[:16]]:
 * client.store.keyed_hash of each item, the key's pads hashed once for the batch. */
static PyObject *py_keyed_hashes(PyObject *Py_UNUSED(mod), PyObject *args) {
    Py_buffer key, prefix;
    PyObject *items;
    if (!PyArg_ParseTuple(args, "y*y*O", &key, &prefix, &items)) return NULL;
    PyObject *seq = NULL, *out = NULL;
    Sha256 inner0 = {{0}, {0}, 0, 0}, outer0 = {{0}, {0}, 0, 0};
    unsigned char k[64] = {0}, pad[64];
    if (key.len > 64) {
        PyErr_SetString(PyExc_ValueError, "keyed_hashes(): keys longer than 64 bytes");
        goto done;
    }
    memcpy(k, key.buf, key.len);
    memcpy(inner0.st, SHA_IV, sizeof SHA_IV);
    memcpy(outer0.st, SHA_IV, sizeof SHA_IV);
    for (int i = 0; i < 64; i++) pad[i] = k[i] ^ 0x36;
    sha_update(&inner0, pad, 64);
    for (int i = 0; i < 64; i++) pad[i] = k[i] ^ 0x5c;
    sha_update(&outer0, pad, 64);
    seq = PySequence_Fast(items, "keyed_hashes() takes a list");
    if (!seq) goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    out = PyList_New(n);
    if (!out) goto done;
    for (Py_ssize_t j = 0; j < n; j++) {
        Py_ssize_t len;
        const char *data = PyUnicode_AsUTF8AndSize(PySequence_Fast_GET_ITEM(seq, j), &len);
        if (!data) {
            Py_CLEAR(out);
            goto done;
        }
        Sha256 s = inner0;
        unsigned char digest[32];
        sha_update(&s, prefix.buf, prefix.len);
        sha_update(&s, (const unsigned char *)data, len);
        sha_final(&s, digest);
        s = outer0;
        sha_update(&s, digest, 32);
        sha_final(&s, digest);
        PyObject *b = PyBytes_FromStringAndSize((const char *)digest, 16);
        if (!b) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, j, b);
    }
done:
    Py_XDECREF(seq);
    PyBuffer_Release(&key);
    PyBuffer_Release(&prefix);
    return out;
}

/* record_keys(key, cleans) -> (rids, chashes, groups, tss): for client.front, the
 * keyed hashes of a batch of client.gate.Clean records (content, ts, key_text, pii)
 * as blobs of 16-byte keys, and their ts as a blob of doubles: chash = h("c:" +
 * key_text); rid = h("i:" + id) when the content has an id, else chash; group =
 * h("g:" + (label or first tag or "")); h = keyed_hashes' HMAC, the same bytes. */
typedef struct {
    Sha256 inner, outer;
} Hmac0;

static void hmac16(const Hmac0 *h, const char *prefix, const char *data, Py_ssize_t len,
                   unsigned char out[16]) {
    Sha256 s = h->inner;
    unsigned char digest[32];
    sha_update(&s, (const unsigned char *)prefix, 2);
    sha_update(&s, (const unsigned char *)data, len);
    sha_final(&s, digest);
    s = h->outer;
    sha_update(&s, digest, 32);
    sha_final(&s, digest);
    memcpy(out, digest, 16);
}

/* HMAC-SHA256's inner and outer states after the padded key (len <= 64) */
static void hmac_setup(Hmac0 *h, const void *key, Py_ssize_t len) {
    unsigned char k[64] = {0}, pad[64];
    memcpy(k, key, len);
    memset(h, 0, sizeof *h);
    memcpy(h->inner.st, SHA_IV, sizeof SHA_IV);
    memcpy(h->outer.st, SHA_IV, sizeof SHA_IV);
    for (int i = 0; i < 64; i++) pad[i] = k[i] ^ 0x36;
    sha_update(&h->inner, pad, 64);
    for (int i = 0; i < 64; i++) pad[i] = k[i] ^ 0x5c;
    sha_update(&h->outer, pad, 64);
}

static PyObject *py_record_keys(PyObject *Py_UNUSED(mod), PyObject *args) {
    Py_buffer key;
    PyObject *cleans;
    if (!PyArg_ParseTuple(args, "y*O", &key, &cleans)) return NULL;
    PyObject *seq = NULL, *result = NULL, *rids = NULL, *chashes = NULL, *groups = NULL,
             *tss = NULL, *cache = NULL;
    Hmac0 h;
    if (key.len > 64) {
        PyErr_SetString(PyExc_ValueError, "record_keys(): keys longer than 64 bytes");
        goto done;
    }
    hmac_setup(&h, key.buf, key.len);
    seq = PySequence_Fast(cleans, "record_keys() takes a list of records");
    if (!seq) goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    rids = PyBytes_FromStringAndSize(NULL, 16 * n);
    chashes = PyBytes_FromStringAndSize(NULL, 16 * n);
    groups = PyBytes_FromStringAndSize(NULL, 16 * n);
    tss = PyBytes_FromStringAndSize(NULL, 8 * n);
    cache = PyDict_New(); /* group name -> its 16 bytes */
    if (!rids || !chashes || !groups || !tss || !cache) goto done;
    unsigned char *r = (unsigned char *)PyBytes_AS_STRING(rids);
    unsigned char *c = (unsigned char *)PyBytes_AS_STRING(chashes);
    unsigned char *g = (unsigned char *)PyBytes_AS_STRING(groups);
    double *t = (double *)PyBytes_AS_STRING(tss);
    for (Py_ssize_t j = 0; j < n; j++) {
        PyObject *rec = PySequence_Fast_GET_ITEM(seq, j);
        if (!PyTuple_Check(rec) || PyTuple_GET_SIZE(rec) < 3 ||
            !PyDict_Check(PyTuple_GET_ITEM(rec, 0))) {
            PyErr_SetString(PyExc_TypeError, "record_keys(): records are (content, ts, key_text, ...)");
            goto done;
        }
        PyObject *content = PyTuple_GET_ITEM(rec, 0);
        t[j] = PyFloat_AsDouble(PyTuple_GET_ITEM(rec, 1));
        if (t[j] == -1.0 && PyErr_Occurred()) goto done;
        Py_ssize_t len;
        const char *text = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(rec, 2), &len);
        if (!text) goto done;
        hmac16(&h, "c:", text, len, c + 16 * j);
        PyObject *id = PyDict_GetItemString(content, "id"); /* borrowed */
        if (id) {
            const char *s = PyUnicode_AsUTF8AndSize(id, &len);
            if (!s) goto done;
            hmac16(&h, "i:", s, len, r + 16 * j);
        } else {
            memcpy(r + 16 * j, c + 16 * j, 16);
        }
        /* label or first tag or "", as `c.get("label") or next(iter(tags), "")` */
        PyObject *name = PyDict_GetItemString(content, "label");
        if (!name || !PyObject_IsTrue(name)) {
            PyObject *tags = PyDict_GetItemString(content, "tags");
            name = NULL;
            if (tags && PyList_Check(tags) && PyList_GET_SIZE(tags) > 0)
                name = PyList_GET_ITEM(tags, 0);
            else if (tags && !PyList_Check(tags)) {
                PyErr_SetString(PyExc_TypeError, "record_keys(): tags must be a list");
                goto done;
            }
        }
        PyObject *empty = NULL;
        if (!name) {
            empty = PyUnicode_New(0, 0);
            if (!empty) goto done;
            name = empty;
        }
        PyObject *hit = PyDict_GetItemWithError(cache, name);
        if (hit) {
            memcpy(g + 16 * j, PyBytes_AS_STRING(hit), 16);
        } else if (PyErr_Occurred()) {
            Py_XDECREF(empty);
            goto done;
        } else {
            const char *s = PyUnicode_AsUTF8AndSize(name, &len);
            PyObject *b = NULL;
            if (s) {
                hmac16(&h, "g:", s, len, g + 16 * j);
                b = PyBytes_FromStringAndSize((const char *)g + 16 * j, 16);
            }
            if (!b || PyDict_SetItem(cache, name, b) < 0) {
                Py_XDECREF(b);
                Py_XDECREF(empty);
                goto done;
            }
            Py_DECREF(b);
        }
        Py_XDECREF(empty);
    }
    result = PyTuple_Pack(4, rids, chashes, groups, tss);
done:
    Py_XDECREF(seq);
    Py_XDECREF(rids);
    Py_XDECREF(chashes);
    Py_XDECREF(groups);
    Py_XDECREF(tss);
    Py_XDECREF(cache);
    PyBuffer_Release(&key);
    return result;
}

static PyObject *py_sha_extensions(PyObject *Py_UNUSED(mod), PyObject *Py_UNUSED(arg)) {
    return PyBool_FromLong(sha_block != sha256_block);
}

static PyObject *py_use_sha_extensions(PyObject *Py_UNUSED(mod), PyObject *arg) {
    int on = PyObject_IsTrue(arg);
    if (on < 0) return NULL;
    sha_block = sha256_block;
#if defined(__x86_64__)
    if (on && cpu_has_sha()) sha_block = sha256_block_ni;
#endif
    return PyBool_FromLong(sha_block != sha256_block);
}

/* ---- the PII screen: which texts may hold a replacement (client.pii._SCREEN) ---
 *
 * pii_screen(texts) -> list of the indices of the texts that need client.pii's exact
 * path: non-ASCII texts, texts holding NUL, and texts where any screen pattern of
 * client.pii occurs (the same patterns, matched here by hand; each is a plain
 * sequence of character classes, so "occurs anywhere" needs no backtracking).
 */

static inline int is_digit(unsigned char c) { return c >= '0' && c <= '9'; }
static inline int is_upper(unsigned char c) { return c >= 'A' && c <= 'Z'; }
static inline int is_hex(unsigned char c) {
    return is_digit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}
static inline int is_sep(unsigned char c) {
    return c == ' ' || c == '.' || c == '(' || c == ')' || c == '-';
}
static inline unsigned char lower(unsigned char c) { return is_upper(c) ? c + 32 : c; }

static int starts_with(const unsigned char *s, Py_ssize_t n, Py_ssize_t i, const char *lit) {
    Py_ssize_t k = (Py_ssize_t)strlen(lit);
    return i + k <= n && memcmp(s + i, lit, k) == 0;
}

static int starts_with_caseless(const unsigned char *s, Py_ssize_t n, Py_ssize_t i,
                                const char *lit) {
    Py_ssize_t k = (Py_ssize_t)strlen(lit);
    if (i + k > n) return 0;
    for (Py_ssize_t j = 0; j < k; j++)
        if (lower(s[i + j]) != (unsigned char)lit[j]) return 0;
    return 1;
}

/* [0-9](?:\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]|(?:[ .()\-]{0,3}[0-9]){8}) at i */
static int digits_at(const unsigned char *s, Py_ssize_t n, Py_ssize_t i) {
    if (!is_digit(s[i])) return 0;
    Py_ssize_t j = i + 1;
    int ok = 1;
    for (int g = 0; g < 2 && ok; g++) { /* \.[0-9]{1,3} twice, then \.[0-9] */
        if (j >= n || s[j] != '.') {
            ok = 0;
            break;
        }
        j++;
        Py_ssize_t d = 0;
        while (j < n && is_digit(s[j])) j++, d++;
        if (d < 1 || d > 3) ok = 0;
    }
    if (ok && j + 1 < n && s[j] == '.' && is_digit(s[j + 1])) return 1;
    j = i + 1;
    for (int k = 0; k < 8; k++) {
        int seps = 0;
        while (j < n && is_sep(s[j]) && seps < 4) j++, seps++;
        if (seps > 3 || j >= n || !is_digit(s[j])) return 0;
        j++;
    }
    return 1;
}

/* (?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f] at i */
static int ipv6_at(const unsigned char *s, Py_ssize_t n, Py_ssize_t i) {
    Py_ssize_t j = i;
    for (int g = 0; g < 7; g++) {
        Py_ssize_t h = 0;
        while (j < n && is_hex(s[j]) && h < 5) j++, h++;
        if (h < 1 || h > 4 || j >= n || s[j] != ':') return 0;
        j++;
    }
    return j < n && is_hex(s[j]);
}

static int screen_text(const unsigned char *s, Py_ssize_t n) {
    Py_ssize_t colons = 0;
    for (Py_ssize_t i = 0; i < n; i++) colons += s[i] == ':';
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = s[i];
        if (c == 0 || c == '@') return 1;
        if (is_digit(c) && digits_at(s, n, i)) return 1;
        if (colons >= 7 && is_hex(c) && ipv6_at(s, n, i)) return 1;
        if (is_upper(c) && i + 3 < n && is_upper(s[i + 1]) && is_digit(s[i + 2]) &&
            is_digit(s[i + 3]))
            return 1;
        switch (lower(c)) {
        case '-':
            if (starts_with(s, n, i, "-----BEGIN ")) return 1;
            break;
        case 'a':
            if (starts_with(s, n, i, "AKIA") || starts_with_caseless(s, n, i, "api"))
                return 1;
            break;
        case 'g':
            if (starts_with(s, n, i, "gh") && i + 3 < n && strchr("pousr", s[i + 2]) &&
                s[i + 2] && s[i + 3] == '_')
                return 1;
            break;
        case 'x':
            if (starts_with(s, n, i, "xox") && i + 4 < n && strchr("abprs", s[i + 3]) &&
                s[i + 3] && s[i + 4] == '-')
                return 1;
            break;
        case 's':
            if (starts_with(s, n, i, "sk-") || starts_with_caseless(s, n, i, "secret"))
                return 1;
            break;
        case 'e':
            if (starts_with(s, n, i, "eyJ")) return 1;
            break;
        case 'p':
            if (starts_with_caseless(s, n, i, "pass") || starts_with_caseless(s, n, i, "pwd"))
                return 1;
            break;
        case 't':
            if (starts_with_caseless(s, n, i, "token")) return 1;
            break;
        }
    }
    return 0;
}

static PyObject *py_pii_screen(PyObject *Py_UNUSED(mod), PyObject *texts) {
    PyObject *seq = PySequence_Fast(texts, "pii_screen() takes a list of str");
    if (!seq) return NULL;
    PyObject *out = PyList_New(0);
    for (Py_ssize_t j = 0; out && j < PySequence_Fast_GET_SIZE(seq); j++) {
        PyObject *t = PySequence_Fast_GET_ITEM(seq, j);
        if (!PyUnicode_Check(t)) {
            PyErr_SetString(PyExc_TypeError, "pii_screen() takes a list of str");
            Py_CLEAR(out);
            break;
        }
        if (PyUnicode_IS_ASCII(t) &&
            !screen_text(PyUnicode_1BYTE_DATA(t), PyUnicode_GET_LENGTH(t)))
            continue;
        PyObject *i = PyLong_FromSsize_t(j);
        if (!i || PyList_Append(out, i) < 0) Py_CLEAR(out);
        Py_XDECREF(i);
    }
    Py_DECREF(seq);
    return out;
}

/* ---- clean_records: the gate's fast path, PII screen and key text in one pass ----
 *
 * clean_records(raws, max_raw_bytes, max_text_bytes, max_tags, max_field_chars,
 *               clean, no_pii)
 * -> list of clean(content, ts, key_text, no_pii) | (content, ts) | None per input:
 * simple_records' result; for a text that pii_screen would pass (nothing to
 * replace) the finished record, a tuple of type `clean` (client.gate.Clean, a
 * NamedTuple) with its key text normalise(text); a plain (content, ts) when
 * pii_screen flags the text (client.gate scrubs it, then normalises). */

/* normalise() of ASCII text s into d (n bytes at most): its length */
static Py_ssize_t normalise_into(const unsigned char *s, Py_ssize_t n, unsigned char *d) {
    Py_ssize_t len = 0;
    int gap = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = s[i];
        if (c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f)) {
            gap = len > 0;
            continue;
        }
        if (gap) {
            d[len++] = ' ';
            gap = 0;
        }
        d[len++] = (c >= 'A' && c <= 'Z') ? (unsigned char)(c + 32) : c;
    }
    return len;
}

static PyObject *normalised_ascii(const unsigned char *s, Py_ssize_t n) {
    PyObject *out = PyUnicode_New(n, 127);
    if (!out) return NULL;
    Py_ssize_t len = normalise_into(s, n, PyUnicode_1BYTE_DATA(out));
    if (len == n) return out;
    PyObject *cut = PyUnicode_Substring(out, 0, len);
    Py_DECREF(out);
    return cut;
}

/* steals content: (content, ts) when the PII screen flags its text, else
 * clean(content, ts, key_text, no_pii), a tuple of that type */
static PyObject *finished_record(PyObject *content, double ts, PyTypeObject *clean,
                                 PyObject *no_pii) {
    PyObject *text = PyDict_GetItemString(content, "text"); /* borrowed */
    const unsigned char *s = PyUnicode_1BYTE_DATA(text);
    Py_ssize_t len = PyUnicode_GET_LENGTH(text);
    if (screen_text(s, len)) return Py_BuildValue("(Nd)", content, ts);
    PyObject *key = normalised_ascii(s, len), *t = PyFloat_FromDouble(ts);
    PyObject *item = key && t ? clean->tp_alloc(clean, 4) : NULL;
    if (!item) {
        Py_XDECREF(key);
        Py_XDECREF(t);
        Py_DECREF(content);
        return NULL;
    }
    Py_INCREF(no_pii);
    PyTuple_SET_ITEM(item, 0, content);
    PyTuple_SET_ITEM(item, 1, t);
    PyTuple_SET_ITEM(item, 2, key);
    PyTuple_SET_ITEM(item, 3, no_pii);
    return item;
}

static PyObject *py_clean_records(PyObject *Py_UNUSED(mod), PyObject *args) {
    PyObject *raws, *no_pii;
    PyTypeObject *clean;
    Py_ssize_t max_raw, max_text, max_tags, max_field;
    if (!PyArg_ParseTuple(args, "OnnnnO!O", &raws, &max_raw, &max_text, &max_tags,
                          &max_field, &PyType_Type, &clean, &no_pii))
        return NULL;
    if (!PyType_IsSubtype(clean, &PyTuple_Type) || clean->tp_itemsize != sizeof(PyObject *)) {
        PyErr_SetString(PyExc_TypeError, "clean_records(): the record type must be a tuple type");
        return NULL;
    }
    return parse_records(raws, max_raw, max_text, max_tags, max_field, clean, no_pii);
}

/* ---- sort_keys: the store's sorted runs of dedup keys ------------------------------
 *
 * sort_keys(parts, width) -> bytes: the distinct width-byte keys held in parts (each
 * a bytes object of whole keys: one key, or a run's blob), sorted bytewise, as one
 * blob. client.store's runs and their merges. */

/* Sorts n keys of `width` bytes in buf and drops repeats; returns how many are kept.
 * A bottom-up merge of buf's ascending runs (a merge of the store's sorted runs is
 * O(n log runs), not a sort from scratch); touches no Python object, so callers
 * run it without the GIL (the commit thread merges runs while the ingesting
 * thread goes on). -1: out of memory. */
static Py_ssize_t sort_distinct(char *buf, size_t n, size_t width) {
    if (n > 1) {
        size_t runs = 1;
        for (size_t i = 1; i < n; i++)
            if (memcmp(buf + (i - 1) * width, buf + i * width, width) > 0) runs++;
        size_t *at = PyMem_RawMalloc((runs + 1) * sizeof *at);
        char *tmp = runs > 1 ? PyMem_RawMalloc(n * width) : NULL;
        if (!at || (runs > 1 && !tmp)) {
            PyMem_RawFree(at);
            PyMem_RawFree(tmp);
            return -1;
        }
        size_t r = 0;
        at[r++] = 0;
        for (size_t i = 1; i < n; i++)
            if (memcmp(buf + (i - 1) * width, buf + i * width, width) > 0) at[r++] = i;
        at[r] = n;
        char *src = buf, *dst = tmp;
        while (runs > 1) { /* merge runs pairwise: [at[2k], at[2k+1]) with the next */
            size_t out = 0;
            for (size_t k = 0; k < runs; k += 2) {
                size_t i = at[k], mid = at[k + 1 < runs ? k + 1 : runs];
                size_t j = mid, end = at[k + 2 < runs ? k + 2 : runs], o = i;
                while (i < mid && j < end) {
                    if (memcmp(src + i * width, src + j * width, width) <= 0)
                        memcpy(dst + o++ * width, src + i++ * width, width);
                    else
                        memcpy(dst + o++ * width, src + j++ * width, width);
                }
                memcpy(dst + o * width, src + i * width, (mid - i) * width);
                o += mid - i;
                memcpy(dst + o * width, src + j * width, (end - j) * width);
                at[out++] = at[k];
            }
            at[out] = n;
            runs = out;
            char *t = src;
            src = dst;
            dst = t;
        }
        if (src != buf) memcpy(buf, src, n * width);
        PyMem_RawFree(at);
        PyMem_RawFree(tmp);
    }
    size_t kept = 0;
    for (size_t i = 0; i < n; i++) {
        if (kept && !memcmp(buf + (kept - 1) * width, buf + i * width, width)) continue;
        if (kept != i) memmove(buf + kept * width, buf + i * width, width);
        kept++;
    }
    return (Py_ssize_t)kept;
}

static PyObject *py_sort_keys(PyObject *Py_UNUSED(mod), PyObject *args) {
    PyObject *parts;
    Py_ssize_t width;
    if (!PyArg_ParseTuple(args, "On", &parts, &width)) return NULL;
    if (width <= 0 || width > 64) {
        PyErr_SetString(PyExc_ValueError, "sort_keys(): width in 1..64");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(parts, "sort_keys() takes a list of bytes");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *p = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyBytes_Check(p) || PyBytes_GET_SIZE(p) % width) {
            PyErr_SetString(PyExc_ValueError, "sort_keys(): parts are bytes of whole keys");
            Py_DECREF(seq);
            return NULL;
        }
        total += PyBytes_GET_SIZE(p);
    }
    char *buf = PyMem_Malloc(total ? total : 1);
    if (!buf) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    Py_ssize_t at = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *p = PySequence_Fast_GET_ITEM(seq, i);
        memcpy(buf + at, PyBytes_AS_STRING(p), PyBytes_GET_SIZE(p));
        at += PyBytes_GET_SIZE(p);
    }
    Py_DECREF(seq);
    Py_ssize_t kept;
    Py_BEGIN_ALLOW_THREADS
    kept = sort_distinct(buf, (size_t)(total / width), (size_t)width);
    Py_END_ALLOW_THREADS
    PyObject *out =
        kept < 0 ? PyErr_NoMemory() : PyBytes_FromStringAndSize(buf, kept * width);
    PyMem_Free(buf);
    return out;
}

/* ---- columns of a batch: picking the kept records out of blobs ------------------ */

/* gather(blob, width, indices) -> bytes: blob's width-byte items at indices, in order */
static PyObject *py_gather(PyObject *Py_UNUSED(mod), PyObject *args) {
    Py_buffer b;
    Py_ssize_t width;
    PyObject *indices;
    if (!PyArg_ParseTuple(args, "y*nO", &b, &width, &indices)) return NULL;
    PyObject *seq = width > 0 ? PySequence_Fast(indices, "gather() takes a list of int")
                              : NULL;
    if (!seq) {
        if (width <= 0) PyErr_SetString(PyExc_ValueError, "gather(): width must be positive");
        PyBuffer_Release(&b);
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), items = b.len / width;
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * width);
    for (Py_ssize_t k = 0; out && k < n; k++) {
        Py_ssize_t i = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(seq, k));
        if (i == -1 && PyErr_Occurred()) {
            Py_CLEAR(out);
        } else if (i < 0 || i >= items) {
            PyErr_SetString(PyExc_IndexError, "gather(): index out of range");
            Py_CLEAR(out);
        } else {
            memcpy(PyBytes_AS_STRING(out) + k * width, (const char *)b.buf + i * width, width);
        }
    }
    Py_DECREF(seq);
    PyBuffer_Release(&b);
    return out;
}

/* gather_var(blob, starts, indices) -> (bytes, [length]): item i of blob is
 * blob[starts[i]:starts[i + 1]] (starts: a buffer of uint64, n + 1 of them) */
static PyObject *py_gather_var(PyObject *Py_UNUSED(mod), PyObject *args) {
    Py_buffer b, st;
    PyObject *indices;
    if (!PyArg_ParseTuple(args, "y*y*O", &b, &st, &indices)) return NULL;
    PyObject *seq = NULL, *out = NULL, *lens = NULL, *result = NULL;
    const uint64_t *starts = st.buf;
    Py_ssize_t items = st.len / 8 - 1, total = 0;
    if (st.len % 8 || items < 0 || starts[items] > (uint64_t)b.len) {
        PyErr_SetString(PyExc_ValueError, "gather_var(): starts do not fit the blob");
        goto done;
    }
    for (Py_ssize_t i = 0; i < items; i++)
        if (starts[i] > starts[i + 1]) {
            PyErr_SetString(PyExc_ValueError, "gather_var(): starts must not decrease");
            goto done;
        }
    seq = PySequence_Fast(indices, "gather_var() takes a list of int");
    if (!seq) goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t k = 0; k < n; k++) {
        Py_ssize_t i = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(seq, k));
        if (i == -1 && PyErr_Occurred()) goto done;
        if (i < 0 || i >= items) {
            PyErr_SetString(PyExc_IndexError, "gather_var(): index out of range");
            goto done;
        }
        total += (Py_ssize_t)(starts[i + 1] - starts[i]);
    }
    out = PyBytes_FromStringAndSize(NULL, total);
    lens = PyList_New(n);
    if (!out || !lens) goto done;
    char *at = PyBytes_AS_STRING(out);
    for (Py_ssize_t k = 0; k < n; k++) {
        Py_ssize_t i = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(seq, k));
        Py_ssize_t len = (Py_ssize_t)(starts[i + 1] - starts[i]);
        memcpy(at, (const char *)b.buf + starts[i], len);
        at += len;
        PyObject *l = PyLong_FromSsize_t(len);
        if (!l) goto done;
        PyList_SET_ITEM(lens, k, l);
    }
    result = PyTuple_Pack(2, out, lens);
done:
    Py_XDECREF(seq);
    Py_XDECREF(out);
    Py_XDECREF(lens);
    PyBuffer_Release(&b);
    PyBuffer_Release(&st);
    return result;
}

/* dedup_keys(rids, chashes) -> bytes: b"r" + rid and b"c" + chash of each record
 * (16-byte keys, one blob each), distinct and sorted: a store run (client.store) */
static PyObject *py_dedup_keys(PyObject *Py_UNUSED(mod), PyObject *args) {
    Py_buffer r, c;
    if (!PyArg_ParseTuple(args, "y*y*", &r, &c)) return NULL;
    PyObject *out = NULL;
    if (r.len % 16 || c.len % 16) {
        PyErr_SetString(PyExc_ValueError, "dedup_keys(): blobs of whole 16-byte keys");
        goto done;
    }
    Py_ssize_t n = r.len / 16 + c.len / 16;
    char *buf = PyMem_Malloc(n ? 17 * n : 1);
    if (!buf) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < r.len / 16; i++) {
        buf[17 * i] = 'r';
        memcpy(buf + 17 * i + 1, (const char *)r.buf + 16 * i, 16);
    }
    for (Py_ssize_t i = 0, o = r.len / 16; i < c.len / 16; i++) {
        buf[17 * (o + i)] = 'c';
        memcpy(buf + 17 * (o + i) + 1, (const char *)c.buf + 16 * i, 16);
    }
    Py_ssize_t kept = sort_distinct(buf, (size_t)n, 17);
    out = kept < 0 ? PyErr_NoMemory() : PyBytes_FromStringAndSize(buf, kept * 17);
    PyMem_Free(buf);
done:
    PyBuffer_Release(&r);
    PyBuffer_Release(&c);
    return out;
}

/* ---- front_batch: the stateless half of a batch's usual records in one pass ------
 *
 * front_batch(raws, max_raw, max_text, max_tags, max_field, mac_key, store_key,
 *             nonces, num_perm, seed)
 * -> (positions, rids, chashes, groups, tss, sketches, payloads, starts) | None
 *
 * For each input of the fast shape (simple_records) whose text the PII screen
 * passes (clean_records' finished records), everything client.front.Front.run
 * computes, without a Python object a record: key text (normalise), keyed hashes
 * (record_keys), the content as JSON sealed with AES-GCM under the input's nonce
 * (nonces: 12 bytes an input; client._seal's bytes) and the MinHash sketch of the
 * key text (sketches). positions: the inputs done, uint32 each, in order; the rest
 * (other shapes, PII to scrub, rejections) are the caller's. tss: doubles; starts:
 * len(positions) + 1 uint64 offsets of the payloads. None where libcrypto cannot be
 * loaded. */

/* a JSON string of ASCII s (client/json_out.h) */
static unsigned char *json_ascii(unsigned char *o, const char *s, Py_ssize_t n) {
    return json_string(o, (const unsigned char *)s, (size_t)n);
}

/* {"text":..,"label":..,"id":..,"tags":[..]}: client.gate's content in its key order */
static int simple_json(const Simple *r, const char *arena, Bytes *out) {
    size_t need = 64 + 6 * (size_t)r->text_n;
    if (r->label_n >= 0) need += 16 + 6 * (size_t)r->label_n;
    if (r->id_n >= 0) need += 16 + 6 * (size_t)r->id_n;
    for (Py_ssize_t i = 0; i < r->ntags; i++) need += 8 + 6 * (size_t)r->tag_n[i];
    out->n = 0;
    if (bytes_room(out, need) < 0) return -1;
    unsigned char *o = out->p;
    memcpy(o, "{\"text\":", 8);
    o = json_ascii(o + 8, arena + r->text, r->text_n);
    if (r->label_n >= 0) {
        memcpy(o, ",\"label\":", 9);
        o = json_ascii(o + 9, arena + r->label, r->label_n);
    }
    if (r->id_n >= 0) {
        memcpy(o, ",\"id\":", 6);
        o = json_ascii(o + 6, arena + r->id, r->id_n);
    }
    if (r->has_tags) {
        memcpy(o, ",\"tags\":[", 9);
        o += 9;
        for (Py_ssize_t i = 0; i < r->ntags; i++) {
            if (i) *o++ = ',';
            o = json_ascii(o, arena + r->tag[i], r->tag_n[i]);
        }
        *o++ = ']';
    }
    *o++ = '}';
    out->n = (size_t)(o - out->p);
    return 0;
}

#define GROUP_CACHE 32

static PyObject *py_front_batch(PyObject *Py_UNUSED(mod), PyObject *args) {
    PyObject *raws, *seed_obj;
    Py_ssize_t max_raw, max_text, max_tags, max_field, num_perm;
    Py_buffer mac, key, nonces;
    if (!PyArg_ParseTuple(args, "Onnnny*y*y*nO", &raws, &max_raw, &max_text, &max_tags,
                          &max_field, &mac, &key, &nonces, &num_perm, &seed_obj))
        return NULL;
    PyObject *seq = NULL, *result = NULL;
    SimpleScratch sc = {0};
    Bytes json = {0}, pay = {0}, starts = {0}, cols[5] = {{0}}; /* pos rids chashes groups tss */
    Bytes sk = {0};
    unsigned char *keytext = NULL, *sbuf = NULL;
    Py_ssize_t sbufcap = 0;
    HashVec hv = {0};
    RScratch rs = {0};
    RPerms perms = {0};
    EVP_CIPHER_CTX *ctx = NULL;
    struct {
        char name[64];
        Py_ssize_t n;
        unsigned char h[16];
    } groups[GROUP_CACHE];
    int ngroups = 0;
    if (mac.len > 64 || key.len != 32 || num_perm < 1 || num_perm > RM_MAX_PERM) {
        PyErr_SetString(PyExc_ValueError, "front_batch(): bad key or num_perm");
        goto done;
    }
    unsigned long long seed = PyLong_AsUnsignedLongLong(seed_obj);
    if (seed == (unsigned long long)-1 && PyErr_Occurred()) goto done;
    seq = PySequence_Tuple(raws);
    if (!seq) goto done;
    Py_ssize_t n = PyTuple_GET_SIZE(seq);
    if (nonces.len != NONCE * n) {
        PyErr_SetString(PyExc_ValueError, "front_batch(): 12 bytes of nonce an input");
        goto done;
    }
    if (load_crypto() < 0) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    Hmac0 h;
    hmac_setup(&h, mac.buf, mac.len);
    if (simple_scratch(&sc, max_text, max_tags, max_field) < 0 ||
        !(keytext = PyMem_Malloc(max_text + 1)) ||
        rperms_init(&perms, num_perm, (uint64_t)seed) < 0 ||
        !(rs.a = PyMem_Malloc(num_perm * sizeof(uint64_t))) ||
        !(rs.b = PyMem_Malloc(num_perm * sizeof(uint64_t))) ||
        !(rs.raw = PyMem_Malloc(num_perm * sizeof(uint32_t))) ||
        !(rs.idx = PyMem_Malloc(num_perm * sizeof(uint32_t))) ||
        bytes_room(&cols[0], 4 * (size_t)n + 1) < 0 || bytes_room(&cols[1], 16 * (size_t)n + 1) < 0 ||
        bytes_room(&cols[2], 16 * (size_t)n + 1) < 0 || bytes_room(&cols[3], 16 * (size_t)n + 1) < 0 ||
        bytes_room(&cols[4], 8 * (size_t)n + 1) < 0 ||
        bytes_room(&sk, 4 * (size_t)num_perm * n + 1) < 0 ||
        bytes_room(&starts, 8 * ((size_t)n + 1)) < 0) {
        PyErr_NoMemory();
        goto done;
    }
    if (!(ctx = aead_begin(key.buf))) {
        PyErr_SetString(PyExc_RuntimeError, "front_batch(): libcrypto's AES-GCM failed");
        goto done;
    }
    Py_ssize_t done_n = 0;
    uint64_t *st = (uint64_t *)starts.p;
    for (Py_ssize_t j = 0; j < n; j++) {
        PyObject *raw = PyTuple_GET_ITEM(seq, j);
        if (!PyBytes_CheckExact(raw) || PyBytes_GET_SIZE(raw) > max_raw) continue;
        Simple *r = &sc.r;
        if (!parse_simple((const unsigned char *)PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw),
                          max_text, max_tags, max_field, sc.arena, r))
            continue;
        const unsigned char *text = (const unsigned char *)sc.arena + r->text;
        if (screen_text(text, r->text_n)) continue; /* PII to scrub: the caller's */
        Py_ssize_t kl = normalise_into(text, r->text_n, keytext);
        unsigned char *rid = cols[1].p + 16 * done_n, *chash = cols[2].p + 16 * done_n;
        unsigned char *grp = cols[3].p + 16 * done_n;
        hmac16(&h, "c:", (const char *)keytext, kl, chash);
        if (r->id_n >= 0)
            hmac16(&h, "i:", sc.arena + r->id, r->id_n, rid);
        else
            memcpy(rid, chash, 16);
        /* label, else first tag, else "" (labels are never empty here) */
        const char *name = "";
        Py_ssize_t nl = 0;
        if (r->label_n > 0) {
            name = sc.arena + r->label;
            nl = r->label_n;
        } else if (r->ntags > 0) {
            name = sc.arena + r->tag[0];
            nl = r->tag_n[0];
        }
        int g = 0;
        while (g < ngroups && !(groups[g].n == nl && !memcmp(groups[g].name, name, nl))) g++;
        if (g < ngroups) {
            memcpy(grp, groups[g].h, 16);
        } else {
            hmac16(&h, "g:", name, nl, grp);
            if (ngroups < GROUP_CACHE && nl <= (Py_ssize_t)sizeof groups[0].name) {
                memcpy(groups[ngroups].name, name, nl);
                groups[ngroups].n = nl;
                memcpy(groups[ngroups].h, grp, 16);
                ngroups++;
            }
        }
        memcpy(cols[4].p + 8 * done_n, &r->ts, 8);
        if (simple_json(r, sc.arena, &json) < 0 || json.n > (size_t)INT_MAX / 2 ||
            bytes_room(&pay, json.n + NONCE + TAG) < 0) {
            PyErr_NoMemory();
            goto done;
        }
        st[done_n] = pay.n;
        if (!aead_seal(ctx, (const unsigned char *)nonces.buf + NONCE * j, rid, json.p,
                       (int)json.n, pay.p + pay.n)) {
            PyErr_SetString(PyExc_RuntimeError, "front_batch(): libcrypto's AES-GCM failed");
            goto done;
        }
        pay.n += json.n + NONCE + TAG;
        hv.n = 0;
        if (ascii_shingles(keytext, kl, &hv, &sbuf, &sbufcap) < 0 ||
            sketch_row(&perms, hv.h, hv.n, (uint32_t *)sk.p + done_n * num_perm, &rs) < 0) {
            PyErr_NoMemory();
            goto done;
        }
        ((uint32_t *)cols[0].p)[done_n] = (uint32_t)j;
        done_n++;
    }
    st[done_n] = pay.n;
    result = Py_BuildValue(
        "(y#y#y#y#y#y#y#y#)", cols[0].p, (Py_ssize_t)(4 * done_n), cols[1].p,
        (Py_ssize_t)(16 * done_n), cols[2].p, (Py_ssize_t)(16 * done_n), cols[3].p,
        (Py_ssize_t)(16 * done_n), cols[4].p, (Py_ssize_t)(8 * done_n), sk.p,
        (Py_ssize_t)(4 * num_perm * done_n), pay.p ? (const char *)pay.p : "",
        (Py_ssize_t)pay.n, starts.p, (Py_ssize_t)(8 * (done_n + 1)));
done:
    aead_end(ctx);
    Py_XDECREF(seq);
    simple_scratch_free(&sc);
    PyMem_Free(json.p);
    PyMem_Free(pay.p);
    PyMem_Free(starts.p);
    for (int i = 0; i < 5; i++) PyMem_Free(cols[i].p);
    PyMem_Free(sk.p);
    PyMem_Free(keytext);
    PyMem_Free(sbuf);
    PyMem_Free(hv.h);
    PyMem_Free(rs.a);
    PyMem_Free(rs.b);
    PyMem_Free(rs.f);
    PyMem_Free(rs.raw);
    PyMem_Free(rs.idx);
    PyMem_Free(perms.a);
    PyMem_Free(perms.b);
    PyBuffer_Release(&mac);
    PyBuffer_Release(&key);
    PyBuffer_Release(&nonces);
    return result;
}

static PyMethodDef module_methods[] = {
    {"pii_screen", py_pii_screen, METH_O,
     "pii_screen(texts) -> [index]: the texts that need client.pii's exact path."},
    {"sha_extensions", py_sha_extensions, METH_NOARGS,
     "sha_extensions() -> bool: are keyed hashes computed with the CPU's SHA extensions?"},
    {"use_sha_extensions", py_use_sha_extensions, METH_O,
     "use_sha_extensions(on) -> bool: switch them (tests check both paths)."},
    {"front_batch", py_front_batch, METH_VARARGS,
     "front_batch(raws, max_raw, max_text, max_tags, max_field, mac_key, store_key, "
     "nonces, num_perm, seed) -> the usual records' columns | None"},
    {"record_keys", py_record_keys, METH_VARARGS,
     "record_keys(key, cleans) -> (rids, chashes, groups, tss): a batch's keyed hashes."},
    {"keyed_hashes", py_keyed_hashes, METH_VARARGS,
     "keyed_hashes(key, prefix, items) -> [HMAC-SHA256(key, prefix + item)[:16]]."},
    {"clean_records", py_clean_records, METH_VARARGS,
     "clean_records(raws, max_raw_bytes, max_text_bytes, max_tags, max_field_chars, "
     "clean, no_pii) -> [clean | (content, ts) | None]: the gate's fast path."},
    {"sort_keys", py_sort_keys, METH_VARARGS,
     "sort_keys(parts, width) -> bytes: the distinct keys in parts, sorted, as one blob."},
    {"gather", py_gather, METH_VARARGS,
     "gather(blob, width, indices) -> bytes: the width-byte items at indices."},
    {"gather_var", py_gather_var, METH_VARARGS,
     "gather_var(blob, starts, indices) -> (bytes, [length]): variable-length items."},
    {"dedup_keys", py_dedup_keys, METH_VARARGS,
     "dedup_keys(rids, chashes) -> bytes: a store run of the records' dedup keys."},
    {"simple_records", py_simple_records, METH_VARARGS,
     "simple_records(raws, max_raw_bytes, max_text_bytes, max_tags, max_field_chars)"
     " -> [(content, ts) | None]: the gate's fast path."},
    {"token_hashes", py_token_hashes, METH_O,
     "token_hashes(items) -> (flat uint64 hashes, uint64 row offsets)."},
    {"rows_to_bytes", py_rows_to_bytes, METH_VARARGS,
     "rows_to_bytes(rows, width) -> (len(rows), width) uint32 matrix as bytes."},
    {"sketches", py_sketches, METH_VARARGS,
     "sketches(items, num_perm, seed) -> (len(items), num_perm) uint32 R-MinHash"
     " digests (rensa's) as bytes."},
    {"token_hash", py_token_hash, METH_O, "token_hash(bytes) -> rensa's u64 token hash."},
    {"normalise", py_normalise, METH_O,
     "normalise(text) -> ' '.join(text.split()).lower() for ASCII text, else None."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef native_module = {PyModuleDef_HEAD_INIT, "client._native",
                                           "Native hot paths of ingestion.", -1,
                                           module_methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__native(void) {
#if defined(__x86_64__)
    if (cpu_has_sha()) sha_block = sha256_block_ni;
#endif
    choose_sketch_kernel();
    if (PyType_Ready(&NearIndexType) < 0 || PyType_Ready(&KeyFilterType) < 0) return NULL;
    PyObject *m = PyModule_Create(&native_module);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "NearIndex", (PyObject *)&NearIndexType) < 0 ||
        PyModule_AddObjectRef(m, "KeyFilter", (PyObject *)&KeyFilterType) < 0 ||
        PyModule_AddStringConstant(m, "sketch_kernel", sketch_kernel) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
