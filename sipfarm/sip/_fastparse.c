/* The common case of sipfarm/sip/parser.py's header split and SipMessage.to_bytes, in C.
 *
 * Theory of operation
 * -------------------
 * parse_message spends most of its time turning the header section into the
 * (key, raw_name, value) list and the dict of watched first values; to_bytes joins that list
 * again.  Both are simple on a well-formed message and fiddly on the rest (folding, bare CR or
 * LF, compact or unknown names, repeats), and the rest must keep the Python code's exact errors.
 * So this module does only the common case and answers None for anything else: the Python code
 * (the reference) then does the whole job, as it does in the interpreted build, which has no
 * such module.  A None is never an error, only "not mine".
 *
 *   split_headers(data, key_cache, watched, single, max_headers)
 *       -> (start_line, headers, first_values, body_start, start) | None
 *     data: the message, leading CRLFs already stripped.  The common case: the header section
 *     ends with CRLFCRLF; every line ends with CRLF (no bare CR or LF anywhere before it); no
 *     line starts with SP/HTAB (folding); at most max_headers header lines; each has a colon
 *     and a name (the bytes before the colon, without SP/HTAB before it) that is a key of key_cache (the
 *     parser's raw name -> key dict; a name not in it yet goes through Python once, which adds
 *     it); a header whose key is in `single` and `watched` repeated with another value (an
 *     error) is not the common case either.  headers: [(key, raw_name, value)], value without
 *     the SP/HTAB around it; first_values: {key: first value} for keys in `watched`; the
 *     tuples, list and dict exactly as parser._parse_headers builds them.  start: the start
 *     line's (method, uri, status, reason) when it has the common form ("SIP/2.0 DDD reason",
 *     DDD in 100..699, or "token SP uri SP SIP/2.0"; what parser._parse_start_line would make of
 *     it), else None: the parser reads start_line itself.
 *   join(start_line, headers, body) -> bytes | None
 *     start_line CRLF (raw_name ": " value CRLF)* CRLF body, as SipMessage.to_bytes; None
 *     when an argument is not what a SipMessage holds (a list of 3-tuples of bytes...), for
 *     the Python code to do (or fail) as it always did.
 *   digest_params(value) -> (scheme, params, quoted) | None
 *     sipfarm/sip/auth.py's _parse_fast of an Authorization / WWW-Authenticate value, read
 *     from its bytes: "Digest" (any case) SP, then name=value params separated by single
 *     commas, optional SP/HTAB around each name, "=" and value; a value is an HTTP token or a
 *     quoted-string without backslash or control characters.  scheme: the first six
 *     characters; params: {lower-cased name: value (without quotes)}; quoted: the frozenset
 *     of names whose value was quoted.  None for anything else (a byte >= 0x80 included: the
 *     UTF-8 decode and its error are Python's), or a repeated name (the scanner names it).
 *
 * Names: a name's key and watched/single flags are remembered in a small direct-mapped table
 * (NAME_SLOTS entries, bounded; strong references to the key str and a raw-name bytes object
 * that every message then shares), filled from key_cache: the cache only ever gains entries and
 * a name's key never changes, so an entry stays right.  The table is flushed when it is called
 * with another cache or other sets (tests).
 *
 * Safety: every read is inside data's buffer (memchr/memcmp bounded by the header end, which is
 * found inside the buffer); no Python code runs while pointers into arguments are held (only
 * exact-type checks, bytes/str/tuple/dict/set C calls on exact types: set membership of an
 * exact str hashes without calling back into Python).  The GIL is held throughout.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#define NAME_SLOTS 256 /* power of two */
#define MAX_NAME 128   /* longer names are looked up in the dict each time */

#define FLAG_WATCHED 1
#define FLAG_SINGLE 2

typedef struct {
    PyObject *raw; /* bytes: the raw name (strong reference), or NULL */
    PyObject *key; /* str: its key (strong reference) */
    int flags;
} name_entry;

static name_entry names[NAME_SLOTS];
/* What the table was filled from (identity only; the table holds no reference to them, and
 * compares these pointers only: a new object at a freed one's address flushes nothing, so the
 * parser passes its module-level objects, which live as long as the process). */
static PyObject *names_cache = NULL;
static PyObject *names_watched = NULL;
static PyObject *names_single = NULL;

static void names_flush(void) {
    for (int i = 0; i < NAME_SLOTS; i++) {
        Py_CLEAR(names[i].raw);
        Py_CLEAR(names[i].key);
        names[i].flags = 0;
    }
}

static inline unsigned int name_hash(const char *p, Py_ssize_t n) {
    unsigned int h = 2166136261u;
    for (Py_ssize_t i = 0; i < n; i++) h = (h ^ (unsigned char)p[i]) * 16777619u;
    return h;
}

/* The entry for name p[0:n]: borrowed pointers into the table (or into *tmp_raw and *tmp_key for a
 * name too long for it, the caller then owning both).  Returns 1 found, 0 not in the cache
 * (not the common case), -1 error. */
static int name_lookup(const char *p, Py_ssize_t n, PyObject *cache, PyObject *watched, PyObject *single,
                       PyObject **raw, PyObject **key, int *flags, PyObject **tmp_raw, PyObject **tmp_key) {
    name_entry *e = NULL;
    if (n <= MAX_NAME) {
        e = &names[name_hash(p, n) & (NAME_SLOTS - 1)];
        if (e->raw != NULL && PyBytes_GET_SIZE(e->raw) == n && memcmp(PyBytes_AS_STRING(e->raw), p, (size_t)n) == 0) {
            *raw = e->raw;
            *key = e->key;
            *flags = e->flags;
            return 1;
        }
    }
    PyObject *name = PyBytes_FromStringAndSize(p, n);
    if (name == NULL) return -1;
    PyObject *found = PyDict_GetItemWithError(cache, name); /* borrowed; bytes hash: no callback */
    if (found == NULL) {
        Py_DECREF(name);
        return PyErr_Occurred() ? -1 : 0;
    }
    if (!PyUnicode_CheckExact(found)) {
        Py_DECREF(name);
        return 0;
    }
    int w = PySet_Contains(watched, found);
    int s = w < 0 ? -1 : PySet_Contains(single, found);
    if (w < 0 || s < 0) {
        Py_DECREF(name);
        return -1;
    }
    int fl = (w ? FLAG_WATCHED : 0) | (s ? FLAG_SINGLE : 0);
    Py_INCREF(found);
    if (e != NULL) {
        Py_XSETREF(e->raw, name);
        Py_XSETREF(e->key, found);
        e->flags = fl;
        *raw = e->raw;
        *key = e->key;
    } else {
        *tmp_raw = name;
        *tmp_key = found;
        *raw = name;
        *key = found;
    }
    *flags = fl;
    return 1;
}

/* RFC 3261 25.1: token = 1*(alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`" / "'" / "~") */
static int is_token_char(unsigned char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '.' ||
           c == '!' || c == '%' || c == '*' || c == '_' || c == '+' || c == '`' || c == '\'' || c == '~';
}

/* Whether p[0..n) holds a control character but HTAB (LF and CR included): what no start line
 * holds and no header line but in a quoted-pair (parser._CONTROL, _refuse_controls: every line
 * holding one is Python's to judge).  Eight bytes at a time: a word with no byte below 0x20 and
 * none equal to 0x7f is passed over (the test may flag a word that has neither; its bytes are
 * then looked at one by one). */
static int has_control(const char *p, Py_ssize_t n) {
    const unsigned char *s = (const unsigned char *)p;
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t x, y;
        memcpy(&x, s + i, 8);
        y = x ^ 0x7f7f7f7f7f7f7f7fULL;
        uint64_t below = (x - 0x2020202020202020ULL) & ~x & 0x8080808080808080ULL;
        uint64_t del = (y - 0x0101010101010101ULL) & ~y & 0x8080808080808080ULL;
        if ((below | del) == 0) continue;
        for (int k = 0; k < 8; k++) {
            unsigned char c = s[i + k];
            if ((c < 0x20 && c != '\t') || c == 0x7f) return 1;
        }
    }
    for (; i < n; i++) {
        unsigned char c = s[i];
        if ((c < 0x20 && c != '\t') || c == 0x7f) return 1;
    }
    return 0;
}

/* RFC 3261 25.1: a Reason-Phrase holds no control character but HTAB (parser._REASON_CONTROLS) */
static int reason_ok(const char *p, Py_ssize_t n) { return !has_control(p, n); }

/* The start line's (method, uri, status, reason) when it is the common case (parser
 * _parse_start_line would accept it as it is): "SIP/2.0 DDD[ reason]" with DDD in 100..699 and
 * no control character but HTAB in the reason (reason_ok), or
 * "token SP uri SP SIP/2.0" with a non-empty uri without SP.  Py_None otherwise (a new reference
 * either way; NULL on error). */
static PyObject *start_line_parts(const char *p, Py_ssize_t n) {
    static const char version[] = "SIP/2.0";
    if (n >= 11 && memcmp(p, "SIP/2.0 ", 8) == 0) {
        const unsigned char *d = (const unsigned char *)p + 8;
        if (d[0] < '1' || d[0] > '6' || d[1] < '0' || d[1] > '9' || d[2] < '0' || d[2] > '9') Py_RETURN_NONE;
        if (n > 11 && (p[11] != ' ' || !reason_ok(p + 12, n - 12))) Py_RETURN_NONE;
        long status = (d[0] - '0') * 100 + (d[1] - '0') * 10 + (d[2] - '0');
        return Py_BuildValue("(y#y#ly#)", "", (Py_ssize_t)0, "", (Py_ssize_t)0, status, n > 11 ? p + 12 : "",
                             n > 11 ? n - 12 : (Py_ssize_t)0);
    }
    if (n >= 4 && (p[0] == 'S' || p[0] == 's') && (p[1] == 'I' || p[1] == 'i') && (p[2] == 'P' || p[2] == 'p') &&
        p[3] == '/')
        Py_RETURN_NONE; /* a response's start line, not in the common form */
    const char *sp1 = memchr(p, ' ', (size_t)n);
    if (sp1 == NULL || sp1 == p) Py_RETURN_NONE;
    for (const char *c = p; c < sp1; c++)
        if (!is_token_char((unsigned char)*c)) Py_RETURN_NONE;
    const char *uri = sp1 + 1, *end = p + n;
    const char *sp2 = memchr(uri, ' ', (size_t)(end - uri));
    if (sp2 == NULL || sp2 == uri || end - (sp2 + 1) != 7 || memcmp(sp2 + 1, version, 7) != 0) Py_RETURN_NONE;
    return Py_BuildValue("(y#y#iy#)", p, (Py_ssize_t)(sp1 - p), uri, (Py_ssize_t)(sp2 - uri), 0, "", (Py_ssize_t)0);
}

static PyObject *split_headers(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "split_headers(data, key_cache, watched, single, max_headers)");
        return NULL;
    }
    PyObject *data = args[0], *cache = args[1], *watched = args[2], *single = args[3];
    if (!PyDict_CheckExact(cache) || !PyAnySet_CheckExact(watched) || !PyAnySet_CheckExact(single)) {
        PyErr_SetString(PyExc_TypeError, "split_headers: key_cache must be a dict, watched and single sets");
        return NULL;
    }
    Py_ssize_t max_headers = PyLong_AsSsize_t(args[4]);
    if (max_headers == -1 && PyErr_Occurred()) return NULL;
    if (!PyBytes_CheckExact(data)) Py_RETURN_NONE;
    if (cache != names_cache || watched != names_watched || single != names_single) {
        names_flush();
        names_cache = cache;
        names_watched = watched;
        names_single = single;
    }

    const char *buf = PyBytes_AS_STRING(data);
    Py_ssize_t size = PyBytes_GET_SIZE(data);
    if (size < 4 || buf[0] == '\r' || buf[0] == '\n') Py_RETURN_NONE;
    /* the end of the header section: the first CRLFCRLF */
    const char *end = NULL;
    {
        const char *p = buf;
        const char *limit = buf + size - 3; /* a CRLFCRLF starting before limit fits */
        while (p < limit) {
            const char *cr = memchr(p, '\r', (size_t)(limit - p));
            if (cr == NULL) break;
            if (cr[1] == '\n' && cr[2] == '\r' && cr[3] == '\n') {
                end = cr;
                break;
            }
            p = cr + 1;
        }
    }
    if (end == NULL) Py_RETURN_NONE; /* no blank line: Python's cases */

    /* the start line */
    const char *p = buf;
    const char *cr = memchr(p, '\r', (size_t)(end - p));
    const char *line_end = cr != NULL ? cr : end;
    if (memchr(p, '\n', (size_t)(line_end - p)) != NULL) Py_RETURN_NONE;
    if (cr != NULL && cr[1] != '\n') Py_RETURN_NONE; /* bare CR (cr + 1 <= end: inside data) */

    PyObject *start_line = NULL, *headers = NULL, *first = NULL, *result = NULL;
    PyObject *tmp_raw = NULL, *tmp_key = NULL;
    start_line = PyBytes_FromStringAndSize(p, line_end - p);
    if (start_line == NULL) goto error;
    headers = PyList_New(0);
    if (headers == NULL) goto error;
    first = PyDict_New();
    if (first == NULL) goto error;

    Py_ssize_t count = 0;
    p = line_end + 2; /* the first header line, or end + 2 when there is none */
    while (p < end) {
        cr = memchr(p, '\r', (size_t)(end - p));
        line_end = cr != NULL ? cr : end;
        if (cr != NULL && cr[1] != '\n') goto not_mine; /* bare CR */
        if (line_end == p || *p == ' ' || *p == '\t') goto not_mine; /* folding (or empty) */
        if (has_control(p, line_end - p)) goto not_mine; /* a bare LF, a NUL, an escaped one...: Python's */
        if (++count > max_headers) goto not_mine;
        const char *colon = memchr(p, ':', (size_t)(line_end - p));
        if (colon == NULL) goto not_mine;
        PyObject *raw, *key;
        int flags;
        /* HCOLON = *( SP / HTAB ) ":" SWS: the name without the whitespace before the colon
         * (the cache's names are tokens: never with it) */
        const char *name_end = colon;
        while (name_end > p && (name_end[-1] == ' ' || name_end[-1] == '\t')) name_end--;
        int found = name_lookup(p, name_end - p, cache, watched, single, &raw, &key, &flags, &tmp_raw, &tmp_key);
        if (found < 0) goto error;
        if (found == 0) goto not_mine;
        const char *vs = colon + 1, *ve = line_end;
        while (vs < ve && (*vs == ' ' || *vs == '\t')) vs++;
        while (ve > vs && (ve[-1] == ' ' || ve[-1] == '\t')) ve--;
        PyObject *value = PyBytes_FromStringAndSize(vs, ve - vs);
        if (value == NULL) goto error;
        if (flags & FLAG_WATCHED) {
            PyObject *seen = PyDict_GetItemWithError(first, key); /* borrowed */
            if (seen == NULL) {
                if (PyErr_Occurred() || PyDict_SetItem(first, key, value) < 0) {
                    Py_DECREF(value);
                    goto error;
                }
            } else if ((flags & FLAG_SINGLE) &&
                       (PyBytes_GET_SIZE(seen) != ve - vs || memcmp(PyBytes_AS_STRING(seen), vs, (size_t)(ve - vs)) != 0)) {
                Py_DECREF(value);
                goto not_mine; /* a second, different Call-ID, CSeq...: Python's error */
            }
        }
        PyObject *item = PyTuple_New(3);
        if (item == NULL) {
            Py_DECREF(value);
            goto error;
        }
        Py_INCREF(key);
        Py_INCREF(raw);
        PyTuple_SET_ITEM(item, 0, key);
        PyTuple_SET_ITEM(item, 1, raw);
        PyTuple_SET_ITEM(item, 2, value); /* the reference moves */
        /* str and bytes only: nothing a cycle could run through.  Untracked now, the tuple
         * stays out of the cyclic GC's young generation (CPython untracks such a tuple itself,
         * but only at the first collection that visits it: a transaction's messages live 32 s,
         * and each of their header tuples was walked once at least). */
        PyObject_GC_UnTrack(item);
        Py_CLEAR(tmp_raw);
        Py_CLEAR(tmp_key);
        int rc = PyList_Append(headers, item);
        Py_DECREF(item);
        if (rc < 0) goto error;
        p = line_end + 2;
    }
    {
        PyObject *body_start = PyLong_FromSsize_t((end - buf) + 4);
        if (body_start == NULL) goto error;
        PyObject *start = start_line_parts(PyBytes_AS_STRING(start_line), PyBytes_GET_SIZE(start_line));
        if (start == NULL) {
            Py_DECREF(body_start);
            goto error;
        }
        result = PyTuple_New(5);
        if (result == NULL) {
            Py_DECREF(body_start);
            Py_DECREF(start);
            goto error;
        }
        PyTuple_SET_ITEM(result, 0, start_line);
        PyTuple_SET_ITEM(result, 1, headers);
        PyTuple_SET_ITEM(result, 2, first);
        PyTuple_SET_ITEM(result, 3, body_start);
        PyTuple_SET_ITEM(result, 4, start);
        return result;
    }

not_mine:
    Py_XDECREF(tmp_raw);
    Py_XDECREF(tmp_key);
    Py_XDECREF(start_line);
    Py_XDECREF(headers);
    Py_XDECREF(first);
    Py_RETURN_NONE;
error:
    Py_XDECREF(tmp_raw);
    Py_XDECREF(tmp_key);
    Py_XDECREF(start_line);
    Py_XDECREF(headers);
    Py_XDECREF(first);
    return NULL;
}

static PyObject *join(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "join(start_line, headers, body)");
        return NULL;
    }
    PyObject *start = args[0], *headers = args[1], *body = args[2];
    if (!PyBytes_CheckExact(start) || !PyList_CheckExact(headers) || !PyBytes_CheckExact(body)) Py_RETURN_NONE;
    Py_ssize_t n = PyList_GET_SIZE(headers);
    /* sizes first (nothing below calls Python code: the list cannot change under us) */
    Py_ssize_t total = PyBytes_GET_SIZE(start);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *h = PyList_GET_ITEM(headers, i);
        if (!PyTuple_CheckExact(h) || PyTuple_GET_SIZE(h) != 3) Py_RETURN_NONE;
        PyObject *raw = PyTuple_GET_ITEM(h, 1), *value = PyTuple_GET_ITEM(h, 2);
        if (!PyBytes_CheckExact(raw) || !PyBytes_CheckExact(value)) Py_RETURN_NONE;
        Py_ssize_t add = PyBytes_GET_SIZE(raw) + PyBytes_GET_SIZE(value) + 4; /* CRLF raw ": " value */
        if (total > PY_SSIZE_T_MAX - add) return PyErr_NoMemory();
        total += add;
    }
    if (total > PY_SSIZE_T_MAX - 4 - PyBytes_GET_SIZE(body)) return PyErr_NoMemory();
    total += 4 + PyBytes_GET_SIZE(body); /* CRLF CRLF body */
    PyObject *out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL) return NULL;
    char *w = PyBytes_AS_STRING(out);
    memcpy(w, PyBytes_AS_STRING(start), (size_t)PyBytes_GET_SIZE(start));
    w += PyBytes_GET_SIZE(start);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *h = PyList_GET_ITEM(headers, i);
        PyObject *raw = PyTuple_GET_ITEM(h, 1), *value = PyTuple_GET_ITEM(h, 2);
        *w++ = '\r';
        *w++ = '\n';
        memcpy(w, PyBytes_AS_STRING(raw), (size_t)PyBytes_GET_SIZE(raw));
        w += PyBytes_GET_SIZE(raw);
        *w++ = ':';
        *w++ = ' ';
        memcpy(w, PyBytes_AS_STRING(value), (size_t)PyBytes_GET_SIZE(value));
        w += PyBytes_GET_SIZE(value);
    }
    memcpy(w, "\r\n\r\n", 4);
    w += 4;
    memcpy(w, PyBytes_AS_STRING(body), (size_t)PyBytes_GET_SIZE(body));
    return out;
}

/* RFC 7230 3.2.6 tchar, as auth.py's _TOKEN_RE: "!#$%&'*+-.^_`|~" DIGIT ALPHA */
static int is_tchar(unsigned char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '!' || c == '#' ||
           c == '$' || c == '%' || c == '&' || c == '\'' || c == '*' || c == '+' || c == '-' || c == '.' ||
           c == '^' || c == '_' || c == '`' || c == '|' || c == '~';
}

static PyObject *digest_params(PyObject *self, PyObject *value) {
    if (!PyBytes_CheckExact(value)) Py_RETURN_NONE;
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(value);
    Py_ssize_t n = PyBytes_GET_SIZE(value);
    if (n < 8 || PyOS_strnicmp((const char *)p, "digest", 6) != 0 || p[6] != ' ') Py_RETURN_NONE;
    for (Py_ssize_t k = 0; k < n; k++)
        if (p[k] >= 0x80) Py_RETURN_NONE; /* the UTF-8 decode (and its error) is Python's */
    PyObject *params = PyDict_New(), *quoted = PyList_New(0), *name = NULL, *val = NULL;
    if (params == NULL || quoted == NULL) goto fail;
    const unsigned char *c = p + 7, *end = p + n;
    for (;;) {
        while (c < end && (*c == ' ' || *c == '\t')) c++;
        const unsigned char *ns = c;
        while (c < end && is_tchar(*c)) c++;
        Py_ssize_t nlen = c - ns;
        if (nlen == 0) goto none;
        while (c < end && (*c == ' ' || *c == '\t')) c++;
        if (c >= end || *c != '=') goto none;
        c++;
        while (c < end && (*c == ' ' || *c == '\t')) c++;
        if (c >= end) goto none;
        int is_quoted = 0;
        const unsigned char *vs, *ve;
        if (*c == '"') {
            vs = ++c;
            while (c < end && *c != '"' && *c != '\\' && *c >= 0x20 && *c != 0x7f) c++;
            if (c >= end || *c != '"') goto none;
            ve = c++;
            is_quoted = 1;
        } else {
            vs = c;
            while (c < end && is_tchar(*c)) c++;
            ve = c;
            if (ve == vs) goto none;
        }
        while (c < end && (*c == ' ' || *c == '\t')) c++;
        name = PyUnicode_New(nlen, 127);
        if (name == NULL) goto fail;
        Py_UCS1 *lowered = PyUnicode_1BYTE_DATA(name);
        for (Py_ssize_t k = 0; k < nlen; k++) lowered[k] = (Py_UCS1)Py_TOLOWER(ns[k]);
        val = PyUnicode_DecodeASCII((const char *)vs, ve - vs, NULL);
        if (val == NULL) goto fail;
        int has = PyDict_Contains(params, name);
        if (has < 0) goto fail;
        if (has) goto none; /* a repeated name: the scanner names the defect */
        if (PyDict_SetItem(params, name, val) < 0) goto fail;
        if (is_quoted && PyList_Append(quoted, name) < 0) goto fail;
        Py_CLEAR(name);
        Py_CLEAR(val);
        if (c == end) break;
        if (*c != ',') goto none;
        c++;
    }
    PyObject *frozen = PyFrozenSet_New(quoted);
    Py_DECREF(quoted);
    if (frozen == NULL) {
        Py_DECREF(params);
        return NULL;
    }
    PyObject *scheme = PyUnicode_DecodeASCII((const char *)p, 6, NULL);
    if (scheme == NULL) {
        Py_DECREF(params);
        Py_DECREF(frozen);
        return NULL;
    }
    PyObject *out = PyTuple_Pack(3, scheme, params, frozen);
    Py_DECREF(scheme);
    Py_DECREF(params);
    Py_DECREF(frozen);
    return out;
none:
    Py_XDECREF(name);
    Py_XDECREF(val);
    Py_XDECREF(params);
    Py_XDECREF(quoted);
    Py_RETURN_NONE;
fail:
    Py_XDECREF(name);
    Py_XDECREF(val);
    Py_XDECREF(params);
    Py_XDECREF(quoted);
    return NULL;
}

/* ---- response_hop: a balancer's forwarding of a response, read and cut in one scan ------------
 *
 *   response_hop(data, prefixes, hop_prefix, max_size) -> (out, branch, key, pending) | None
 *
 * What sipfarm/balancer/core.py's general path (parse_message, _on_response, to_bytes) does to a
 * response whose top Via is the balancer's own, for the common shape, with the same bytes out;
 * None for anything else (the general path then does the whole job, errors and counters
 * included).  The shape:
 *   - data is at most max_size bytes; starts "SIP/2.0 DDD " (DDD in 100..699), the reason
 *     after it without a control character but HTAB (reason_ok: the parser drops the rest);
 *   - the header section ends with CRLFCRLF, every line ends with CRLF (no bare CR or LF), no
 *     line starts with SP/HTAB (folding), at most MAX_HEADER_LINES header lines;
 *   - every header line is a non-empty token name, a colon, SP, then the value: out writes it
 *     back as to_bytes writes the parsed line (`name ": " value`, the SP/HTAB around the value
 *     dropped as the parser drops them);
 *   - Via, From, To, Call-ID and CSeq present (full or compact names, any case); Call-ID,
 *     From, To, CSeq, Content-Length and Max-Forwards each at most once;
 *   - CSeq is `digits SP token` (at most 10 digits, below 2**31); Content-Length, if present,
 *     is digits equal to the body's length; not a 2xx to a REGISTER (the balancer then keeps the
 *     client's flow: the general path);
 *   - the first Via line starts with one of `prefixes` (the starts of the Vias this balancer
 *     writes, "SIP/2.0/UDP host:port;", each with its only ";" last), then "branch="
 *     hop_prefix and one or more lower-case hex digits, then the end of the line or a comma
 *     and more via-parms (no quote in the line, the next one not empty);
 *   - the next via-parm (on that line, or the first of the next Via line) is not empty, has no
 *     quote on its line, and (up to a comma outside "<...>") a non-empty ";branch=" parameter,
 *     read as headers.via_branch reads it.
 * out: data without our via-parm (the whole Via line when it was alone on it, else the via-parm,
 * its comma and the SP/HTAB after it, as headers.first_element leaves the line); branch: the
 * balancer's branch; key: the next Via's
 * branch (edge.transaction_key); pending: for a response to INVITE or REGISTER, Call-ID SP
 * CSeq number (as overload.AdmissionControl keys a request), else None.  The branch is not
 * verified here: the caller checks it (HopBranches.decode), as the general path does.
 * Every read stays inside data's buffer; no Python code runs while pointers into it are held.
 */
#define MAX_HEADER_LINES 256

enum { HK_OTHER, HK_VIA, HK_FROM, HK_TO, HK_CALLID, HK_CSEQ, HK_CLEN, HK_MAXFWD };

static int lower_eq(const char *p, Py_ssize_t n, const char *lower) {
    Py_ssize_t i = 0;
    for (; i < n && lower[i]; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c >= 'A' && c <= 'Z') c = (unsigned char)(c + 32);
        if (c != (unsigned char)lower[i]) return 0;
    }
    return i == n && lower[i] == 0;
}

static int header_kind(const char *p, Py_ssize_t n) {
    if (n == 1) {
        switch (p[0] | 0x20) {
        case 'v': return HK_VIA;
        case 'f': return HK_FROM;
        case 't': return HK_TO;
        case 'i': return HK_CALLID;
        case 'l': return HK_CLEN;
        default: return HK_OTHER;
        }
    }
    if (lower_eq(p, n, "via")) return HK_VIA;
    if (lower_eq(p, n, "from")) return HK_FROM;
    if (lower_eq(p, n, "to")) return HK_TO;
    if (lower_eq(p, n, "call-id")) return HK_CALLID;
    if (lower_eq(p, n, "cseq")) return HK_CSEQ;
    if (lower_eq(p, n, "content-length")) return HK_CLEN;
    if (lower_eq(p, n, "max-forwards")) return HK_MAXFWD;
    return HK_OTHER;
}

/* what bytes.strip() strips (headers.first_element strips the elements it cuts) */
static int is_pyspace(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\x0b' || c == '\x0c'; }

static int is_lower_hex(unsigned char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); }

typedef struct {
    Py_ssize_t name, name_end, value, value_end; /* offsets in data: a line's name and value */
} line_span;

static PyObject *response_hop(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "response_hop(data, prefixes, hop_prefix, max_size)");
        return NULL;
    }
    PyObject *data = args[0], *prefixes = args[1], *hop_prefix = args[2];
    if (!PyBytes_CheckExact(data) || !PyTuple_CheckExact(prefixes) || !PyBytes_CheckExact(hop_prefix))
        Py_RETURN_NONE;
    Py_ssize_t max_size = PyLong_AsSsize_t(args[3]);
    if (max_size == -1 && PyErr_Occurred()) return NULL;
    const char *p = PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    if (n > max_size || n < 16 || memcmp(p, "SIP/2.0 ", 8) != 0) Py_RETURN_NONE;
    const unsigned char *d = (const unsigned char *)p + 8;
    if (d[0] < '1' || d[0] > '6' || d[1] < '0' || d[1] > '9' || d[2] < '0' || d[2] > '9' || p[11] != ' ')
        Py_RETURN_NONE;
    int status = (d[0] - '0') * 100 + (d[1] - '0') * 10 + (d[2] - '0');
    const char *head_end = memmem(p, (size_t)n, "\r\n\r\n", 4);
    if (head_end == NULL) Py_RETURN_NONE;
    Py_ssize_t hend = head_end - p; /* the last header line ends here */
    Py_ssize_t body_start = hend + 4;

    line_span lines[MAX_HEADER_LINES];
    int nlines = 0;
    int via1 = -1, via2 = -1, callid = -1, cseq = -1, clen = -1;
    int seen_from = 0, seen_to = 0, seen_maxfwd = 0;

    /* the start line: no CR or LF inside */
    const char *eol = memchr(p, '\r', (size_t)hend + 2);
    /* no control character in the start line, its reason included (the parser drops it) */
    if (eol == NULL || eol[1] != '\n' || has_control(p, eol - p)) Py_RETURN_NONE;
    Py_ssize_t start_len = (eol - p) + 2; /* with its CRLF */
    Py_ssize_t pos = start_len;
    while (pos < hend + 2) {
        const char *ls = p + pos;
        const char *cr = memchr(ls, '\r', (size_t)(hend - pos + 1));
        if (cr == NULL || cr[1] != '\n') Py_RETURN_NONE;
        Py_ssize_t len = cr - ls;
        if (len == 0 || has_control(ls, len)) Py_RETURN_NONE; /* the parser's to judge */
        if (nlines >= MAX_HEADER_LINES) Py_RETURN_NONE;
        const char *colon = memchr(ls, ':', (size_t)len);
        if (colon == NULL || colon == ls) Py_RETURN_NONE;
        for (const char *c = ls; c < colon; c++)
            if (!is_token_char((unsigned char)*c)) Py_RETURN_NONE;
        /* ": " then the value without the SP/HTAB around it (what the parser keeps) */
        Py_ssize_t vs = (colon - p) + 1, ve = cr - p;
        if (vs >= ve || p[vs] != ' ') Py_RETURN_NONE;
        while (vs < ve && (p[vs] == ' ' || p[vs] == '\t')) vs++;
        while (ve > vs && (p[ve - 1] == ' ' || p[ve - 1] == '\t')) ve--;
        line_span *span = &lines[nlines];
        span->name = pos;
        span->name_end = colon - p;
        span->value = vs;
        span->value_end = ve;
        switch (header_kind(ls, colon - ls)) {
        case HK_VIA:
            if (via1 < 0)
                via1 = nlines;
            else if (via2 < 0)
                via2 = nlines;
            break;
        case HK_FROM:
            if (seen_from++) Py_RETURN_NONE;
            break;
        case HK_TO:
            if (seen_to++) Py_RETURN_NONE;
            break;
        case HK_MAXFWD:
            if (seen_maxfwd++) Py_RETURN_NONE;
            break;
        case HK_CALLID:
            if (callid >= 0) Py_RETURN_NONE;
            callid = nlines;
            break;
        case HK_CSEQ:
            if (cseq >= 0) Py_RETURN_NONE;
            cseq = nlines;
            break;
        case HK_CLEN:
            if (clen >= 0) Py_RETURN_NONE;
            clen = nlines;
            break;
        default:
            break;
        }
        nlines++;
        pos = (cr - p) + 2;
    }
    if (via1 < 0 || !seen_from || !seen_to || callid < 0 || cseq < 0) Py_RETURN_NONE;

    /* Content-Length: digits, equal to the body's length (the general path would cut a longer body) */
    if (clen >= 0) {
        Py_ssize_t a = lines[clen].value, z = lines[clen].value_end;
        if (z - a < 1 || z - a > 10) Py_RETURN_NONE;
        long long v = 0;
        for (Py_ssize_t i = a; i < z; i++) {
            if (p[i] < '0' || p[i] > '9') Py_RETURN_NONE;
            v = v * 10 + (p[i] - '0');
        }
        if (v > 2147483648LL || v != (long long)(n - body_start)) Py_RETURN_NONE;
    }
    /* CSeq: digits SP token */
    Py_ssize_t ca = lines[cseq].value, cz = lines[cseq].value_end;
    const char *sp = memchr(p + ca, ' ', (size_t)(cz - ca));
    if (sp == NULL) Py_RETURN_NONE;
    Py_ssize_t ndig = (sp - p) - ca;
    if (ndig < 1 || ndig > 10) Py_RETURN_NONE;
    long long seq = 0;
    for (Py_ssize_t i = ca; i < ca + ndig; i++) {
        if (p[i] < '0' || p[i] > '9') Py_RETURN_NONE;
        seq = seq * 10 + (p[i] - '0');
    }
    if (seq >= 2147483648LL) Py_RETURN_NONE;
    const char *method = sp + 1;
    Py_ssize_t mlen = (p + cz) - method;
    if (mlen < 1) Py_RETURN_NONE;
    for (Py_ssize_t i = 0; i < mlen; i++)
        if (!is_token_char((unsigned char)method[i])) Py_RETURN_NONE;
    int is_register = mlen == 8 && memcmp(method, "REGISTER", 8) == 0;
    int new_work = is_register || (mlen == 6 && memcmp(method, "INVITE", 6) == 0);
    if (is_register && status >= 200 && status < 300) Py_RETURN_NONE;

    /* the first Via: one of ours, prefix "branch=" hop_prefix hex */
    const char *v = p + lines[via1].value;
    Py_ssize_t vlen = lines[via1].value_end - lines[via1].value;
    Py_ssize_t matched = -1;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(prefixes); i++) {
        PyObject *pre = PyTuple_GET_ITEM(prefixes, i);
        if (!PyBytes_CheckExact(pre)) continue;
        Py_ssize_t plen = PyBytes_GET_SIZE(pre);
        const char *pp = PyBytes_AS_STRING(pre);
        if (plen < 1 || plen > vlen || pp[plen - 1] != ';' || memchr(pp, ';', (size_t)plen) != pp + plen - 1) continue;
        if (memchr(pp, '[', (size_t)plen) != NULL || memchr(pp, '"', (size_t)plen) != NULL) continue;
        if (memcmp(v, pp, (size_t)plen) == 0) {
            matched = plen;
            break;
        }
    }
    if (matched < 0) Py_RETURN_NONE;
    Py_ssize_t hp = PyBytes_GET_SIZE(hop_prefix);
    const char *b = v + matched;
    Py_ssize_t blen = vlen - matched;
    if (blen < 7 + hp + 1 || memcmp(b, "branch=", 7) != 0 || memcmp(b + 7, PyBytes_AS_STRING(hop_prefix), (size_t)hp) != 0)
        Py_RETURN_NONE;
    Py_ssize_t t = 7 + hp;
    while (t < blen && is_lower_hex((unsigned char)b[t])) t++;
    if (t == 7 + hp) Py_RETURN_NONE;
    const char *branch = b + 7;
    Py_ssize_t branch_len = t - 7;
    /* what stays of the first Via line: nothing (our via-parm alone on it), or what follows
     * its comma, stripped, as headers.first_element leaves it (rest: offset in data, or -1) */
    Py_ssize_t rest = -1;
    const char *w;
    Py_ssize_t wlen;
    if (t == blen) {
        if (via2 < 0) Py_RETURN_NONE;
        w = p + lines[via2].value;
        wlen = lines[via2].value_end - lines[via2].value;
    } else {
        if (b[t] != ',' || memchr(v, '"', (size_t)vlen) != NULL || is_pyspace(v[vlen - 1])) Py_RETURN_NONE;
        const char *r = b + t + 1, *vend = v + vlen;
        while (r < vend && is_pyspace(*r)) r++;
        if (r == vend || *r == ',') Py_RETURN_NONE;
        rest = r - p;
        w = r;
        wlen = vend - r;
    }

    /* the next via-parm (the first of w) and its branch */
    if (wlen < 1 || memchr(w, '"', (size_t)wlen) != NULL) Py_RETURN_NONE;
    const char *comma = memchr(w, ',', (size_t)wlen);
    Py_ssize_t first_len = wlen;
    if (comma != NULL) {
        if (memchr(w, '<', (size_t)(comma - w)) != NULL) Py_RETURN_NONE;
        first_len = comma - w;
        while (first_len > 0 && is_pyspace(w[first_len - 1])) first_len--;
        if (first_len == 0) Py_RETURN_NONE;
        const char *r = comma + 1, *wend = w + wlen;
        while (r < wend && is_pyspace(*r)) r++;
        if (r < wend && *r == ',') Py_RETURN_NONE;
    }
    const char *kb = memmem(w, (size_t)first_len, ";branch=", 8);
    if (kb == NULL) Py_RETURN_NONE;
    kb += 8;
    const char *ke = kb, *fend = w + first_len;
    while (ke < fend && *ke != ';' && *ke != ' ' && *ke != ',' && *ke != '\t' && *ke != '\r' && *ke != '\n') ke++;
    if (ke == kb) Py_RETURN_NONE;

    /* the answer, as SipMessage.to_bytes writes the general path's message: start line, each
     * line `name ": " value` (our via-parm out), CRLF, body.  Objects are built only now: no
     * Python code ran during the scan. */
    PyObject *out = PyBytes_FromStringAndSize(NULL, n); /* never longer than data */
    if (out == NULL) return NULL;
    char *o = PyBytes_AS_STRING(out), *o0 = o;
    memcpy(o, p, (size_t)start_len);
    o += start_len;
    for (int i = 0; i < nlines; i++) {
        const line_span *span = &lines[i];
        Py_ssize_t vfrom = span->value;
        if (i == via1) {
            if (rest < 0) continue;
            vfrom = rest;
        }
        Py_ssize_t k = span->name_end - span->name;
        memcpy(o, p + span->name, (size_t)k);
        o += k;
        *o++ = ':';
        *o++ = ' ';
        k = span->value_end - vfrom;
        memcpy(o, p + vfrom, (size_t)k);
        o += k;
        *o++ = '\r';
        *o++ = '\n';
    }
    *o++ = '\r';
    *o++ = '\n';
    memcpy(o, p + body_start, (size_t)(n - body_start));
    o += n - body_start;
    if (_PyBytes_Resize(&out, o - o0) < 0) return NULL;
    PyObject *pending;
    if (new_work) {
        char num[24];
        int k = snprintf(num, sizeof num, " %lld", seq);
        Py_ssize_t id_len = lines[callid].value_end - lines[callid].value;
        pending = PyBytes_FromStringAndSize(NULL, id_len + k);
        if (pending == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        memcpy(PyBytes_AS_STRING(pending), p + lines[callid].value, (size_t)id_len);
        memcpy(PyBytes_AS_STRING(pending) + id_len, num, (size_t)k);
    } else {
        pending = Py_NewRef(Py_None);
    }
    return Py_BuildValue("(Ny#y#N)", out, branch, branch_len, kb, (Py_ssize_t)(ke - kb), pending);
}

/* ---- stamp_via: RFC 3261 18.2.1 received / RFC 3581 rport on a simple via-parm ---------------
 *
 *   stamp_via(raw, source_host, source_port) -> bytes | None | False
 *
 * sipfarm/sip/via.py's _stamp_fast on the bytes: False where _split_fast answers None (not
 * "SIP/2.0/...", a quote or "[" anywhere, no SP, an empty host or one with SP/HTAB inside, a
 * port that is not 1-5 ASCII digits), None when nothing is to be added, else the new via-parm:
 * a bare rport gets the source port, received is added (or replaced) when rport is present or
 * the host differs (ASCII case-insensitively) from source_host, unless it already says it.
 * Parameter names are matched as _stamp_fast matches them (bytes.strip(), ASCII lower case);
 * everything else is kept byte for byte.  source_host: the source address as ASCII bytes.
 */
static int span_strip(const char **a, const char **z) {
    while (*a < *z && is_pyspace(**a)) (*a)++;
    while (*z > *a && is_pyspace((*z)[-1])) (*z)--;
    return (int)(*z - *a);
}

static PyObject *stamp_via(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "stamp_via(raw, source_host, source_port)");
        return NULL;
    }
    PyObject *raw = args[0], *src = args[1];
    if (!PyBytes_CheckExact(raw) || !PyBytes_CheckExact(src)) Py_RETURN_FALSE;
    long port = PyLong_AsLong(args[2]);
    if (port == -1 && PyErr_Occurred()) return NULL;
    const char *p = PyBytes_AS_STRING(raw), *end = p + PyBytes_GET_SIZE(raw);
    Py_ssize_t n = PyBytes_GET_SIZE(raw);
    const char *sh = PyBytes_AS_STRING(src);
    Py_ssize_t shn = PyBytes_GET_SIZE(src);
    if (n < 8 || memcmp(p, "SIP/2.0/", 8) != 0 || memchr(p, '"', (size_t)n) != NULL || memchr(p, '[', (size_t)n) != NULL)
        Py_RETURN_FALSE;
    const char *space = memchr(p, ' ', (size_t)n);
    if (space == NULL) Py_RETURN_FALSE;
    const char *sb = space + 1; /* sent-by, up to the first ';' */
    const char *semi = memchr(sb, ';', (size_t)(end - sb));
    const char *sb_end = semi != NULL ? semi : end;
    const char *ha = sb, *hz = sb_end;
    span_strip(&ha, &hz);
    const char *colon = memchr(ha, ':', (size_t)(hz - ha));
    const char *host_end = colon != NULL ? colon : hz;
    if (host_end == ha || memchr(ha, ' ', (size_t)(host_end - ha)) != NULL || memchr(ha, '\t', (size_t)(host_end - ha)) != NULL)
        Py_RETURN_FALSE;
    if (colon != NULL) {
        Py_ssize_t k = hz - (colon + 1);
        if (k < 1 || k > 5) Py_RETURN_FALSE;
        for (const char *c = colon + 1; c < hz; c++)
            if (*c < '0' || *c > '9') Py_RETURN_FALSE;
    }
    /* the parameters: the first rport (bare or not) and the first received */
    Py_ssize_t rport_at = -1, received_at = -1, index = 0;
    int rport_bare = 0;
    const char *recv_a = NULL, *recv_z = NULL;
    if (semi != NULL && semi + 1 < end) { /* params.split(b";") if params else [] */
        const char *q = semi + 1;
        for (;;) {
            const char *pe = memchr(q, ';', (size_t)(end - q));
            if (pe == NULL) pe = end;
            const char *eq = memchr(q, '=', (size_t)(pe - q));
            const char *na = q, *nz = eq != NULL ? eq : pe;
            int nlen = span_strip(&na, &nz);
            if (rport_at < 0 && nlen == 5) {
                char low[5];
                for (int i = 0; i < 5; i++) low[i] = (char)((na[i] >= 'A' && na[i] <= 'Z') ? na[i] + 32 : na[i]);
                if (memcmp(low, "rport", 5) == 0) {
                    rport_at = index;
                    rport_bare = eq == NULL;
                    goto next;
                }
            }
            if (received_at < 0 && nlen == 8) {
                char low[8];
                for (int i = 0; i < 8; i++) low[i] = (char)((na[i] >= 'A' && na[i] <= 'Z') ? na[i] + 32 : na[i]);
                if (memcmp(low, "received", 8) == 0) {
                    received_at = index;
                    if (eq != NULL) {
                        recv_a = eq + 1;
                        recv_z = pe;
                        span_strip(&recv_a, &recv_z);
                    } else {
                        recv_a = recv_z = pe;
                    }
                }
            }
        next:
            index++;
            if (pe == end) break;
            q = pe + 1;
        }
    }
    int same_host = (host_end - ha) == shn;
    for (Py_ssize_t i = 0; same_host && i < shn; i++) {
        char c = ha[i];
        if (c >= 'A' && c <= 'Z') c = (char)(c + 32);
        if (c != sh[i]) same_host = 0;
    }
    int received_same = recv_a != NULL && (recv_z - recv_a) == shn && memcmp(recv_a, sh, (size_t)shn) == 0;
    int add_received = (rport_at >= 0 || !same_host) && !received_same;
    if (!add_received && !rport_bare) Py_RETURN_NONE;

    /* protocol SP sent-by ";" the parameters, rport filled in, received set */
    char rport_text[32];
    int rport_len = snprintf(rport_text, sizeof rport_text, "rport=%ld", port);
    Py_ssize_t cap = n + rport_len + 10 + shn + 2;
    PyObject *out = PyBytes_FromStringAndSize(NULL, cap);
    if (out == NULL) return NULL;
    char *o = PyBytes_AS_STRING(out), *o0 = o;
    memcpy(o, p, (size_t)(sb_end - p));
    o += sb_end - p;
    *o++ = ';';
    index = 0;
    if (semi != NULL && semi + 1 < end) { /* params.split(b";") if params else [] */
        const char *q = semi + 1;
        for (;;) {
            const char *pe = memchr(q, ';', (size_t)(end - q));
            if (pe == NULL) pe = end;
            if (index > 0) *o++ = ';';
            if (index == rport_at && rport_bare) {
                memcpy(o, rport_text, (size_t)rport_len);
                o += rport_len;
            } else if (index == received_at && add_received) {
                memcpy(o, "received=", 9);
                o += 9;
                memcpy(o, sh, (size_t)shn);
                o += shn;
            } else {
                memcpy(o, q, (size_t)(pe - q));
                o += pe - q;
            }
            index++;
            if (pe == end) break;
            q = pe + 1;
        }
    }
    if (add_received && received_at < 0) {
        if (index > 0) *o++ = ';';
        memcpy(o, "received=", 9);
        o += 9;
        memcpy(o, sh, (size_t)shn);
        o += shn;
    }
    if (_PyBytes_Resize(&out, o - o0) < 0) return NULL;
    return out;
}

/* ---- request_scan / request_out: a balancer's forwarding of a request routed by our Route -----
 *
 *   request_scan(data, max_size) -> (method, uri, to, routes, max_forwards, top_via, call_id,
 *                                    cseq, user_agent) | None
 *   request_out(data, max_size, popped, max_forwards, via, top_via, record_route) -> bytes | None
 *
 * What sipfarm/balancer/core.py's general path (parse_message, stamp_received, _on_request,
 * _to_client, _forward, to_bytes) reads of and does to a request routed by the balancer's own
 * Route entries (in a dialog, or a node's initial request to the client its flow token names),
 * for the common shape only; None for anything else (the general path then does the whole job).
 * Every decision (the To tag, the Route entries that are ours and their flow token, the next hop,
 * the Record-Route entries, the stamp, the branch, the front door) is the caller's: request_scan
 * returns the pieces it needs, and request_out writes the datagram the general path would send.
 * The shape:
 *   - data is at most max_size bytes, does not start with CR or LF; the request line is
 *     "METHOD SP URI SP SIP/2.0" with METHOD a token other than REGISTER and OPTIONS, URI
 *     starting "sip:" or "sips:" without SP;
 *   - the header section ends with CRLFCRLF, every line ends with CRLF, no folding, at most
 *     MAX_HEADER_LINES lines, each a token name of two characters or more (no compact form),
 *     a colon, SP, then the value (written back as `name ": " value`, the SP/HTAB around it
 *     dropped, as the parser and to_bytes do);
 *   - Via, From, To, Call-ID, CSeq and Max-Forwards present, From, To, Call-ID, CSeq,
 *     Content-Length and Max-Forwards once each; no Expires or Path (Record-Route lines are
 *     any other line, but the first one's place is remembered);
 *   - Call-ID without SP/HTAB; CSeq `digits SP METHOD` (at most 10 digits, below 2**31, the
 *     request line's method); Max-Forwards 1 to 10 digits, at most 2**32 - 1; Content-Length,
 *     if present, digits equal to the body's length;
 *   - the first Via line is one non-empty via-parm (no comma, no quote);
 *   - MAX_ROUTES Route elements at most (none: the caller's ACK of a non-2xx); every Route
 *     line is elements
 *     "<...>" (no "<", ">", ",", quote, SP, HTAB, control or non-ASCII byte inside) separated
 *     by a comma and optional SP/HTAB: what first_element/pop_value_at read one by one.
 * uri: the request line's Request-URI (as the parser splits it); routes: the Route elements in
 * order; max_forwards: its value (bytes); top_via: the first Via line's value; cseq: its
 * number; user_agent: the first User-Agent value or None.
 * request_out: the same scan (None if it fails), then data with the first `popped` Route
 * elements removed (a Route line left empty goes), Max-Forwards' value replaced, "Via: " via
 * inserted before the first Via line and that line's value replaced by top_via, and the bytes
 * record_route (whole header lines, CRLF-terminated; b"" for none) inserted where
 * SipMessage.prepend("record-route", ...) puts a header: before the first Record-Route line,
 * or before the first header line when there is none (so before our Via, which is prepended
 * after them).
 * Every read stays inside data's buffer; no Python code runs while pointers into it are held.
 */
#define MAX_ROUTES 16

enum { RK_OTHER, RK_VIA, RK_FROM, RK_TO, RK_CALLID, RK_CSEQ, RK_CLEN, RK_MAXFWD, RK_ROUTE, RK_UA, RK_RR, RK_BANNED };

static int request_kind(const char *p, Py_ssize_t n) {
    if (lower_eq(p, n, "via")) return RK_VIA;
    if (lower_eq(p, n, "from")) return RK_FROM;
    if (lower_eq(p, n, "to")) return RK_TO;
    if (lower_eq(p, n, "call-id")) return RK_CALLID;
    if (lower_eq(p, n, "cseq")) return RK_CSEQ;
    if (lower_eq(p, n, "content-length")) return RK_CLEN;
    if (lower_eq(p, n, "max-forwards")) return RK_MAXFWD;
    if (lower_eq(p, n, "route")) return RK_ROUTE;
    if (lower_eq(p, n, "user-agent")) return RK_UA;
    if (lower_eq(p, n, "record-route")) return RK_RR;
    if (lower_eq(p, n, "expires") || lower_eq(p, n, "path")) return RK_BANNED;
    return RK_OTHER;
}

static int is_route_char(unsigned char c) {
    return c > 0x20 && c < 0x7f && c != '<' && c != '>' && c != ',' && c != '"';
}

typedef struct {
    const char *p;
    Py_ssize_t n, start_len, method_len, uri_a, uri_z, body_start;
    int nlines, via1, to, callid, cseq, maxfwd, ua, rr1, nroutes;
    long long seq;
    line_span lines[MAX_HEADER_LINES];
    Py_ssize_t route_a[MAX_ROUTES], route_z[MAX_ROUTES];
    int route_line[MAX_ROUTES];
} req_scan;

/* 1: the common shape, filled in; 0: not */
static int scan_request(PyObject *data, Py_ssize_t max_size, req_scan *s) {
    const char *p = PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    s->p = p;
    s->n = n;
    if (n > max_size || n < 16) return 0;
    const char *head_end = memmem(p, (size_t)n, "\r\n\r\n", 4);
    if (head_end == NULL) return 0;
    Py_ssize_t hend = head_end - p;
    s->body_start = hend + 4;
    /* the request line */
    const char *eol = memchr(p, '\r', (size_t)hend + 2);
    if (eol == NULL || eol[1] != '\n' || has_control(p, eol - p)) return 0;
    Py_ssize_t llen = eol - p;
    const char *sp1 = memchr(p, ' ', (size_t)llen);
    if (sp1 == NULL || sp1 == p) return 0;
    for (const char *c = p; c < sp1; c++)
        if (!is_token_char((unsigned char)*c)) return 0;
    s->method_len = sp1 - p;
    if ((s->method_len == 8 && memcmp(p, "REGISTER", 8) == 0) || (s->method_len == 7 && memcmp(p, "OPTIONS", 7) == 0))
        return 0;
    const char *uri = sp1 + 1;
    const char *sp2 = memchr(uri, ' ', (size_t)(eol - uri));
    if (sp2 == NULL || eol - (sp2 + 1) != 7 || memcmp(sp2 + 1, "SIP/2.0", 7) != 0) return 0;
    if (!((sp2 - uri > 4 && memcmp(uri, "sip:", 4) == 0) || (sp2 - uri > 5 && memcmp(uri, "sips:", 5) == 0))) return 0;
    s->uri_a = uri - p;
    s->uri_z = sp2 - p;
    s->start_len = llen + 2;

    s->nlines = 0;
    s->via1 = s->to = s->callid = s->cseq = s->maxfwd = s->ua = s->rr1 = -1;
    s->nroutes = 0;
    int seen_from = 0, clen = -1;
    Py_ssize_t pos = s->start_len;
    while (pos < hend + 2) {
        const char *ls = p + pos;
        const char *cr = memchr(ls, '\r', (size_t)(hend - pos + 1));
        if (cr == NULL || cr[1] != '\n') return 0;
        Py_ssize_t len = cr - ls;
        if (len == 0 || has_control(ls, len)) return 0; /* the parser's to judge */
        if (s->nlines >= MAX_HEADER_LINES) return 0;
        const char *colon = memchr(ls, ':', (size_t)len);
        if (colon == NULL || colon - ls < 2) return 0; /* no name, or a compact one */
        for (const char *c = ls; c < colon; c++)
            if (!is_token_char((unsigned char)*c)) return 0;
        Py_ssize_t vs = (colon - p) + 1, ve = cr - p;
        if (vs >= ve || p[vs] != ' ') return 0;
        while (vs < ve && (p[vs] == ' ' || p[vs] == '\t')) vs++;
        while (ve > vs && (p[ve - 1] == ' ' || p[ve - 1] == '\t')) ve--;
        int i = s->nlines;
        line_span *span = &s->lines[i];
        span->name = pos;
        span->name_end = colon - p;
        span->value = vs;
        span->value_end = ve;
        const char *v = p + vs;
        Py_ssize_t vlen = ve - vs;
        switch (request_kind(ls, colon - ls)) {
        case RK_VIA:
            if (s->via1 < 0) {
                if (vlen < 1 || memchr(v, ',', (size_t)vlen) != NULL || memchr(v, '"', (size_t)vlen) != NULL) return 0;
                s->via1 = i;
            }
            break;
        case RK_FROM:
            if (seen_from++) return 0;
            break;
        case RK_TO:
            if (s->to >= 0) return 0;
            s->to = i;
            break;
        case RK_CALLID:
            if (s->callid >= 0 || vlen < 1 || memchr(v, ' ', (size_t)vlen) != NULL || memchr(v, '\t', (size_t)vlen) != NULL)
                return 0;
            s->callid = i;
            break;
        case RK_CSEQ:
            if (s->cseq >= 0) return 0;
            s->cseq = i;
            break;
        case RK_CLEN:
            if (clen >= 0) return 0;
            clen = i;
            break;
        case RK_MAXFWD:
            if (s->maxfwd >= 0) return 0;
            s->maxfwd = i;
            break;
        case RK_UA:
            if (s->ua < 0) s->ua = i;
            break;
        case RK_RR:
            if (s->rr1 < 0) s->rr1 = i;
            break;
        case RK_ROUTE: {
            /* elements "<...>" separated by "," and optional SP/HTAB */
            Py_ssize_t k = 0;
            for (;;) {
                if (k >= vlen || v[k] != '<') return 0;
                Py_ssize_t a = k++;
                while (k < vlen && is_route_char((unsigned char)v[k])) k++;
                if (k >= vlen || v[k] != '>') return 0;
                k++;
                if (s->nroutes >= MAX_ROUTES) return 0;
                s->route_a[s->nroutes] = vs + a;
                s->route_z[s->nroutes] = vs + k;
                s->route_line[s->nroutes] = i;
                s->nroutes++;
                if (k == vlen) break;
                if (v[k] != ',') return 0;
                k++;
                while (k < vlen && (v[k] == ' ' || v[k] == '\t')) k++;
            }
            break;
        }
        case RK_BANNED:
            return 0;
        default:
            break;
        }
        s->nlines++;
        pos = (cr - p) + 2;
    }
    if (s->via1 < 0 || !seen_from || s->to < 0 || s->callid < 0 || s->cseq < 0 || s->maxfwd < 0)
        return 0;
    if (clen >= 0) {
        Py_ssize_t a = s->lines[clen].value, z = s->lines[clen].value_end;
        if (z - a < 1 || z - a > 10) return 0;
        long long v = 0;
        for (Py_ssize_t i = a; i < z; i++) {
            if (p[i] < '0' || p[i] > '9') return 0;
            v = v * 10 + (p[i] - '0');
        }
        if (v > 2147483648LL || v != (long long)(n - s->body_start)) return 0;
    }
    {
        Py_ssize_t a = s->lines[s->maxfwd].value, z = s->lines[s->maxfwd].value_end;
        if (z - a < 1 || z - a > 10) return 0;
        long long v = 0;
        for (Py_ssize_t i = a; i < z; i++) {
            if (p[i] < '0' || p[i] > '9') return 0;
            v = v * 10 + (p[i] - '0');
        }
        if (v > 4294967295LL) return 0;
    }
    /* CSeq: digits SP the request line's method */
    Py_ssize_t ca = s->lines[s->cseq].value, cz = s->lines[s->cseq].value_end;
    const char *sp = memchr(p + ca, ' ', (size_t)(cz - ca));
    if (sp == NULL) return 0;
    Py_ssize_t ndig = (sp - p) - ca;
    if (ndig < 1 || ndig > 10) return 0;
    long long seq = 0;
    for (Py_ssize_t i = ca; i < ca + ndig; i++) {
        if (p[i] < '0' || p[i] > '9') return 0;
        seq = seq * 10 + (p[i] - '0');
    }
    if (seq >= 2147483648LL) return 0;
    s->seq = seq;
    if ((p + cz) - (sp + 1) != s->method_len || memcmp(sp + 1, p, (size_t)s->method_len) != 0) return 0;
    return 1;
}

static PyObject *span_bytes(const req_scan *s, int line) {
    return PyBytes_FromStringAndSize(s->p + s->lines[line].value, s->lines[line].value_end - s->lines[line].value);
}

static PyObject *request_scan(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "request_scan(data, max_size)");
        return NULL;
    }
    PyObject *data = args[0];
    Py_ssize_t max_size = PyLong_AsSsize_t(args[1]);
    if (max_size == -1 && PyErr_Occurred()) return NULL;
    if (!PyBytes_CheckExact(data)) Py_RETURN_NONE;
    req_scan *s = PyMem_Malloc(sizeof(req_scan));
    if (s == NULL) return PyErr_NoMemory();
    PyObject *out = NULL;
    if (!scan_request(data, max_size, s)) {
        PyMem_Free(s);
        Py_RETURN_NONE;
    }
    PyObject *routes = PyTuple_New(s->nroutes);
    if (routes == NULL) goto done;
    for (int k = 0; k < s->nroutes; k++) {
        PyObject *r = PyBytes_FromStringAndSize(s->p + s->route_a[k], s->route_z[k] - s->route_a[k]);
        if (r == NULL) {
            Py_DECREF(routes);
            goto done;
        }
        PyTuple_SET_ITEM(routes, k, r);
    }
    PyObject *agent;
    if (s->ua >= 0) {
        agent = span_bytes(s, s->ua);
        if (agent == NULL) {
            Py_DECREF(routes);
            goto done;
        }
    } else {
        agent = Py_NewRef(Py_None);
    }
    out = Py_BuildValue("(y#y#NNNNNLN)", s->p, s->method_len, s->p + s->uri_a, s->uri_z - s->uri_a,
                        span_bytes(s, s->to), routes, span_bytes(s, s->maxfwd), span_bytes(s, s->via1),
                        span_bytes(s, s->callid), s->seq, agent);
done:
    PyMem_Free(s);
    return out;
}

static PyObject *request_out(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "request_out(data, max_size, popped, max_forwards, via, top_via, record_route)");
        return NULL;
    }
    PyObject *data = args[0], *mf = args[3], *via = args[4], *top = args[5], *rr = args[6];
    Py_ssize_t max_size = PyLong_AsSsize_t(args[1]);
    if (max_size == -1 && PyErr_Occurred()) return NULL;
    Py_ssize_t popped = PyLong_AsSsize_t(args[2]);
    if (popped == -1 && PyErr_Occurred()) return NULL;
    if (!PyBytes_CheckExact(data) || !PyBytes_CheckExact(mf) || !PyBytes_CheckExact(via) || !PyBytes_CheckExact(top) ||
        !PyBytes_CheckExact(rr))
        Py_RETURN_NONE;
    req_scan *s = PyMem_Malloc(sizeof(req_scan));
    if (s == NULL) return PyErr_NoMemory();
    if (!scan_request(data, max_size, s) || popped < 0 || popped > s->nroutes) {
        PyMem_Free(s);
        Py_RETURN_NONE;
    }
    const char *p = s->p;
    Py_ssize_t mfn = PyBytes_GET_SIZE(mf), vn = PyBytes_GET_SIZE(via), tn = PyBytes_GET_SIZE(top);
    Py_ssize_t rrn = PyBytes_GET_SIZE(rr);
    int rr_at = s->rr1 >= 0 ? s->rr1 : 0; /* SipMessage.prepend: before the first, or on top */
    /* an upper bound: every line at most "name: value CRLF" from its own bytes (the value
     * never starts earlier than colon + 2), plus the replaced and added values and lines */
    Py_ssize_t cap = s->n + 7 + vn + mfn + tn + rrn;
    PyObject *out = PyBytes_FromStringAndSize(NULL, cap);
    if (out == NULL) {
        PyMem_Free(s);
        return NULL;
    }
    char *o = PyBytes_AS_STRING(out), *o0 = o;
    memcpy(o, p, (size_t)s->start_len);
    o += s->start_len;
    int r = 0; /* the next Route element */
    for (int i = 0; i < s->nlines; i++) {
        const line_span *span = &s->lines[i];
        const char *vp = p + span->value;
        Py_ssize_t vlen = span->value_end - span->value;
        if (i == rr_at) {
            memcpy(o, PyBytes_AS_STRING(rr), (size_t)rrn);
            o += rrn;
        }
        while (r < s->nroutes && s->route_line[r] == i && r < popped) r++;
        if (r > 0 && s->route_line[r - 1] == i && r <= popped) {
            /* this Route line lost elements: what follows the last one popped, or the line */
            if (r == s->nroutes || s->route_line[r] != i) continue;
            vp = p + s->route_a[r];
            vlen = span->value_end - s->route_a[r];
        }
        if (i == s->via1) {
            memcpy(o, "Via: ", 5);
            o += 5;
            memcpy(o, PyBytes_AS_STRING(via), (size_t)vn);
            o += vn;
            *o++ = '\r';
            *o++ = '\n';
            vp = PyBytes_AS_STRING(top);
            vlen = tn;
        } else if (i == s->maxfwd) {
            vp = PyBytes_AS_STRING(mf);
            vlen = mfn;
        }
        Py_ssize_t k = span->name_end - span->name;
        memcpy(o, p + span->name, (size_t)k);
        o += k;
        *o++ = ':';
        *o++ = ' ';
        memcpy(o, vp, (size_t)vlen);
        o += vlen;
        *o++ = '\r';
        *o++ = '\n';
    }
    *o++ = '\r';
    *o++ = '\n';
    memcpy(o, p + s->body_start, (size_t)(s->n - s->body_start));
    o += s->n - s->body_start;
    PyMem_Free(s);
    if (_PyBytes_Resize(&out, o - o0) < 0) return NULL;
    return out;
}

/* ---- request_check: parser.validate_request's common case ------------------------------------
 *
 *   request_check(headers, call_id) -> (uri, ...) | None
 *     headers: a parsed message's [(key, raw_name, value)]; call_id: its Call-ID value.  A
 *     tuple when validate_request would accept the message's Call-ID, From, To, Vias, Contacts
 *     and Max-Forwards on their shape alone, the URIs of From, To and each Contact then being
 *     parse_uri's to judge (the tuple holds them, in that order); None for anything else, and
 *     the Python checks (the reference) then judge the whole message, so a None is never an
 *     error.  The common shapes are headers.py's two strict regexes, read byte by byte:
 *     _NAME_ADDR_COMMON_RE (an optional display name of tokens or a quoted string without
 *     escapes, "<" a URI without LWS, quotes or angle brackets ">", then token parameters) and
 *     _VIA_COMMON_RE (SIP/2.0/ 2-4 letters SP, a host of letters, digits, '.' and '-', an
 *     optional port of at most 65535, token parameters; a first ";rport=" of 1-5 digits up to
 *     65535), within bounds below headers.py's (RC_MAX_VALUE bytes, RC_MAX_SEMIS ';' per value,
 *     RC_MAX_ELEMENTS Vias or Contacts).  Via lines are split on ',' as headers.split_comma
 *     splits a value without '"' or '<' (elements stripped, empty ones dropped); a Contact line
 *     holding '"' or ',' (or "*") is not the common case.  Max-Forwards (when present): at most
 *     10 ASCII digits, stripped, up to 255.  Call-ID: no byte 0x00-0x20 or 0x7f.  Only exact
 *     list/tuple/str/bytes objects are read; no Python code runs.
 */
#define RC_MAX_VALUE 1024
#define RC_MAX_SEMIS 32
#define RC_MAX_ELEMENTS 32
#define RC_MAX_URIS (2 + RC_MAX_ELEMENTS)

static int rc_key_is(PyObject *key, const char *name, Py_ssize_t n) {
    return PyUnicode_CheckExact(key) && PyUnicode_IS_COMPACT_ASCII(key) && PyUnicode_GET_LENGTH(key) == n &&
           memcmp(PyUnicode_DATA(key), name, (size_t)n) == 0;
}

static int rc_semis_ok(const unsigned char *p, Py_ssize_t n) {
    if (n > RC_MAX_VALUE) return 0;
    int semis = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (p[i] == ';' && ++semis >= RC_MAX_SEMIS) return 0;
    return 1;
}

/* [tokext] of the regexes' parameter values: token characters and "[", "]", ":" */
static int rc_is_value_char(unsigned char c) { return is_token_char(c) || c == '[' || c == ']' || c == ':'; }

/* (?:;token(?:=value)?)*\Z from i: 1 when the rest of the value is such parameters */
static int rc_params(const unsigned char *p, Py_ssize_t i, Py_ssize_t n) {
    while (i < n) {
        if (p[i] != ';') return 0;
        Py_ssize_t j = ++i;
        while (i < n && is_token_char(p[i])) i++;
        if (i == j) return 0;
        if (i < n && p[i] == '=') {
            j = ++i;
            while (i < n && rc_is_value_char(p[i])) i++;
            if (i == j) return 0;
        }
    }
    return 1;
}

/* _NAME_ADDR_COMMON_RE on p[0:n]: 1 and the URI's span, or 0 */
static int rc_name_addr(const unsigned char *p, Py_ssize_t n, Py_ssize_t *ua, Py_ssize_t *uz) {
    if (!rc_semis_ok(p, n)) return 0;
    Py_ssize_t i = 0;
    if (n > 0 && p[0] == '"') {
        i = 1;
        while (i < n && p[i] != '"') {
            unsigned char c = p[i];
            if (c == '\\' || c == '<' || c == '>' || c < 0x20 || c == 0x7f) return 0;
            i++;
        }
        if (i >= n) return 0;
        i++;
        if (i < n && p[i] == ' ') i++;
    } else {
        while (i < n && p[i] != '<') {
            Py_ssize_t j = i;
            while (i < n && is_token_char(p[i])) i++;
            if (i == j || i >= n || p[i] != ' ') return 0;
            i++;
        }
    }
    if (i >= n || p[i] != '<') return 0;
    Py_ssize_t a = ++i;
    while (i < n && p[i] != '>') {
        unsigned char c = p[i];
        if (c == '<' || c == '"' || c <= 0x20 || c == 0x7f) return 0;
        i++;
    }
    if (i >= n || i == a) return 0;
    *ua = a;
    *uz = i;
    return rc_params(p, i + 1, n);
}

static int rc_lower(unsigned char c) { return (c >= 'A' && c <= 'Z') ? c + 32 : c; }

/* _VIA_COMMON_RE on p[0:n], with check_via's port and rport checks */
static int rc_via(const unsigned char *p, Py_ssize_t n) {
    if (!rc_semis_ok(p, n) || n < 8 || memcmp(p, "SIP/2.0/", 8) != 0) return 0;
    Py_ssize_t i = 8, j = 8;
    while (i < n && ((p[i] >= 'A' && p[i] <= 'Z') || (p[i] >= 'a' && p[i] <= 'z'))) i++;
    if (i - j < 2 || i - j > 4 || i >= n || p[i] != ' ') return 0;
    j = ++i;
    while (i < n && ((p[i] >= 'A' && p[i] <= 'Z') || (p[i] >= 'a' && p[i] <= 'z') || (p[i] >= '0' && p[i] <= '9') ||
                     p[i] == '.' || p[i] == '-'))
        i++;
    if (i == j) return 0;
    if (i < n && p[i] == ':') {
        j = ++i;
        long port = 0;
        while (i < n && p[i] >= '0' && p[i] <= '9' && i - j < 5) port = port * 10 + (p[i++] - '0');
        if (i == j || port > 65535) return 0;
    }
    if (!rc_params(p, i, n)) return 0;
    /* the first ";rport=" (ASCII case-insensitive) names a port */
    for (Py_ssize_t k = 0; k + 7 <= n; k++) {
        if (p[k] != ';') continue;
        static const char rport[] = "rport=";
        Py_ssize_t m = 0;
        while (m < 6 && rc_lower(p[k + 1 + m]) == (unsigned char)rport[m]) m++;
        if (m < 6) continue;
        Py_ssize_t v = k + 7, w = v;
        long port = 0;
        while (w < n && p[w] != ';') {
            if (p[w] < '0' || p[w] > '9' || w - v >= 5) return 0;
            port = port * 10 + (p[w++] - '0');
        }
        return w > v && port <= 65535;
    }
    return 1;
}

static PyObject *request_check(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "request_check(headers, call_id)");
        return NULL;
    }
    PyObject *headers = args[0], *call_id = args[1];
    if (!PyList_CheckExact(headers) || !PyBytes_CheckExact(call_id)) Py_RETURN_NONE;
    const unsigned char *cid = (const unsigned char *)PyBytes_AS_STRING(call_id);
    for (Py_ssize_t i = 0; i < PyBytes_GET_SIZE(call_id); i++)
        if (cid[i] <= 0x20 || cid[i] == 0x7f) Py_RETURN_NONE;
    /* URI spans: [0] From, [1] To, then Contacts; their bytes objects (borrowed) */
    PyObject *src[RC_MAX_URIS];
    Py_ssize_t ua[RC_MAX_URIS], uz[RC_MAX_URIS];
    int have_from = 0, have_to = 0, have_mf = 0, contacts = 0, vias = 0;
    Py_ssize_t count = PyList_GET_SIZE(headers);
    for (Py_ssize_t h = 0; h < count; h++) {
        PyObject *item = PyList_GET_ITEM(headers, h);
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 3) Py_RETURN_NONE;
        PyObject *key = PyTuple_GET_ITEM(item, 0), *value = PyTuple_GET_ITEM(item, 2);
        if (!PyUnicode_CheckExact(key) || !PyBytes_CheckExact(value)) Py_RETURN_NONE;
        if (!PyUnicode_IS_COMPACT_ASCII(key)) continue;
        const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(value);
        Py_ssize_t n = PyBytes_GET_SIZE(value);
        Py_ssize_t klen = PyUnicode_GET_LENGTH(key);
        if (klen == 3 && rc_key_is(key, "via", 3)) {
            if (n > RC_MAX_ELEMENTS * RC_MAX_VALUE || memchr(p, '"', (size_t)n) || memchr(p, '<', (size_t)n))
                Py_RETURN_NONE;
            Py_ssize_t commas = 0;
            for (const unsigned char *c = p; (c = memchr(c, ',', (size_t)(p + n - c))) != NULL; c++)
                if (++commas >= RC_MAX_ELEMENTS) Py_RETURN_NONE; /* split_comma's bound counts empty ones */
            Py_ssize_t a = 0;
            while (a <= n) {
                const unsigned char *comma = memchr(p + a, ',', (size_t)(n - a));
                Py_ssize_t z = comma ? comma - p : n;
                const char *ea = (const char *)p + a, *ez = (const char *)p + z;
                if (span_strip(&ea, &ez) > 0) {
                    if (++vias > RC_MAX_ELEMENTS) Py_RETURN_NONE;
                    if (!rc_via((const unsigned char *)ea, ez - ea)) Py_RETURN_NONE;
                }
                a = z + 1;
            }
        } else if ((klen == 4 && rc_key_is(key, "from", 4)) || (klen == 2 && rc_key_is(key, "to", 2))) {
            int slot = klen == 2;
            int *have = slot ? &have_to : &have_from;
            if (*have) continue; /* msg.get: the first one */
            if (!rc_name_addr(p, n, &ua[slot], &uz[slot])) Py_RETURN_NONE;
            src[slot] = value;
            *have = 1;
        } else if (klen == 7 && rc_key_is(key, "contact", 7)) {
            if (memchr(p, '"', (size_t)n) || memchr(p, ',', (size_t)n)) Py_RETURN_NONE;
            const char *ea = (const char *)p, *ez = (const char *)p + n;
            if (span_strip(&ea, &ez) == 0) continue;
            if (ez - ea == 1 && *ea == '*') Py_RETURN_NONE;
            if (contacts >= RC_MAX_ELEMENTS) Py_RETURN_NONE;
            int slot = 2 + contacts;
            if (!rc_name_addr((const unsigned char *)ea, ez - ea, &ua[slot], &uz[slot])) Py_RETURN_NONE;
            ua[slot] += ea - (const char *)p;
            uz[slot] += ea - (const char *)p;
            src[slot] = value;
            contacts++;
        } else if (klen == 12 && rc_key_is(key, "max-forwards", 12)) {
            if (have_mf) continue;
            have_mf = 1;
            const char *ea = (const char *)p, *ez = (const char *)p + n;
            Py_ssize_t len = span_strip(&ea, &ez);
            if (len == 0 || len > 10) Py_RETURN_NONE;
            long long number = 0;
            for (const char *c = ea; c < ez; c++) {
                if (*c < '0' || *c > '9') Py_RETURN_NONE;
                number = number * 10 + (*c - '0');
            }
            if (number > 255) Py_RETURN_NONE;
        }
    }
    if (!have_from || !have_to || vias == 0) Py_RETURN_NONE;
    /* the URIs' bytes first, while src[] (borrowed) is surely alive: making bytes runs no Python
     * code, whereas a tuple's allocation may start a collection (and a finaliser) */
    PyObject *uris[RC_MAX_URIS];
    int made = 0;
    for (; made < 2 + contacts; made++) {
        uris[made] = PyBytes_FromStringAndSize(PyBytes_AS_STRING(src[made]) + ua[made], uz[made] - ua[made]);
        if (uris[made] == NULL) break;
    }
    PyObject *out = made == 2 + contacts ? PyTuple_New(made) : NULL;
    if (out == NULL) {
        for (int k = 0; k < made; k++) Py_DECREF(uris[k]);
        return NULL;
    }
    for (int k = 0; k < made; k++) PyTuple_SET_ITEM(out, k, uris[k]);
    return out;
}

static PyMethodDef methods[] = {
    {"split_headers", (PyCFunction)(void (*)(void))split_headers, METH_FASTCALL,
     "split_headers(data, key_cache, watched, single, max_headers) -> (start_line, headers, first_values, "
     "body_start, start) | None"},
    {"join", (PyCFunction)(void (*)(void))join, METH_FASTCALL, "join(start_line, headers, body) -> bytes | None"},
    {"digest_params", digest_params, METH_O, "digest_params(value) -> (scheme, params, quoted) | None"},
    {"stamp_via", (PyCFunction)(void (*)(void))stamp_via, METH_FASTCALL,
     "stamp_via(raw, source_host, source_port) -> bytes | None | False"},
    {"response_hop", (PyCFunction)(void (*)(void))response_hop, METH_FASTCALL,
     "response_hop(data, prefixes, hop_prefix, max_size) -> (out, branch, key, pending) | None"},
    {"request_scan", (PyCFunction)(void (*)(void))request_scan, METH_FASTCALL,
     "request_scan(data, max_size) -> (method, uri, to, routes, max_forwards, top_via, call_id, cseq, user_agent) | None"},
    {"request_out", (PyCFunction)(void (*)(void))request_out, METH_FASTCALL,
     "request_out(data, max_size, popped, max_forwards, via, top_via, record_route) -> bytes | None"},
    {"request_check", (PyCFunction)(void (*)(void))request_check, METH_FASTCALL,
     "request_check(headers, call_id) -> (from_uri, to_uri, contact_uri...) | None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastparse", "The common case of the SIP header split and serialisation (sipfarm/sip/parser.py).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__fastparse(void) { return PyModule_Create(&module); }
