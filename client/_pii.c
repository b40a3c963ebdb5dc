/* client.pii's exact scrubbing path for ASCII text, natively.
 *
 * scrub_ascii(texts) gives, for each ASCII text, what Scrubber()._scrub(text,
 * Scrubber().regex) gives: Python re's leftmost-first `sub` over the alternation of the
 * 13 built-in patterns (client.pii.BUILTIN, in that order) with the checksum callback.
 * A non-ASCII text gets None (Python's Unicode \d, \w, \s and case folding: the
 * Python path).
 *
 * The patterns are trees of nodes matched by a small backtracking matcher that tries
 * the paths in the order sre does: greedy repeats longest first, giving back one step
 * at a time; lazy repeats shortest first; alternatives in order; `?` greedy. So the
 * first successful path, i.e. the span, is the one re finds. Over ASCII text, in str
 * patterns: \d = [0-9], \w = [A-Za-z0-9_], \s = [ \t\n\r\x0b\x0c\x1c-\x1f], \b is a
 * \w/non-\w boundary (the ends count as non-\w), (?i:) folds ASCII letters only.
 *
 * Depth: the matcher recurses per node of a path; every repeat of a multi-node body is
 * bounded (at most 30 turns) except EMAIL's `(?:\.[A-Za-z0-9-]+)*`, which is matched
 * by a loop instead (see email() for why that is the same span), and single-class
 * repeats loop. So the C stack depth is bounded by the patterns, not the text.
 * PRIVATE_KEY's lazy `[\s\S]*?` is a loop over the places where "-----END " occurs,
 * with a cache of the first trailer at or after a position, so a text of many
 * unterminated headers stays linear.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdarg.h>
#include <stdint.h>
#include <string.h>

typedef Py_ssize_t ssz;

enum { N_CLS, N_LIT, N_LITI, N_ALT, N_REP, N_WB, N_NLB, N_NLA, N_LAZYANY };

#define MAXALT 8
#define INF (-1)

typedef struct Node {
    int type;
    struct Node *next;       /* what follows; NULL: the end of this branch or body */
    uint8_t set[128];        /* N_CLS, N_NLB, N_NLA */
    const char *lit;         /* N_LIT, N_LITI (lower case) */
    int litlen;
    struct Node *alts[MAXALT]; /* N_ALT */
    int nalts;
    struct Node *body;       /* N_REP */
    int min, max;            /* max INF: unbounded */
    int simple;              /* N_REP: the body is one class */
} Node;

#define ARENA 512
static Node arena[ARENA];
static int used;
static int arena_full;

static Node *nn(int type) {
    static Node dummy;
    if (used >= ARENA) {
        arena_full = 1;
        return &dummy;
    }
    Node *n = &arena[used++];
    memset(n, 0, sizeof *n);
    n->type = type;
    return n;
}

/* ---- character sets ----------------------------------------------------------- */

static uint8_t IS_W[128], IS_D[128], IS_S[128], IS_HEX[128], IS_PHONE[128], KEY_CHAR[128];

static void add_range(uint8_t *set, int lo, int hi) {
    for (int c = lo; c <= hi; c++) set[c] = 1;
}
static void add_chars(uint8_t *set, const char *chars) {
    for (; *chars; chars++) set[(uint8_t)*chars] = 1;
}
static void add_set(uint8_t *set, const uint8_t *other) {
    for (int c = 0; c < 128; c++) set[c] |= other[c];
}

/* A class from a spec: "A-Z", "a-f", "0-9" ranges, "\\d", "\\w", "\\s" and other
 * characters literally. `negate` complements it (over ASCII). */
static Node *cls(const char *spec, int negate) {
    Node *n = nn(N_CLS);
    for (const char *p = spec; *p;) {
        if (p[0] == '\\' && p[1]) {
            if (p[1] == 'd') add_set(n->set, IS_D);
            else if (p[1] == 'w') add_set(n->set, IS_W);
            else if (p[1] == 's') add_set(n->set, IS_S);
            else if (p[1] == 'S') { for (int c = 0; c < 128; c++) n->set[c] |= !IS_S[c]; }
            else n->set[(uint8_t)p[1]] = 1;
            p += 2;
        } else if (p[1] == '-' && p[2]) {
            if (p[0] > p[2]) arena_full = 1; /* a mistyped spec: refuse to load */
            add_range(n->set, (uint8_t)p[0], (uint8_t)p[2]);
            p += 3;
        } else {
            n->set[(uint8_t)*p] = 1;
            p++;
        }
    }
    if (negate)
        for (int c = 0; c < 128; c++) n->set[c] = !n->set[c];
    return n;
}
static Node *one(const char *spec) { return cls(spec, 0); }

static Node *lit(const char *s) {
    Node *n = nn(N_LIT);
    n->lit = s;
    n->litlen = (int)strlen(s);
    return n;
}
static Node *liti(const char *s) { /* (?i:) over ASCII letters; s in lower case */
    Node *n = lit(s);
    n->type = N_LITI;
    return n;
}
static Node *wb(void) { return nn(N_WB); }
static Node *nlb(const char *spec) { /* (?<![...]) */
    Node *n = cls(spec, 0);
    n->type = N_NLB;
    return n;
}
static Node *nla(const char *spec) { /* (?![...]) */
    Node *n = cls(spec, 0);
    n->type = N_NLA;
    return n;
}

static Node *tail(Node *n) {
    while (n->next) n = n->next;
    return n;
}

/* Link a NULL-terminated list of chains into one. */
static Node *seq(Node *first, ...) {
    va_list ap;
    va_start(ap, first);
    Node *end = tail(first);
    for (Node *n = va_arg(ap, Node *); n; n = va_arg(ap, Node *)) {
        end->next = n;
        end = tail(n);
    }
    va_end(ap);
    return first;
}

static Node *alt(Node *first, ...) {
    Node *n = nn(N_ALT);
    va_list ap;
    va_start(ap, first);
    for (Node *a = first; a; a = va_arg(ap, Node *)) {
        if (n->nalts == MAXALT) {
            arena_full = 1;
            break;
        }
        n->alts[n->nalts++] = a;
    }
    va_end(ap);
    return n;
}

static Node *rep(Node *body, int min, int max) { /* greedy {min,max} */
    Node *n = nn(N_REP);
    n->body = body;
    n->min = min;
    n->max = max;
    n->simple = body->type == N_CLS && body->next == NULL;
    return n;
}
static Node *opt(Node *body) { return rep(body, 0, 1); }

/* ---- the matcher ------------------------------------------------------------ */

typedef struct Frame {
    const Node *node; /* N_ALT: continue at node->next; N_REP: one more turn done */
    int count;
    const struct Frame *up;
} Frame;

typedef struct Ctx {
    const uint8_t *s;
    ssz len;
    /* N_LAZYANY at the top level (no frames): no trailer starts in [lz_from, lz_q);
     * one starts at lz_q and ends at lz_end (lz_end -1: none up to the end). */
    int lz_valid;
    ssz lz_from, lz_q, lz_end;
} Ctx;

static ssz m(Ctx *c, const Node *n, ssz pos, const Frame *k);

static ssz rep_turn(Ctx *c, const Node *n, ssz pos, int count, const Frame *k) {
    if (n->max == INF || count < n->max) {
        Frame f = {n, count, k};
        ssz r = m(c, n->body, pos, &f);
        if (r >= 0) return r;
    }
    if (count >= n->min) return m(c, n->next, pos, k);
    return -1;
}

static ssz lazy_any(Ctx *c, const Node *n, ssz pos, const Frame *k) {
    /* [\s\S]*? then n->next: the first q >= pos where the rest matches. */
    const uint8_t *s = c->s;
    ssz len = c->len;
    int top = k == NULL;
    if (top && c->lz_valid && pos >= c->lz_from && pos <= c->lz_q) return c->lz_end;
    int first = -1; /* the rest fails where s[q] is not its literal's first char */
    if (n->next && n->next->type == N_LIT) first = (uint8_t)n->next->lit[0];
    ssz q = pos, found = -1, r = -1;
    while (q <= len) {
        if (first >= 0) {
            const uint8_t *p = q < len ? memchr(s + q, first, (size_t)(len - q)) : NULL;
            if (!p) break;
            q = p - s;
        }
        r = m(c, n->next, q, k);
        if (r >= 0) {
            found = q;
            break;
        }
        q++;
    }
    if (top) {
        c->lz_valid = 1;
        c->lz_from = pos;
        c->lz_q = found >= 0 ? found : len + 1;
        c->lz_end = found >= 0 ? r : -1;
    }
    return found >= 0 ? r : -1;
}

static ssz m(Ctx *c, const Node *n, ssz pos, const Frame *k) {
    const uint8_t *s = c->s;
    const ssz len = c->len;
    for (;;) {
        if (n == NULL) {
            if (k == NULL) return pos;
            const Node *f = k->node;
            if (f->type == N_ALT) {
                n = f->next;
                k = k->up;
                continue;
            }
            return rep_turn(c, f, pos, k->count + 1, k->up);
        }
        switch (n->type) {
        case N_CLS:
            if (pos < len && n->set[s[pos]]) {
                pos++;
                n = n->next;
                continue;
            }
            return -1;
        case N_LIT:
            if (len - pos >= n->litlen && memcmp(s + pos, n->lit, (size_t)n->litlen) == 0) {
                pos += n->litlen;
                n = n->next;
                continue;
            }
            return -1;
        case N_LITI:
            if (len - pos < n->litlen) return -1;
            for (int i = 0; i < n->litlen; i++)
                if ((s[pos + i] | 0x20) != (uint8_t)n->lit[i]) return -1;
            pos += n->litlen;
            n = n->next;
            continue;
        case N_WB: {
            int before = pos > 0 && IS_W[s[pos - 1]];
            int after = pos < len && IS_W[s[pos]];
            if (before == after) return -1;
            n = n->next;
            continue;
        }
        case N_NLB:
            if (pos > 0 && n->set[s[pos - 1]]) return -1;
            n = n->next;
            continue;
        case N_NLA:
            if (pos < len && n->set[s[pos]]) return -1;
            n = n->next;
            continue;
        case N_ALT: {
            Frame f = {n, 0, k};
            for (int i = 0; i < n->nalts; i++) {
                ssz r = m(c, n->alts[i], pos, &f);
                if (r >= 0) return r;
            }
            return -1;
        }
        case N_REP:
            if (n->simple) {
                const uint8_t *set = n->body->set;
                ssz room = len - pos;
                ssz most = n->max == INF || n->max > room ? room : n->max;
                ssz cnt = 0;
                while (cnt < most && set[s[pos + cnt]]) cnt++;
                if (cnt < n->min) return -1;
                for (ssz j = cnt; j > n->min; j--) {
                    ssz r = m(c, n->next, pos + j, k);
                    if (r >= 0) return r;
                }
                pos += n->min; /* the last choice: continue here */
                n = n->next;
                continue;
            }
            return rep_turn(c, n, pos, 0, k);
        case N_LAZYANY:
            return lazy_any(c, n, pos, k);
        }
        return -1;
    }
}

/* ---- the patterns ------------------------------------------------------------ */

enum { T_PRIVATE_KEY, T_SECRET, T_EMAIL, T_IBAN, T_CARD, T_IP, T_PHONE, NTYPES };
static const char *TYPE_NAMES[NTYPES] = {"PRIVATE_KEY", "SECRET", "EMAIL", "IBAN",
                                         "CARD",        "IP",     "PHONE"};
static const char *PLACEHOLDERS[NTYPES] = {"[PRIVATE_KEY]", "[SECRET]", "[EMAIL]",
                                           "[IBAN]",        "[CARD]",   "[IP]",
                                           "[PHONE]"};
static PyObject *type_names[NTYPES];

#define NALTS 13
#define A_EMAIL 7
static const int ALT_TYPE[NALTS] = {T_PRIVATE_KEY, T_SECRET, T_SECRET, T_SECRET, T_SECRET,
                                    T_SECRET,      T_SECRET, T_EMAIL,  T_IBAN,   T_CARD,
                                    T_IP,          T_IP,     T_PHONE};
static Node *heads[NALTS]; /* heads[A_EMAIL] unused: email() */
static Node *kv_head;      /* client.pii._KV */

/* Where each alternative can start: its first characters, and the characters before
 * that its look-behind or leading \b allows (index 128: the start of the text). */
static uint16_t FIRST[128], SECOND[128], PREV_OK[129];
static uint8_t EMAIL_LOCAL[128], EMAIL_DOMAIN[128], ALPHA[128];

static Node *octet(void) { /* (?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d) */
    return alt(seq(lit("25"), one("0-5"), NULL), seq(lit("2"), one("0-4"), one("\\d"), NULL),
               seq(lit("1"), one("\\d"), one("\\d"), NULL), seq(opt(one("1-9")), one("\\d"), NULL),
               NULL);
}

static Node *az_space_star(void) { return rep(one("A-Z "), 0, INF); }

static void build(void) {
    add_range(IS_D, '0', '9');
    add_range(IS_W, '0', '9');
    add_range(IS_W, 'A', 'Z');
    add_range(IS_W, 'a', 'z');
    IS_W['_'] = 1;
    add_chars(IS_S, " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f");
    add_range(IS_HEX, '0', '9');
    add_range(IS_HEX, 'A', 'F');
    add_range(IS_HEX, 'a', 'f');
    add_range(IS_PHONE, '0', '9');
    add_chars(IS_PHONE, " .()+-");
    add_range(KEY_CHAR, 'A', 'Z');
    add_range(KEY_CHAR, 'a', 'z');
    add_chars(KEY_CHAR, "_-");

    /* PRIVATE_KEY -----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY----- */
    heads[0] = seq(lit("-----BEGIN "), az_space_star(), lit("PRIVATE KEY-----"),
                   nn(N_LAZYANY), lit("-----END "), az_space_star(), lit("PRIVATE KEY-----"),
                   NULL);
    /* \bAKIA[0-9A-Z]{16}\b */
    heads[1] = seq(wb(), lit("AKIA"), rep(one("0-9A-Z"), 16, 16), wb(), NULL);
    /* \bgh[pousr]_[A-Za-z0-9]{30,}\b */
    heads[2] = seq(wb(), lit("gh"), one("pousr"), lit("_"), rep(one("A-Za-z0-9"), 30, INF),
                   wb(), NULL);
    /* \bxox[abprs]-[A-Za-z0-9-]{10,} */
    heads[3] = seq(wb(), lit("xox"), one("abprs"), lit("-"), rep(one("A-Za-z0-9-"), 10, INF),
                   NULL);
    /* \bsk-[A-Za-z0-9_-]{20,} */
    heads[4] = seq(wb(), lit("sk-"), rep(one("A-Za-z0-9_-"), 20, INF), NULL);
    /* \beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,} */
    heads[5] = seq(wb(), lit("eyJ"), rep(one("A-Za-z0-9_-"), 8, INF), lit("."),
                   rep(one("A-Za-z0-9_-"), 8, INF), lit("."), rep(one("A-Za-z0-9_-"), 8, INF),
                   NULL);
    /* \b(?i:password|passwd|pwd|secret|api[_-]?key|access[_-]?token|token)
     * ["']?\s*[:=]\s*["']?[^\s"',;]{4,} */
    heads[6] = seq(wb(),
                   alt(liti("password"), liti("passwd"), liti("pwd"), liti("secret"),
                       seq(liti("api"), opt(one("_-")), liti("key"), NULL),
                       seq(liti("access"), opt(one("_-")), liti("token"), NULL), liti("token"),
                       NULL),
                   opt(one("\"'")), rep(one("\\s"), 0, INF), one(":="), rep(one("\\s"), 0, INF),
                   opt(one("\"'")), rep(cls("\\s\"',;", 1), 4, INF), NULL);
    heads[A_EMAIL] = NULL;
    /* \b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b */
    heads[8] = seq(wb(), rep(one("A-Z"), 2, 2), rep(one("\\d"), 2, 2),
                   rep(seq(opt(one(" ")), one("A-Z0-9"), NULL), 11, 30), wb(), NULL);
    /* (?<![\w.])\d(?:[ -]?\d){12,18}(?![\w]) */
    heads[9] = seq(nlb("\\w."), one("\\d"), rep(seq(opt(one(" -")), one("\\d"), NULL), 12, 18),
                   nla("\\w"), NULL);
    /* (?<![\w.])(?:OCTET\.){3}OCTET(?![\w.]) */
    heads[10] = seq(nlb("\\w."), rep(seq(octet(), lit("."), NULL), 3, 3), octet(), nla("\\w."),
                    NULL);
    /* (?<![\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:]) */
    heads[11] = seq(nlb("\\w:"), rep(seq(rep(one("0-9A-Fa-f"), 1, 4), lit(":"), NULL), 7, 7),
                    rep(one("0-9A-Fa-f"), 1, 4), nla("\\w:"), NULL);
    /* (?<![\w+])\+?\(?\d{1,4}\)?(?:[ .-]?\(?\d{1,4}\)?){2,5}(?![\w]) */
    heads[12] = seq(nlb("\\w+"), opt(one("+")), opt(one("(")), rep(one("\\d"), 1, 4),
                    opt(one(")")),
                    rep(seq(opt(one(" .-")), opt(one("(")), rep(one("\\d"), 1, 4), opt(one(")")),
                            NULL),
                        2, 5),
                    nla("\\w"), NULL);
    /* (?i)^[a-z_-]+["']?\s*[:=]\s*["']? */
    kv_head = seq(rep(one("a-zA-Z_-"), 1, INF), opt(one("\"'")), rep(one("\\s"), 0, INF),
                  one(":="), rep(one("\\s"), 0, INF), opt(one("\"'")), NULL);

    add_range(EMAIL_LOCAL, 'A', 'Z');
    add_range(EMAIL_LOCAL, 'a', 'z');
    add_range(EMAIL_LOCAL, '0', '9');
    add_chars(EMAIL_LOCAL, "._%+-");
    add_range(EMAIL_DOMAIN, 'A', 'Z');
    add_range(EMAIL_DOMAIN, 'a', 'z');
    add_range(EMAIL_DOMAIN, '0', '9');
    EMAIL_DOMAIN['-'] = 1;
    add_range(ALPHA, 'A', 'Z');
    add_range(ALPHA, 'a', 'z');

    /* First characters (a superset is enough: the matcher decides). */
    const char *firsts[NALTS] = {"-", "A", "g", "x", "s", "e", "pPsSaAtT", NULL, "A-Z",
                                 "\\d", "\\d", "0-9A-Fa-f", "\\d+("};
    for (int i = 0; i < NALTS; i++) {
        uint8_t set[128] = {0};
        if (i == A_EMAIL) memcpy(set, EMAIL_LOCAL, sizeof set);
        else {
            Node *t = cls(firsts[i], 0); /* a scratch node */
            memcpy(set, t->set, sizeof set);
        }
        for (int ch = 0; ch < 128; ch++)
            if (set[ch]) FIRST[ch] |= (uint16_t)(1u << i);
    }
    /* Second characters (every match is at least 3 long), supersets again. EMAIL: any
     * local-part character or '@'. kv: the second letters of its key words. IBAN:
     * [A-Z]{2}. CARD: \d[ -]?\d. IPv4: an octet's second digit or '.'. IPv6: hex or
     * ':'. PHONE: after \+? \(? \d, one of \( \d \) [ .-]. */
    const char *seconds[NALTS] = {"-", "K", "h", "o", "k", "y", "aAwWeEpPcCoO", "._%+@\\w-",
                                  "A-Z", "\\d -", "\\d.", "0-9A-Fa-f:", "\\d(). -"};
    for (int i = 0; i < NALTS; i++) {
        Node *t = cls(seconds[i], 0);
        for (int ch = 0; ch < 128; ch++)
            if (t->set[ch]) SECOND[ch] |= (uint16_t)(1u << i);
    }
    /* The characters before a start that each alternative allows: a leading \b before a
     * \w first character needs a non-\w one; the look-behinds exclude their class. */
    for (int p = 0; p <= 128; p++) {
        uint16_t ok = (1u << NALTS) - 1;
        if (p < 128) {
            if (IS_W[p]) ok &= ~(uint16_t)((1u << 1) | (1u << 2) | (1u << 3) | (1u << 4) |
                                           (1u << 5) | (1u << 6) | (1u << 8) | (1u << 9) |
                                           (1u << 10) | (1u << 11) | (1u << 12));
            if (p == '.') ok &= ~(uint16_t)((1u << 9) | (1u << 10));
            if (p == ':') ok &= ~(uint16_t)(1u << 11);
            if (p == '+') ok &= ~(uint16_t)(1u << 12);
        }
        PREV_OK[p] = ok;
    }
}

/* EMAIL [A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,} at p.
 *
 * '@' is not a local-part character, so the local part is the whole run from p and an
 * '@' must end it; '.' is not a domain character, so every [A-Za-z0-9-]+ that a
 * successful path takes is a whole run (a shorter one is followed by a domain
 * character, where '.' is needed). The domain is then runs s1 . s2 . ... . sk; the
 * greedy (?:...)* takes the most runs first and gives back one at a time, and the
 * final \.[A-Za-z]{2,} needs a run s_i (i >= 2) that starts with two letters: the
 * match is the largest such i, ending after the letters at its start (greedy, nothing
 * after). The result depends only on where the local run ends, so a failure holds
 * for every start in the same run: *fail_until. */
static ssz email(const uint8_t *s, ssz len, ssz p, ssz *fail_until) {
    ssz r = p;
    while (r < len && EMAIL_LOCAL[s[r]]) r++;
    if (r == p || r >= len || s[r] != '@') {
        *fail_until = r;
        return -1;
    }
    ssz e = r + 1;
    while (e < len && EMAIL_DOMAIN[s[e]]) e++;
    ssz best = -1;
    if (e > r + 1) {
        while (e + 1 < len && s[e] == '.' && EMAIL_DOMAIN[s[e + 1]]) {
            ssz b = e + 1, l = b;
            while (l < len && ALPHA[s[l]]) l++;
            if (l - b >= 2) best = l;
            e = b;
            while (e < len && EMAIL_DOMAIN[s[e]]) e++;
        }
    }
    if (best < 0) *fail_until = r;
    return best;
}

/* ---- the callback: client.pii.Scrubber._valid and the placeholders ------------ */

static int luhn_ok(const uint8_t *d, ssz n) {
    int total = 0, parity = (int)(n % 2);
    for (ssz i = 0; i < n; i++) {
        int x = d[i] - '0';
        if ((int)(i % 2) == parity) {
            x *= 2;
            if (x > 9) x -= 9;
        }
        total += x;
    }
    return total % 10 == 0;
}

static int iban_ok(const uint8_t *v, ssz n) {
    uint8_t t[64];
    ssz nt = 0;
    for (ssz i = 0; i < n; i++) {
        if (v[i] == ' ') continue;
        if (nt == (ssz)sizeof t) return 0; /* longer than 34 anyway */
        t[nt++] = v[i];
    }
    if (nt < 15 || nt > 34) return 0;
    unsigned rem = 0;
    for (ssz j = 0; j < nt; j++) {
        uint8_t ch = t[(j + 4) % nt]; /* s[4:] + s[:4] */
        if (ch >= '0' && ch <= '9') rem = (rem * 10 + (ch - '0')) % 97;
        else if ((ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z'))
            rem = (rem * 100 + (unsigned)((ch | 0x20) - 'a' + 10)) % 97;
        else return 0; /* int(c, 36) raises */
    }
    return rem == 1;
}

static int valid(int type, const uint8_t *v, ssz n) {
    uint8_t d[128];
    ssz nd = 0;
    for (ssz i = 0; i < n; i++)
        if (IS_D[v[i]] && nd < (ssz)sizeof d) d[nd++] = v[i];
    if (type == T_CARD) return nd >= 13 && nd <= 19 && luhn_ok(d, nd);
    if (type == T_IBAN) return iban_ok(v, n);
    if (nd < 9 || nd > 15) return 0; /* PHONE */
    if (n > 0 && v[0] == '+') return 1;
    for (ssz i = 0; i < n; i++)
        if (v[i] == ' ' || v[i] == '.' || v[i] == '-' || v[i] == '(' || v[i] == ')') return 1;
    return 0;
}

typedef struct Buf {
    char *p;
    ssz len, cap;
} Buf;

static int put(Buf *b, const void *src, ssz n) {
    if (n <= 0) return 0;
    if (b->len + n > b->cap) {
        ssz cap = b->cap ? b->cap : 256;
        while (cap < b->len + n) cap *= 2;
        char *p = PyMem_Realloc(b->p, (size_t)cap);
        if (!p) {
            PyErr_NoMemory();
            return -1;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, src, (size_t)n);
    b->len += n;
    return 0;
}

/* Exact pre-checks of what a match of alternative i at pos needs (the matcher decides
 * after them): 1 if it may match. */
static int quick(int i, const uint8_t *s, ssz len, ssz pos) {
    ssz j, d;
    switch (i) {
    case 6: /* kv: its key word is a whole run of [A-Za-z_-] (what follows it is not),
             * 3-12 long, then ["']?\s*[:=] */
        for (j = pos; j < len && KEY_CHAR[s[j]]; j++) {}
        if (j - pos < 3 || j - pos > 12) return 0;
        if (j < len && (s[j] == '"' || s[j] == '\'')) j++;
        while (j < len && IS_S[s[j]]) j++;
        return j < len && (s[j] == ':' || s[j] == '=');
    case 8: /* IBAN: [A-Z]{2}\d{2} */
        return len - pos >= 4 && IS_D[s[pos + 2]] && IS_D[s[pos + 3]];
    case 9: /* CARD: 13 digits in a run of [0-9 -] */
        for (j = pos, d = 0; j < len; j++) {
            if (IS_D[s[j]]) {
                if (++d == 13) return 1;
            } else if (s[j] != ' ' && s[j] != '-') return 0;
        }
        return 0;
    case 10: /* IPv4: an octet is a whole run of 1-3 digits (a shorter one is followed
              * by a digit, where '.' or (?![\w.]) is needed): four, '.' apart */
        for (j = pos, d = 0; d < 4; d++) {
            ssz r = j;
            while (j < len && j - r < 4 && IS_D[s[j]]) j++;
            if (j == r || j - r > 3) return 0;
            if (d < 3) {
                if (j >= len || s[j] != '.') return 0;
                j++;
            }
        }
        return 1;
    case 11: /* IPv6: a group is a whole run of 1-4 hex digits, then ':' */
        for (j = pos; j < len && j - pos < 5 && IS_HEX[s[j]]; j++) {}
        return j - pos <= 4 && j < len && s[j] == ':';
    case 12: /* PHONE: its characters are [0-9 .()+-], 3 digits at least */
        for (j = pos, d = 0; j < len && IS_PHONE[s[j]]; j++)
            if (IS_D[s[j]] && ++d == 3) return 1;
        return 0;
    }
    return 1;
}

/* PHONE at a digit, where the digits from pos are followed by something that no
 * group can start with: every successful path then takes exactly the digit run (a
 * shorter one is followed by a digit, where (?![\w]) fails), and some path does when
 * the run has 3-24 digits (3-6 groups of 1-4) and no \w follows. Returns the end, -1
 * (no match), or -2: the run goes on into [ .-]\(?\d, (\d or ')': the matcher. */
static ssz phone_digits(const uint8_t *s, ssz len, ssz pos) {
    ssz j = pos;
    while (j < len && IS_D[s[j]]) j++;
    if (j < len) {
        uint8_t x = s[j];
        int y = j + 1 < len ? s[j + 1] : -1;
        if (x == ')') return -2;
        if (x == '(' && y >= 0 && IS_D[y]) return -2;
        if ((x == ' ' || x == '.' || x == '-') && y >= 0 && (IS_D[y] || y == '(')) return -2;
        if (IS_W[x]) return -1;
    }
    return j - pos >= 3 && j - pos <= 24 ? j : -1;
}

/* One text: the output into *b, the counts into counts; returns whether anything was
 * replaced, or -1 on a memory error. */
static int scrub_one(const uint8_t *s, ssz len, Buf *b, ssz counts[NTYPES]) {
    Ctx c = {s, len, 0, 0, 0, 0};
    ssz pos = 0, done = 0, email_fail_until = 0;
    ssz at_next = -1, at_run = 0; /* the next '@' and the local-part run before it */
    int replaced = 0;
    uint16_t email_bit = (uint16_t)(1u << A_EMAIL);
    uint16_t allowed = (uint16_t)((1u << NALTS) - 1);
    if (!memchr(s, '@', (size_t)len)) allowed &= (uint16_t)~email_bit;
    /* kv needs ':' or '='; IPv6 seven ':'. */
    ssz colons = 0, equals = 0;
    for (const uint8_t *p = s; (p = memchr(p, ':', (size_t)(s + len - p))) != NULL; p++)
        if (++colons == 7) break;
    if (colons < 7) allowed &= (uint16_t)~(1u << 11);
    if (!colons) {
        equals = memchr(s, '=', (size_t)len) != NULL;
        if (!equals) allowed &= (uint16_t)~(1u << 6);
    }
    b->len = 0;
    const ssz last = len - 1; /* every match is longer than one character */
    unsigned email_on = allowed & email_bit;
    allowed &= (uint16_t)~email_bit;
    while (pos < last) {
        /* EMAIL can start only in the run of local-part characters before an '@':
         * [at_run, at_next), and not again after it failed there (email_fail_until). */
        ssz stop = last;
        unsigned with = allowed;
        if (email_on) {
            if (at_next < pos) {
                const uint8_t *p = memchr(s + pos, '@', (size_t)(len - pos));
                at_next = p ? p - s : len;
                for (at_run = at_next; at_run > pos && EMAIL_LOCAL[s[at_run - 1]]; at_run--) {}
                if (!p) email_on = 0;
            }
            if (!email_on) {}
            else if (pos < at_run) stop = at_run < last ? at_run : last;
            else if (pos < at_next && pos >= email_fail_until) with |= email_bit;
            else if (pos < at_next) stop = at_next < last ? at_next : last;
            else stop = pos + 1; /* the '@' */
        }
        unsigned msk = 0;
        if (with == allowed) { /* skip to where some alternative can start */
            ssz p = pos;
            while (p < stop &&
                   !(msk = FIRST[s[p]] & SECOND[s[p + 1]] & PREV_OK[p ? s[p - 1] : 128] & with))
                p++;
            pos = p;
            if (p >= stop) continue;
        } else {
            msk = FIRST[s[pos]] & SECOND[s[pos + 1]] & PREV_OK[pos ? s[pos - 1] : 128] & with;
        }
        ssz end = -1;
        int i = 0;
        while (msk) {
            i = __builtin_ctz(msk);
            msk &= msk - 1;
            if (!quick(i, s, len, pos)) continue;
            if (i == A_EMAIL) end = email(s, len, pos, &email_fail_until);
            else if (i == 12 && IS_D[s[pos]] && (end = phone_digits(s, len, pos)) != -2) {}
            else end = m(&c, heads[i], pos, NULL);
            if (end >= 0) break;
        }
        if (end < 0) {
            pos++;
            continue;
        }
        /* The callback. */
        int type = ALT_TYPE[i];
        const uint8_t *v = s + pos;
        ssz n = end - pos;
        int keep = 0;
        if ((type == T_CARD || type == T_IBAN || type == T_PHONE) && !valid(type, v, n)) {
            if (type == T_PHONE || !valid(T_PHONE, v, n)) keep = 1;
            else type = T_PHONE;
        }
        if (!keep) {
            if (put(b, s + done, pos - done) < 0) return -1;
            if (type == T_SECRET) {
                Ctx kc = {v, n, 0, 0, 0, 0};
                ssz key = m(&kc, kv_head, 0, NULL);
                if (key > 0 && put(b, v, key) < 0) return -1;
            }
            if (put(b, PLACEHOLDERS[type], (ssz)strlen(PLACEHOLDERS[type])) < 0) return -1;
            counts[type]++;
            replaced = 1;
            done = end;
        }
        pos = end; /* these patterns never match empty */
    }
    if (replaced && put(b, s + done, len - done) < 0) return -1;
    return replaced;
}

/* The patterns this matcher implements, exactly as client.pii.BUILTIN writes them:
 * client.pii uses scrub_ascii only while the two agree, and a test compares them, so
 * a pattern edited on one side only cannot change what is scrubbed unnoticed. */
static const char *const IMPLEMENTED[][2] = {
    {"PRIVATE_KEY", "-----BEGIN [A-Z ]*PRIVATE KEY-----[\\s\\S]*?-----END [A-Z ]*PRIVATE KEY-----"},
    {"SECRET", "\\bAKIA[0-9A-Z]{16}\\b"},
    {"SECRET", "\\bgh[pousr]_[A-Za-z0-9]{30,}\\b"},
    {"SECRET", "\\bxox[abprs]-[A-Za-z0-9-]{10,}"},
    {"SECRET", "\\bsk-[A-Za-z0-9_-]{20,}"},
    {"SECRET", "\\beyJ[A-Za-z0-9_-]{8,}\\.[A-Za-z0-9_-]{8,}\\.[A-Za-z0-9_-]{8,}"},
    {"SECRET", "\\b(?i:password|passwd|pwd|secret|api[_-]?key|access[_-]?token|token)[\\\"']?\\s*[:=]\\s*[\\\"']?[^\\s\\\"',;]{4,}"},
    {"EMAIL", "[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\\.[A-Za-z0-9-]+)*\\.[A-Za-z]{2,}"},
    {"IBAN", "\\b[A-Z]{2}\\d{2}(?: ?[A-Z0-9]){11,30}\\b"},
    {"CARD", "(?<![\\w.])\\d(?:[ -]?\\d){12,18}(?![\\w])"},
    {"IP", "(?<![\\w.])(?:(?:25[0-5]|2[0-4]\\d|1\\d\\d|[1-9]?\\d)\\.){3}(?:25[0-5]|2[0-4]\\d|1\\d\\d|[1-9]?\\d)(?![\\w.])"},
    {"IP", "(?<![\\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\\w:])"},
    {"PHONE", "(?<![\\w+])\\+?\\(?\\d{1,4}\\)?(?:[ .-]?\\(?\\d{1,4}\\)?){2,5}(?![\\w])"},
};

static PyObject *py_scrub_ascii(PyObject *self, PyObject *texts) {
    if (!PyList_Check(texts)) {
        PyErr_SetString(PyExc_TypeError, "scrub_ascii() takes a list of str");
        return NULL;
    }
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    Buf b = {NULL, 0, 0};
    /* The list is read again at each step: allocations may run other code. */
    for (ssz i = 0; i < PyList_GET_SIZE(texts); i++) {
        PyObject *t = PyList_GET_ITEM(texts, i);
        if (!PyUnicode_Check(t)) {
            PyErr_Format(PyExc_TypeError, "scrub_ascii() item %zd is %.80s, not str", i,
                         Py_TYPE(t)->tp_name);
            goto fail;
        }
        Py_INCREF(t);
#if PY_VERSION_HEX < 0x030C0000
        if (PyUnicode_READY(t) < 0) {
            Py_DECREF(t);
            goto fail;
        }
#endif
        PyObject *item;
        if (!PyUnicode_IS_ASCII(t)) { /* str.isascii(): the Python path */
            item = Py_None;
            Py_INCREF(item);
        } else {
            ssz counts[NTYPES] = {0};
            const uint8_t *s = PyUnicode_1BYTE_DATA(t);
            int replaced = scrub_one(s, PyUnicode_GET_LENGTH(t), &b, counts);
            PyObject *text = NULL, *dict = NULL;
            if (replaced < 0) {
                Py_DECREF(t);
                goto fail;
            }
            if (replaced || !PyUnicode_CheckExact(t)) { /* re.sub gives a str */
                const char *src = replaced ? b.p : (const char *)s;
                ssz n = replaced ? b.len : PyUnicode_GET_LENGTH(t);
                text = PyUnicode_New(n, 127);
                if (text) memcpy(PyUnicode_1BYTE_DATA(text), src, (size_t)n);
            } else {
                text = t;
                Py_INCREF(text);
            }
            dict = PyDict_New();
            for (int ty = 0; dict && ty < NTYPES; ty++) {
                if (!counts[ty]) continue;
                PyObject *v = PyLong_FromSsize_t(counts[ty]);
                if (!v || PyDict_SetItem(dict, type_names[ty], v) < 0) Py_CLEAR(dict);
                Py_XDECREF(v);
            }
            item = text && dict ? PyTuple_Pack(2, text, dict) : NULL;
            Py_XDECREF(text);
            Py_XDECREF(dict);
        }
        Py_DECREF(t);
        if (!item) goto fail;
        int rc = PyList_Append(out, item);
        Py_DECREF(item);
        if (rc < 0) goto fail;
    }
    PyMem_Free(b.p);
    return out;
fail:
    PyMem_Free(b.p);
    Py_DECREF(out);
    return NULL;
}

static PyMethodDef module_methods[] = {
    {"scrub_ascii", py_scrub_ascii, METH_O,
     "scrub_ascii(texts) -> [(text, counts) | None]: Scrubber()._scrub over the built-in "
     "patterns for each ASCII text; None for a non-ASCII one."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef pii_module = {PyModuleDef_HEAD_INIT, "client._pii",
                                        "client.pii's exact path for ASCII text.", -1,
                                        module_methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__pii(void) {
    if (!used) {
        build();
        if (arena_full) {
            PyErr_SetString(PyExc_SystemError, "client._pii: pattern arena too small");
            used = 0;
            return NULL;
        }
        for (int t = 0; t < NTYPES; t++) {
            type_names[t] = PyUnicode_InternFromString(TYPE_NAMES[t]);
            if (!type_names[t]) return NULL;
        }
    }
    PyObject *m = PyModule_Create(&pii_module);
    if (!m) return NULL;
    ssz n = (ssz)(sizeof IMPLEMENTED / sizeof IMPLEMENTED[0]);
    PyObject *patterns = PyTuple_New(n);
    if (!patterns) goto fail;
    for (ssz i = 0; i < n; i++) {
        PyObject *pair = Py_BuildValue("(ss)", IMPLEMENTED[i][0], IMPLEMENTED[i][1]);
        if (!pair) {
            Py_DECREF(patterns);
            goto fail;
        }
        PyTuple_SET_ITEM(patterns, i, pair);
    }
    if (PyModule_AddObject(m, "BUILTIN", patterns) < 0) {
        Py_DECREF(patterns);
        goto fail;
    }
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
