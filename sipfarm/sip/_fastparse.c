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

/* The start line's (method, uri, status, reason) when it is the common case (parser
 * _parse_start_line would accept it as it is): "SIP/2.0 DDD[ reason]" with DDD in 100..699, or
 * "token SP uri SP SIP/2.0" with a non-empty uri without SP.  Py_None otherwise (a new reference
 * either way; NULL on error). */
static PyObject *start_line_parts(const char *p, Py_ssize_t n) {
    static const char version[] = "SIP/2.0";
    if (n >= 11 && memcmp(p, "SIP/2.0 ", 8) == 0) {
        const unsigned char *d = (const unsigned char *)p + 8;
        if (d[0] < '1' || d[0] > '6' || d[1] < '0' || d[1] > '9' || d[2] < '0' || d[2] > '9') Py_RETURN_NONE;
        if (n > 11 && p[11] != ' ') Py_RETURN_NONE;
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
        if (memchr(p, '\n', (size_t)(line_end - p)) != NULL) goto not_mine; /* bare LF */
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

static PyMethodDef methods[] = {
    {"split_headers", (PyCFunction)(void (*)(void))split_headers, METH_FASTCALL,
     "split_headers(data, key_cache, watched, single, max_headers) -> (start_line, headers, first_values, "
     "body_start, start) | None"},
    {"join", (PyCFunction)(void (*)(void))join, METH_FASTCALL, "join(start_line, headers, body) -> bytes | None"},
    {"digest_params", digest_params, METH_O, "digest_params(value) -> (scheme, params, quoted) | None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastparse", "The common case of the SIP header split and serialisation (sipfarm/sip/parser.py).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__fastparse(void) { return PyModule_Create(&module); }
