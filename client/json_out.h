/* Writing JSON into a growing buffer: a JSON string as orjson writes it (", \ and
 * control characters escaped, every other byte, UTF-8 included, as it is). Included
 * by client/_native.c and client/_seal.c, after Python.h (PyMem_Realloc). */
#ifndef FEDSTREAM_JSON_OUT_H
#define FEDSTREAM_JSON_OUT_H
#include <stddef.h>
#include <string.h>

typedef struct {
    unsigned char *p;
    size_t n, cap;
} Bytes;

/* room for `more` bytes after the n held; -1: out of memory */
static int bytes_room(Bytes *b, size_t more) {
    if (b->n + more <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 65536;
    while (cap < b->n + more) cap *= 2;
    unsigned char *p = PyMem_Realloc(b->p, cap);
    if (!p) return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

/* writes "s" at o (room for 6 bytes a byte of s, plus 2) and returns its end */
static unsigned char *json_string(unsigned char *o, const unsigned char *s, size_t n) {
    static const char hex[] = "0123456789abcdef";
    *o++ = '"';
    for (size_t i = 0; i < n; i++) {
        unsigned char c = s[i];
        if (c >= 0x20 && c != '"' && c != '\\') {
            *o++ = c;
            continue;
        }
        *o++ = '\\';
        switch (c) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '\n': *o++ = 'n'; break;
        case '\r': *o++ = 'r'; break;
        case '\t': *o++ = 't'; break;
        case '\b': *o++ = 'b'; break;
        case '\f': *o++ = 'f'; break;
        default:
            memcpy(o, "u00", 3);
            o += 3;
            *o++ = (unsigned char)hex[c >> 4];
            *o++ = (unsigned char)hex[c & 15];
        }
    }
    *o++ = '"';
    return o;
}
#endif
