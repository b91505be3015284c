/* One Redis command in RESP, in C: hiredis.pack_command's common case without its costs.
 *
 * Theory of operation
 * -------------------
 * RedisPipe.call packs every command it queues (a REGISTER's EVALSHA carries ~19 arguments).
 * hiredis.pack_command goes through redisFormatCommandArgv: an sds string per call, a malloc,
 * and one sprintf per argument for its "$<length>" line, ~4.5 us for a REGISTER's command.
 * This writes the same bytes straight into one bytes object: the arguments' lengths are summed
 * first, then each "$<length>\r\n<bytes>\r\n" is copied in.
 *
 *   pack(args) -> bytes | None
 *     args: a tuple whose items are exactly str (UTF-8, no surrogates), bytes, int or float;
 *     the bytes hiredis.pack_command(args) answers: "*<count>\r\n", then per argument
 *     "$<length>\r\n" the argument "\r\n", where an int is str(int) and a float repr(float).
 *     None for anything else (a subclass such as bool, a memoryview, a str that does not
 *     encode): sipfarm/store/resp.py then calls hiredis.pack_command, which packs it or raises
 *     as it always did.  A None is never an error, only "not mine".
 *
 * The interpreted build has no such module: resp.py uses hiredis.pack_command throughout.
 * tests/store/test_resppack.py checks the two give the same bytes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define SMALL 32 /* arguments whose text is kept on the stack; more: a heap array */

static Py_ssize_t decimal_digits(Py_ssize_t n) {
    Py_ssize_t digits = 1;
    while (n >= 10) {
        n /= 10;
        digits++;
    }
    return digits;
}

static char *put_count(char *p, char mark, Py_ssize_t n) {
    char tmp[24];
    int len = 0;
    *p++ = mark;
    do {
        tmp[len++] = (char)('0' + n % 10);
        n /= 10;
    } while (n > 0);
    while (len > 0) *p++ = tmp[--len];
    *p++ = '\r';
    *p++ = '\n';
    return p;
}

static PyObject *pack(PyObject *self, PyObject *args) {
    (void)self;
    if (!PyTuple_CheckExact(args)) Py_RETURN_NONE;
    Py_ssize_t count = PyTuple_GET_SIZE(args);
    const char *small_data[SMALL];
    Py_ssize_t small_len[SMALL];
    PyObject *small_owned[SMALL]; /* the str() / repr() made for an int or a float */
    const char **data = small_data;
    Py_ssize_t *lens = small_len;
    PyObject **owned = small_owned;
    PyObject *result = NULL;
    Py_ssize_t made = 0; /* owned[0:made] are set (NULL or a reference) */
    if (count > SMALL) {
        data = PyMem_Malloc(sizeof(char *) * (size_t)count);
        lens = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)count);
        owned = PyMem_Malloc(sizeof(PyObject *) * (size_t)count);
        if (data == NULL || lens == NULL || owned == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }
    Py_ssize_t total = 1 + decimal_digits(count) + 2;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PyTuple_GET_ITEM(args, i);
        PyObject *text = NULL;
        owned[i] = NULL;
        made = i + 1;
        if (PyBytes_CheckExact(item)) {
            data[i] = PyBytes_AS_STRING(item);
            lens[i] = PyBytes_GET_SIZE(item);
        } else if (PyUnicode_CheckExact(item)) {
            data[i] = PyUnicode_AsUTF8AndSize(item, &lens[i]);
            if (data[i] == NULL) { /* surrogates: hiredis's UnicodeEncodeError */
                PyErr_Clear();
                result = Py_None;
                Py_INCREF(result);
                goto done;
            }
        } else if (PyLong_CheckExact(item) || PyFloat_CheckExact(item)) {
            text = PyLong_CheckExact(item) ? PyObject_Str(item) : PyObject_Repr(item);
            if (text == NULL) goto done;
            owned[i] = text;
            data[i] = PyUnicode_AsUTF8AndSize(text, &lens[i]);
            if (data[i] == NULL) goto done;
        } else {
            result = Py_None;
            Py_INCREF(result);
            goto done;
        }
        total += 1 + decimal_digits(lens[i]) + 2 + lens[i] + 2;
    }
    result = PyBytes_FromStringAndSize(NULL, total);
    if (result == NULL) goto done;
    char *p = PyBytes_AS_STRING(result);
    p = put_count(p, '*', count);
    for (Py_ssize_t i = 0; i < count; i++) {
        p = put_count(p, '$', lens[i]);
        memcpy(p, data[i], (size_t)lens[i]);
        p += lens[i];
        *p++ = '\r';
        *p++ = '\n';
    }
done:
    for (Py_ssize_t i = 0; i < made; i++) Py_XDECREF(owned[i]);
    if (count > SMALL) {
        PyMem_Free(data);
        PyMem_Free(lens);
        PyMem_Free(owned);
    }
    return result;
}

static PyMethodDef methods[] = {
    {"pack", pack, METH_O, "pack(args) -> bytes | None: hiredis.pack_command(args)'s bytes, or None (not mine)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_resppack", "One Redis command in RESP (sipfarm/store/resp.py's common case).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__resppack(void) { return PyModule_Create(&module); }
