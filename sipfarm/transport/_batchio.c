/* Batched UDP system calls (Linux recvmmsg/sendmmsg) for sipfarm's UDP transport.
 *
 * Neither Python's socket module nor uvloop reads or writes more than one datagram per system
 * call.  Under load a SIP element receives and sends tens of thousands of small datagrams a
 * second: one recvmsg, one sendmsg and one event-loop wake-up each.  recv_batch() reads up to
 * max_datagrams ready datagrams with one recvmmsg; send_batch() sends a list with sendmmsg.
 *
 *   recv_batch(fd, max_datagrams, bufsize) -> list[tuple[bytes, tuple[str, int]]]
 *       The datagrams waiting on the non-blocking socket fd, oldest first, with their source
 *       address formatted as the socket module does (host string, port; IPv6 without
 *       flowinfo/scope id, a scope kept as "%N" in the host like getnameinfo).  [] when none is
 *       waiting (EAGAIN).  A datagram longer than bufsize is dropped (never returned cut) and
 *       counted (counters()[0]).  Any other error raises OSError (an ICMP error pending on the
 *       socket, say): nothing was read.
 *   send_batch(fd, datagrams) -> int
 *       datagrams: a list of (bytes, (host, port)), host a numeric IPv4 or IPv6 address (or
 *       (bytes, None) on a connected socket).
 *       Sends them in order and returns how many were consumed from the front: sent, or
 *       skipped because the kernel refused that one datagram (EPERM, ECONNREFUSED, EMSGSIZE,
 *       ENETUNREACH, ENOBUFS...: counted in counters()[1]) or because its address is not numeric
 *       (counted too).  Fewer than len(datagrams) only when the socket's send buffer is full
 *       (EAGAIN): the rest is the caller's to retry when writable, or to drop.
 *   counters() -> tuple[int, int]
 *       (datagrams dropped truncated, datagrams not sent because of an error) since the
 *       module was loaded: monotonic, process-wide; the caller counts differences.
 *
 * Memory is bounded: max_datagrams <= MAX_BATCH and bufsize <= MAX_BUFSIZE; one receive area
 * (grown to the largest max_datagrams * bufsize asked, then reused) and fixed arrays.  The GIL
 * is held throughout: the calls never block (MSG_DONTWAIT), and a release/re-acquire per batch
 * would cost more than the system call it brackets; holding it also makes the shared buffers
 * safe.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <net/if.h>
#include <netdb.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>

#define MAX_BATCH 256
#define MAX_BUFSIZE 65536
#define SEND_CHUNK 64
#define ADDR_CACHE 32 /* source address tuples remembered (direct-mapped) */

static char *recv_area = NULL;
static size_t recv_area_size = 0;
static struct mmsghdr recv_msgs[MAX_BATCH];
static struct iovec recv_iov[MAX_BATCH];
static struct sockaddr_storage recv_addrs[MAX_BATCH];

static unsigned long long truncated_total = 0;
static unsigned long long send_errors_total = 0;

/* The (host, port) tuple of a recently seen source, so that a peer sending many datagrams
 * costs one tuple, not one string and one tuple per datagram. */
typedef struct {
    struct sockaddr_storage addr;
    socklen_t len;
    PyObject *tuple; /* strong reference, or NULL */
} addr_entry;

static addr_entry addr_cache[ADDR_CACHE];

static unsigned int addr_hash(const struct sockaddr_storage *ss, socklen_t len) {
    const unsigned char *p = (const unsigned char *)ss;
    unsigned int h = 2166136261u;
    for (socklen_t i = 0; i < len; i++) h = (h ^ p[i]) * 16777619u;
    return h % ADDR_CACHE;
}

static PyObject *format_addr(const struct sockaddr_storage *ss, socklen_t len) {
    char host[INET6_ADDRSTRLEN + IF_NAMESIZE + 2];
    int port;
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)ss;
        if (inet_ntop(AF_INET, &sin->sin_addr, host, sizeof host) == NULL) return PyErr_SetFromErrno(PyExc_OSError);
        port = ntohs(sin->sin_port);
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)ss;
        if (sin6->sin6_scope_id != 0) {
            /* what the socket module does (getnameinfo NI_NUMERICHOST): "fe80::1%eth0" */
            int rc = getnameinfo((const struct sockaddr *)ss, len, host, sizeof host, NULL, 0, NI_NUMERICHOST);
            if (rc != 0) {
                PyErr_Format(PyExc_OSError, "getnameinfo: %s", gai_strerror(rc));
                return NULL;
            }
        } else if (inet_ntop(AF_INET6, &sin6->sin6_addr, host, sizeof host) == NULL) {
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        port = ntohs(sin6->sin6_port);
    } else {
        PyErr_Format(PyExc_OSError, "recv_batch: unexpected address family %d", (int)ss->ss_family);
        return NULL;
    }
    return Py_BuildValue("(si)", host, port);
}

static PyObject *source_tuple(const struct sockaddr_storage *ss, socklen_t len) {
    if (len > sizeof *ss) len = sizeof *ss;
    /* compare only what identifies the source: family, port, address (not flowinfo) */
    struct sockaddr_storage norm;
    memset(&norm, 0, sizeof norm);
    socklen_t nlen;
    if (ss->ss_family == AF_INET6) {
        struct sockaddr_in6 key;
        memcpy(&key, ss, sizeof key);
        key.sin6_flowinfo = 0;
        memcpy(&norm, &key, sizeof key);
        nlen = sizeof key;
    } else if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)ss;
        struct sockaddr_in *n = (struct sockaddr_in *)&norm;
        n->sin_family = AF_INET;
        n->sin_port = sin->sin_port;
        n->sin_addr = sin->sin_addr;
        nlen = sizeof(struct sockaddr_in);
    } else {
        return format_addr(ss, len);
    }
    addr_entry *e = &addr_cache[addr_hash(&norm, nlen)];
    if (e->tuple != NULL && e->len == nlen && memcmp(&e->addr, &norm, nlen) == 0) {
        Py_INCREF(e->tuple);
        return e->tuple;
    }
    PyObject *t = format_addr(ss, len);
    if (t == NULL) return NULL;
    Py_XSETREF(e->tuple, t);
    Py_INCREF(t);
    e->addr = norm;
    e->len = nlen;
    return t;
}

static PyObject *recv_batch(PyObject *self, PyObject *args) {
    int fd, max_datagrams, bufsize;
    if (!PyArg_ParseTuple(args, "iii:recv_batch", &fd, &max_datagrams, &bufsize)) return NULL;
    if (max_datagrams < 1 || max_datagrams > MAX_BATCH) {
        return PyErr_Format(PyExc_ValueError, "recv_batch: max_datagrams must be 1..%d", MAX_BATCH);
    }
    if (bufsize < 1 || bufsize > MAX_BUFSIZE) {
        return PyErr_Format(PyExc_ValueError, "recv_batch: bufsize must be 1..%d", MAX_BUFSIZE);
    }
    size_t need = (size_t)max_datagrams * (size_t)bufsize;
    if (need > recv_area_size) {
        char *area = PyMem_RawRealloc(recv_area, need);
        if (area == NULL) return PyErr_NoMemory();
        recv_area = area;
        recv_area_size = need;
    }
    for (int i = 0; i < max_datagrams; i++) {
        recv_iov[i].iov_base = recv_area + (size_t)i * (size_t)bufsize;
        recv_iov[i].iov_len = (size_t)bufsize;
        memset(&recv_msgs[i].msg_hdr, 0, sizeof recv_msgs[i].msg_hdr);
        recv_msgs[i].msg_hdr.msg_name = &recv_addrs[i];
        recv_msgs[i].msg_hdr.msg_namelen = sizeof recv_addrs[i];
        recv_msgs[i].msg_hdr.msg_iov = &recv_iov[i];
        recv_msgs[i].msg_hdr.msg_iovlen = 1;
        recv_msgs[i].msg_len = 0;
    }
    int n;
    do {
        n = recvmmsg(fd, recv_msgs, (unsigned int)max_datagrams, MSG_DONTWAIT, NULL);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) return PyList_New(0);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *out = PyList_New(0);
    if (out == NULL) return NULL;
    for (int i = 0; i < n; i++) {
        if (recv_msgs[i].msg_hdr.msg_flags & MSG_TRUNC) {
            truncated_total++;
            continue;
        }
        PyObject *source = source_tuple(&recv_addrs[i], recv_msgs[i].msg_hdr.msg_namelen);
        if (source == NULL) goto fail;
        PyObject *data = PyBytes_FromStringAndSize(recv_iov[i].iov_base, (Py_ssize_t)recv_msgs[i].msg_len);
        if (data == NULL) {
            Py_DECREF(source);
            goto fail;
        }
        PyObject *item = PyTuple_New(2);
        if (item == NULL) {
            Py_DECREF(source);
            Py_DECREF(data);
            goto fail;
        }
        PyTuple_SET_ITEM(item, 0, data);
        PyTuple_SET_ITEM(item, 1, source);
        int rc = PyList_Append(out, item);
        Py_DECREF(item);
        if (rc < 0) goto fail;
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

/* (host, port) -> sockaddr; 0 on success, -1 when the host is not a numeric address (no Python
 * error set), -2 on a Python error (wrong types). */
static int parse_dest(PyObject *dest, struct sockaddr_storage *ss, socklen_t *len) {
    if (!PyTuple_Check(dest) || PyTuple_GET_SIZE(dest) < 2) {
        PyErr_SetString(PyExc_TypeError, "send_batch: an address must be a (host, port) tuple");
        return -2;
    }
    PyObject *host_obj = PyTuple_GET_ITEM(dest, 0);
    PyObject *port_obj = PyTuple_GET_ITEM(dest, 1);
    if (!PyUnicode_Check(host_obj) || !PyLong_Check(port_obj)) {
        PyErr_SetString(PyExc_TypeError, "send_batch: an address must be a (str, int) tuple");
        return -2;
    }
    const char *host = PyUnicode_AsUTF8(host_obj);
    if (host == NULL) return -2;
    long port = PyLong_AsLong(port_obj);
    if (port == -1 && PyErr_Occurred()) return -2;
    if (port < 0 || port > 65535) return -1;
    memset(ss, 0, sizeof *ss);
    if (strchr(host, ':') == NULL) {
        struct sockaddr_in *sin = (struct sockaddr_in *)ss;
        if (inet_pton(AF_INET, host, &sin->sin_addr) != 1) return -1;
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)port);
        *len = sizeof *sin;
        return 0;
    }
    struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;
    const char *percent = strchr(host, '%');
    if (percent != NULL) {
        /* a scoped link-local address ("fe80::1%eth0"): let getaddrinfo (numeric only) read it */
        struct addrinfo hints, *res = NULL;
        memset(&hints, 0, sizeof hints);
        hints.ai_family = AF_INET6;
        hints.ai_socktype = SOCK_DGRAM;
        hints.ai_flags = AI_NUMERICHOST;
        if (getaddrinfo(host, NULL, &hints, &res) != 0 || res == NULL) return -1;
        memcpy(sin6, res->ai_addr, sizeof *sin6);
        freeaddrinfo(res);
    } else if (inet_pton(AF_INET6, host, &sin6->sin6_addr) != 1) {
        return -1;
    }
    sin6->sin6_family = AF_INET6;
    sin6->sin6_port = htons((uint16_t)port);
    *len = sizeof *sin6;
    return 0;
}

static PyObject *send_batch(PyObject *self, PyObject *args) {
    int fd;
    PyObject *datagrams;
    if (!PyArg_ParseTuple(args, "iO!:send_batch", &fd, &PyList_Type, &datagrams)) return NULL;
    struct mmsghdr msgs[SEND_CHUNK];
    struct iovec iov[SEND_CHUNK];
    struct sockaddr_storage addrs[SEND_CHUNK];
    Py_ssize_t total = PyList_GET_SIZE(datagrams);
    Py_ssize_t done = 0; /* consumed from the front: sent or skipped */
    while (done < total) {
        /* fill a chunk: the references stay valid (the list is not changed meanwhile: the GIL
         * is held and nothing here runs Python code) */
        int count = 0;
        PyObject *last_dest = NULL;
        while (count < SEND_CHUNK && done + count < total) {
            PyObject *item = PyList_GET_ITEM(datagrams, done + count);
            if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2 || !PyBytes_Check(PyTuple_GET_ITEM(item, 0))) {
                PyErr_SetString(PyExc_TypeError, "send_batch: expected a list of (bytes, (host, port))");
                return NULL;
            }
            PyObject *data = PyTuple_GET_ITEM(item, 0);
            PyObject *dest = PyTuple_GET_ITEM(item, 1);
            socklen_t len = 0;
            if (dest == Py_None) {
                /* a connected socket: no address */
            } else if (count > 0 && dest == last_dest) {
                /* the same address object as the previous datagram: parsed once */
                addrs[count] = addrs[count - 1];
                len = msgs[count - 1].msg_hdr.msg_namelen;
            } else {
                int rc = parse_dest(dest, &addrs[count], &len);
                if (rc == -2) return NULL;
                if (rc == -1) {
                    /* not a numeric address: this datagram cannot be sent; send what precedes it
                     * first (order), then skip it */
                    if (count == 0) {
                        send_errors_total++;
                        done++;
                        continue;
                    }
                    break;
                }
            }
            last_dest = dest;
            iov[count].iov_base = PyBytes_AS_STRING(data);
            iov[count].iov_len = (size_t)PyBytes_GET_SIZE(data);
            memset(&msgs[count].msg_hdr, 0, sizeof msgs[count].msg_hdr);
            msgs[count].msg_hdr.msg_name = dest == Py_None ? NULL : &addrs[count];
            msgs[count].msg_hdr.msg_namelen = len;
            msgs[count].msg_hdr.msg_iov = &iov[count];
            msgs[count].msg_hdr.msg_iovlen = 1;
            msgs[count].msg_len = 0;
            count++;
        }
        if (count == 0) continue; /* everything looked at was skipped */
        int sent = 0;
        while (sent < count) {
            int n = sendmmsg(fd, msgs + sent, (unsigned int)(count - sent), MSG_DONTWAIT);
            if (n > 0) {
                sent += n;
                continue;
            }
            if (n < 0 && errno == EINTR) continue;
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                /* the send buffer is full: the caller keeps the rest */
                return PyLong_FromSsize_t(done + sent);
            }
            /* n < 0 (or 0): the datagram at msgs[sent] was refused; skip it and go on */
            send_errors_total++;
            sent++;
        }
        done += count;
    }
    return PyLong_FromSsize_t(done);
}

static PyObject *counters(PyObject *self, PyObject *unused) {
    return Py_BuildValue("(KK)", truncated_total, send_errors_total);
}

static PyMethodDef methods[] = {
    {"recv_batch", recv_batch, METH_VARARGS, "recv_batch(fd, max_datagrams, bufsize): datagrams waiting on fd"},
    {"send_batch", send_batch, METH_VARARGS, "send_batch(fd, datagrams): how many were consumed"},
    {"counters", counters, METH_NOARGS, "counters(): (truncated datagrams dropped, send errors)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_batchio", "Batched UDP system calls (recvmmsg/sendmmsg).", -1, methods,
};

PyMODINIT_FUNC PyInit__batchio(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddIntConstant(m, "MAX_BATCH", MAX_BATCH) < 0 ||
        PyModule_AddIntConstant(m, "MAX_BUFSIZE", MAX_BUFSIZE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
