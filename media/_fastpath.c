/* The relay's latched+linked packet path in C: media/plane.py's optional fast path.
 *
 * Theory of operation
 * -------------------
 * A port that has latched gets a *link* (media/plane.py): a socket connected to its party, on
 * which only that party's datagrams arrive and through which the relay sends to it.  Most of a
 * busy relay's packets are RTP on such links, of the SSRC being counted, in sequence, going out
 * of the peer port's link: RelayPort.receive's first branch (media/port.py).  A LinkTable does
 * exactly that branch for the links it holds, without a Python object per packet: one
 * epoll_wait on the plane's epoll, then for every ready link recv into one reused buffer, the
 * checks, the counters and RFC 3550 statistics (A.1 update_seq in-order branch, A.8 jitter, the
 * same double arithmetic as media/port.py), and send on the peer's link.  Everything else goes
 * back to Python (the plane's `handback` list): sockets it does not hold (a port's own socket,
 * RTCP ports, links not loaded), and the first datagram of a link that is not the common case
 * (RTCP on an rtcp-mux port, another SSRC, a jump in sequence, a short or non-RTP datagram).
 *
 * Counter ownership.  A link is *registered* (its fd, its RelayPort) while the plane holds it,
 * and *current* while it is its port's `link` (the core drops `port.link` when the source
 * changes; the plane then retires it).  A registered link is *loaded* when this table has read
 * its port's counters and statistics (load) and owns them: while loaded, the RelayPort's
 * attributes packets, bytes, last_seen, drops_send_failed and stats.{max_seq, cycles,
 * received, jitter, _transit, _timed} are stale, and this table's copy is the truth.  unload
 * writes them back and gives ownership back to Python; flush writes them back and keeps it.  The
 * plane unloads a port before any Python code reads or changes it (a datagram handed back, a
 * stranger on its own socket, signalling on its call) and flushes before counters are read
 * (query, totals, the media timeout).  A loaded link forwards only to a peer link that is still
 * current and the one it was loaded with (a generation number per fd, bumped on retire and
 * remove): otherwise the datagram goes to Python, which knows the peer's state.  A peer that has
 * not latched (a one-way stream: its party never sent) has no link: its own socket is then a
 * *target*, registered with the address Python would sendto (the peer's SDP address), current
 * while the peer has no link and that address; its own datagrams still go to Python.
 *
 * Linux only (epoll); the GIL is held throughout (non-blocking sockets, one thread).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#define MAX_EVENTS 256   /* media/plane.py MAX_EVENTS */
#define MAX_BURST 256    /* media/plane.py MAX_BURST */
#define RECV_SIZE 65536  /* media/plane.py RECV_SIZE: a whole UDP datagram */
#define MAX_DROPOUT 3000 /* media/rtp.py, RFC 3550 A.1 */
#define RTCP_MIN_TYPE 192
#define RTCP_MAX_TYPE 223
#define TS_HALF 2147483648.0
#define TS_MOD 4294967296.0
#define MAX_FD (1 << 24)

typedef struct {
    PyObject *port;  /* the RelayPort (strong reference) while registered */
    PyObject *stats; /* port.stats (strong reference) while loaded */
    uint32_t gen;    /* bumped when the link stops being a valid destination */
    uint8_t registered, current, loaded, timed;
    int out_fd;       /* the peer port's link, as loaded */
    uint32_t out_gen; /* its generation then */
    int burst;
    long long polled;
    /* owned while loaded */
    long long packets, bytes, drops_send_failed, cycles, received;
    double last_seen, jitter, transit, clock_rate;
    uint32_t ssrc;
    int max_seq;
    /* a port's own socket as a destination (target): sendto this address */
    uint8_t has_dest;
    socklen_t dest_len;
    union {
        struct sockaddr sa;
        struct sockaddr_in v4;
        struct sockaddr_in6 v6;
    } dest;
} Slot;

typedef struct {
    PyObject_HEAD
    int epfd;
    long long polls;
    Slot *slots;
    int nslots;
    unsigned char *buf;
    struct epoll_event events[MAX_EVENTS];
} LinkTable;

static PyObject *s_packets, *s_bytes, *s_last_seen, *s_drops_send_failed, *s_stats, *s_ssrc, *s_max_seq,
    *s_cycles, *s_received, *s_jitter, *s_transit, *s_timed, *s_clock_rate;

static Slot *slot_of(LinkTable *self, int fd) {
    if (fd < 0 || fd >= self->nslots || !self->slots[fd].registered)
        return NULL;
    return &self->slots[fd];
}

static int get_ll(PyObject *obj, PyObject *name, long long *out) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    *out = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

static int get_double(PyObject *obj, PyObject *name, double *out) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    *out = PyFloat_AsDouble(v);
    Py_DECREF(v);
    return (*out == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

static int set_ll(PyObject *obj, PyObject *name, long long value) {
    PyObject *v = PyLong_FromLongLong(value);
    if (v == NULL)
        return -1;
    int rc = PyObject_SetAttr(obj, name, v);
    Py_DECREF(v);
    return rc;
}

static int set_double(PyObject *obj, PyObject *name, double value) {
    PyObject *v = PyFloat_FromDouble(value);
    if (v == NULL)
        return -1;
    int rc = PyObject_SetAttr(obj, name, v);
    Py_DECREF(v);
    return rc;
}

/* Write a loaded slot's counters and statistics back to its RelayPort (ownership unchanged). */
static int write_back(Slot *s) {
    PyObject *p = s->port, *st = s->stats;
    if (set_ll(p, s_packets, s->packets) < 0 || set_ll(p, s_bytes, s->bytes) < 0 ||
        set_double(p, s_last_seen, s->last_seen) < 0 || set_ll(p, s_drops_send_failed, s->drops_send_failed) < 0 ||
        set_ll(st, s_max_seq, s->max_seq) < 0 || set_ll(st, s_cycles, s->cycles) < 0 ||
        set_ll(st, s_received, s->received) < 0 || set_double(st, s_jitter, s->jitter) < 0 ||
        set_double(st, s_transit, s->transit) < 0 ||
        PyObject_SetAttr(st, s_timed, s->timed ? Py_True : Py_False) < 0)
        return -1;
    return 0;
}

static int unload_slot(Slot *s) {
    if (!s->loaded)
        return 0;
    int rc = write_back(s);
    s->loaded = 0;
    Py_CLEAR(s->stats);
    return rc;
}

/* Read the port's counters and statistics: 1 loaded, 0 not eligible (no SSRC yet), -1 error. */
static int load_slot(LinkTable *self, Slot *s, int out_fd) {
    Slot *out = slot_of(self, out_fd);
    if (out == NULL || !out->current || !s->current)
        return 0;
    if (s->loaded && unload_slot(s) < 0)
        return -1;
    PyObject *p = s->port;
    PyObject *st = PyObject_GetAttr(p, s_stats);
    if (st == NULL)
        return -1;
    PyObject *ssrc = PyObject_GetAttr(st, s_ssrc);
    if (ssrc == NULL)
        goto fail;
    if (ssrc == Py_None) { /* its first RTP packet has not been counted: Python does that */
        Py_DECREF(ssrc);
        Py_DECREF(st);
        return 0;
    }
    unsigned long long ssrc_value = PyLong_AsUnsignedLongLong(ssrc);
    Py_DECREF(ssrc);
    if (PyErr_Occurred())
        goto fail;
    long long max_seq, timed;
    if (get_ll(p, s_packets, &s->packets) < 0 || get_ll(p, s_bytes, &s->bytes) < 0 ||
        get_double(p, s_last_seen, &s->last_seen) < 0 || get_ll(p, s_drops_send_failed, &s->drops_send_failed) < 0 ||
        get_ll(st, s_max_seq, &max_seq) < 0 || get_ll(st, s_cycles, &s->cycles) < 0 ||
        get_ll(st, s_received, &s->received) < 0 || get_double(st, s_jitter, &s->jitter) < 0 ||
        get_double(st, s_transit, &s->transit) < 0 || get_double(st, s_clock_rate, &s->clock_rate) < 0 ||
        get_ll(st, s_timed, &timed) < 0)
        goto fail;
    s->ssrc = (uint32_t)ssrc_value;
    s->max_seq = (int)max_seq;
    s->timed = timed != 0;
    s->out_fd = out_fd;
    s->out_gen = out->gen;
    s->stats = st; /* the reference taken above */
    s->loaded = 1;
    return 1;
fail:
    Py_DECREF(st);
    return -1;
}

/* The peer link the slot was loaded with is still registered, current and the same socket. */
static inline Slot *out_of(LinkTable *self, Slot *s) {
    Slot *out = slot_of(self, s->out_fd);
    return (out != NULL && out->current && out->gen == s->out_gen) ? out : NULL;
}

/* RelayPort.receive's common case for one datagram of a loaded link: 1 done (forwarded or its
 * send failed, counted), 0 not the common case (nothing changed: Python takes it). */
static inline int forward(Slot *s, Slot *out, int out_fd, const unsigned char *d, Py_ssize_t n, double now) {
    if (n < 12 || (d[0] & 0xC0) != 0x80 || (d[1] >= RTCP_MIN_TYPE && d[1] <= RTCP_MAX_TYPE))
        return 0;
    int seq = (d[2] << 8) | d[3];
    uint32_t ts = ((uint32_t)d[4] << 24) | ((uint32_t)d[5] << 16) | ((uint32_t)d[6] << 8) | d[7];
    uint32_t ssrc = ((uint32_t)d[8] << 24) | ((uint32_t)d[9] << 16) | ((uint32_t)d[10] << 8) | d[11];
    if (ssrc != s->ssrc || ((seq - s->max_seq) & 0xFFFF) >= MAX_DROPOUT)
        return 0;
    s->last_seen = now;
    if (seq < s->max_seq)
        s->cycles += 65536; /* wrapped */
    s->max_seq = seq;
    s->received += 1;
    double transit = now * s->clock_rate - (double)ts;
    if (s->timed) {
        double dd = transit - s->transit;
        if (dd < 0.0)
            dd = -dd;
        if (dd > TS_HALF) /* the RTP timestamp wrapped between the two packets */
            dd = fabs(dd - TS_MOD);
        s->jitter += (dd - s->jitter) * 0.0625;
    }
    s->transit = transit;
    s->timed = 1;
    ssize_t sent;
    do {
        if (out->has_dest) /* the peer has not latched: its own socket, to its SDP address */
            sent = sendto(out_fd, d, (size_t)n, MSG_NOSIGNAL, &out->dest.sa, out->dest_len);
        else
            sent = send(out_fd, d, (size_t)n, MSG_NOSIGNAL);
    } while (sent < 0 && errno == EINTR);
    if (sent < 0) { /* a full send buffer, an ICMP error on the link: counted, as in Python */
        s->drops_send_failed += 1;
        return 1;
    }
    s->packets += 1;
    s->bytes += n;
    return 1;
}

static int append_fd(PyObject *handback, int fd) {
    PyObject *v = PyLong_FromLong(fd);
    if (v == NULL)
        return -1;
    int rc = PyList_Append(handback, v);
    Py_DECREF(v);
    return rc;
}

/* -- methods ----------------------------------------------------------------------------- */

static PyObject *LinkTable_drain(LinkTable *self, PyObject *args) {
    double now;
    PyObject *handback;
    if (!PyArg_ParseTuple(args, "dO!:drain", &now, &PyList_Type, &handback))
        return NULL;
    if (self->epfd < 0)
        return PyLong_FromLong(0);
    int n;
    do {
        n = epoll_wait(self->epfd, self->events, MAX_EVENTS, 0);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    long long poll = ++self->polls;
    for (int i = 0; i < n; i++) {
        int fd = self->events[i].data.fd;
        Slot *s = slot_of(self, fd);
        Slot *out = (s != NULL && s->loaded) ? out_of(self, s) : NULL;
        if (out == NULL) {
            if (s != NULL && unload_slot(s) < 0)
                return NULL;
            if (append_fd(handback, fd) < 0)
                return NULL;
            continue;
        }
        int burst = s->burst;
        if (s->polled == poll - 1 && burst < MAX_BURST)
            burst *= 2;
        s->polled = poll;
        int read = 0, out_fd = s->out_fd;
        while (read < burst) {
            ssize_t r;
            do {
                r = recv(fd, self->buf, RECV_SIZE, 0);
            } while (r < 0 && errno == EINTR);
            if (r < 0) /* empty (EAGAIN), or an ICMP error reported on the link */
                break;
            read++;
            if (!forward(s, out, out_fd, self->buf, r, now)) {
                PyObject *data = PyBytes_FromStringAndSize((const char *)self->buf, r);
                if (data == NULL)
                    return NULL;
                PyObject *item = Py_BuildValue("(iN)", fd, data);
                if (item == NULL || unload_slot(s) < 0 || PyList_Append(handback, item) < 0) {
                    Py_XDECREF(item);
                    return NULL;
                }
                Py_DECREF(item);
                break;
            }
        }
        s->burst = read == burst ? burst : (burst >> 1 > 1 ? burst >> 1 : 1);
    }
    return PyLong_FromLong(n);
}

static PyObject *LinkTable_feed(LinkTable *self, PyObject *args) {
    int fd;
    Py_buffer data;
    double now;
    if (!PyArg_ParseTuple(args, "iy*d:feed", &fd, &data, &now))
        return NULL;
    Slot *s = slot_of(self, fd);
    Slot *out = (s != NULL && s->loaded) ? out_of(self, s) : NULL;
    int done = out != NULL && forward(s, out, s->out_fd, data.buf, data.len, now);
    PyBuffer_Release(&data);
    if (!done && s != NULL && unload_slot(s) < 0)
        return NULL;
    return PyBool_FromLong(done);
}

static Slot *new_slot(LinkTable *self, int fd, PyObject *port) {
    if (fd < 0 || fd >= MAX_FD) {
        PyErr_Format(PyExc_ValueError, "fd %d out of range", fd);
        return NULL;
    }
    if (fd >= self->nslots) {
        int size = self->nslots ? self->nslots : 1024;
        while (size <= fd)
            size *= 2;
        Slot *grown = PyMem_Realloc(self->slots, (size_t)size * sizeof(Slot));
        if (grown == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        memset(grown + self->nslots, 0, (size_t)(size - self->nslots) * sizeof(Slot));
        self->slots = grown;
        self->nslots = size;
    }
    Slot *s = &self->slots[fd];
    if (s->registered) {
        PyErr_Format(PyExc_ValueError, "fd %d is registered", fd);
        return NULL;
    }
    Py_INCREF(port);
    s->port = port;
    s->registered = 1;
    s->current = 1;
    s->loaded = 0;
    s->has_dest = 0;
    s->gen += 1;
    s->burst = 1;
    s->polled = -1;
    return s;
}

static PyObject *LinkTable_register(LinkTable *self, PyObject *args) {
    int fd;
    PyObject *port;
    if (!PyArg_ParseTuple(args, "iO:register", &fd, &port))
        return NULL;
    if (new_slot(self, fd, port) == NULL)
        return NULL;
    Py_RETURN_NONE;
}

/* The address tuple of a Python sendto: (host, port) or (host, port, flowinfo, scope_id), an IP
 * literal.  0 when it is not one (a name: Python resolves it, the fast path does not). */
static int parse_addr(PyObject *addr, struct sockaddr_in6 *out, socklen_t *len) {
    const char *host;
    int port;
    unsigned int flowinfo = 0, scope_id = 0;
    if (!PyTuple_Check(addr) || !PyArg_ParseTuple(addr, "si|II", &host, &port, &flowinfo, &scope_id)) {
        PyErr_Clear();
        return 0;
    }
    if (port < 0 || port > 65535)
        return 0;
    memset(out, 0, sizeof(*out));
    struct sockaddr_in *v4 = (struct sockaddr_in *)out;
    if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons((uint16_t)port);
        *len = sizeof(*v4);
        return 1;
    }
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)out;
    if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons((uint16_t)port);
        v6->sin6_flowinfo = htonl(flowinfo);
        v6->sin6_scope_id = scope_id;
        *len = sizeof(*v6);
        return 1;
    }
    return 0;
}

static PyObject *LinkTable_target(LinkTable *self, PyObject *args) {
    int fd;
    PyObject *port, *addr;
    if (!PyArg_ParseTuple(args, "iOO:target", &fd, &port, &addr))
        return NULL;
    struct sockaddr_in6 dest; /* large enough for either family */
    socklen_t len = 0;
    if (!parse_addr(addr, &dest, &len))
        Py_RETURN_FALSE;
    Slot *s = slot_of(self, fd);
    if (s == NULL) {
        s = new_slot(self, fd, port);
        if (s == NULL)
            return NULL;
    } else if (s->port != port) {
        PyErr_Format(PyExc_ValueError, "fd %d is registered for another port", fd);
        return NULL;
    } else if (!s->has_dest || s->dest_len != len || memcmp(&s->dest, &dest, len) != 0) {
        s->gen += 1; /* another address: whoever sent to the old one asks again */
    }
    s->has_dest = 1;
    memcpy(&s->dest, &dest, len);
    s->dest_len = len;
    s->current = 1;
    Py_RETURN_TRUE;
}

static Slot *slot_arg(LinkTable *self, PyObject *args, const char *format) {
    int fd;
    if (!PyArg_ParseTuple(args, format, &fd))
        return NULL;
    Slot *s = slot_of(self, fd);
    if (s == NULL)
        PyErr_Format(PyExc_KeyError, "fd %d is not registered", fd);
    return s;
}

static PyObject *LinkTable_remove(LinkTable *self, PyObject *args) {
    Slot *s = slot_arg(self, args, "i:remove");
    if (s == NULL)
        return NULL;
    int rc = unload_slot(s);
    s->registered = s->current = 0;
    s->gen += 1;
    Py_CLEAR(s->port);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *LinkTable_retire(LinkTable *self, PyObject *args) {
    Slot *s = slot_arg(self, args, "i:retire");
    if (s == NULL)
        return NULL;
    if (unload_slot(s) < 0)
        return NULL;
    if (s->current) {
        s->current = 0;
        s->gen += 1;
    }
    Py_RETURN_NONE;
}

static PyObject *LinkTable_set_current(LinkTable *self, PyObject *args) {
    Slot *s = slot_arg(self, args, "i:set_current");
    if (s == NULL)
        return NULL;
    s->current = 1;
    Py_RETURN_NONE;
}

static PyObject *LinkTable_unload(LinkTable *self, PyObject *args) {
    Slot *s = slot_arg(self, args, "i:unload");
    if (s == NULL)
        return NULL;
    if (unload_slot(s) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *LinkTable_flush(LinkTable *self, PyObject *args) {
    Slot *s = slot_arg(self, args, "i:flush");
    if (s == NULL)
        return NULL;
    if (s->loaded && write_back(s) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *LinkTable_flush_all(LinkTable *self, PyObject *Py_UNUSED(ignored)) {
    for (int fd = 0; fd < self->nslots; fd++) {
        Slot *s = &self->slots[fd];
        if (s->registered && s->loaded && write_back(s) < 0)
            return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *LinkTable_load(LinkTable *self, PyObject *args) {
    int fd, out_fd;
    if (!PyArg_ParseTuple(args, "ii:load", &fd, &out_fd))
        return NULL;
    Slot *s = slot_of(self, fd);
    if (s == NULL) {
        PyErr_Format(PyExc_KeyError, "fd %d is not registered", fd);
        return NULL;
    }
    int rc = load_slot(self, s, out_fd);
    if (rc < 0)
        return NULL;
    return PyBool_FromLong(rc);
}

static PyObject *LinkTable_loaded(LinkTable *self, PyObject *args) {
    int fd;
    if (!PyArg_ParseTuple(args, "i:loaded", &fd))
        return NULL;
    Slot *s = slot_of(self, fd);
    return PyBool_FromLong(s != NULL && s->loaded);
}

static PyObject *LinkTable_close(LinkTable *self, PyObject *Py_UNUSED(ignored)) {
    int rc = 0;
    for (int fd = 0; fd < self->nslots; fd++) {
        Slot *s = &self->slots[fd];
        if (s->registered) {
            if (unload_slot(s) < 0)
                rc = -1;
            s->registered = s->current = 0;
            s->gen += 1;
            Py_CLEAR(s->port);
        }
    }
    self->epfd = -1;
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

static int LinkTable_init(LinkTable *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"epoll_fd", NULL};
    int epfd;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i:LinkTable", kwlist, &epfd))
        return -1;
    self->epfd = epfd;
    if (self->buf == NULL) {
        self->buf = PyMem_Malloc(RECV_SIZE);
        if (self->buf == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    return 0;
}

static void LinkTable_dealloc(LinkTable *self) {
    for (int fd = 0; fd < self->nslots; fd++) {
        Py_CLEAR(self->slots[fd].port);
        Py_CLEAR(self->slots[fd].stats);
    }
    PyMem_Free(self->slots);
    PyMem_Free(self->buf);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef LinkTable_methods[] = {
    {"drain", (PyCFunction)LinkTable_drain, METH_VARARGS,
     "drain(now, handback) -> int: one epoll_wait (up to 256 events); forward the loaded links' "
     "common case, append the rest to handback (an fd, or (fd, datagram)); returns the event count"},
    {"feed", (PyCFunction)LinkTable_feed, METH_VARARGS,
     "feed(fd, data, now) -> bool: drain's per-datagram step without recv (tests); False: unloaded, Python's"},
    {"register", (PyCFunction)LinkTable_register, METH_VARARGS, "register(fd, port): a new link, current"},
    {"target", (PyCFunction)LinkTable_target, METH_VARARGS,
     "target(fd, port, addr) -> bool: a port's own socket as a destination (sendto addr), current; "
     "False if addr is not an IP literal"},
    {"remove", (PyCFunction)LinkTable_remove, METH_VARARGS, "remove(fd): unload and forget the link"},
    {"retire", (PyCFunction)LinkTable_retire, METH_VARARGS, "retire(fd): unload; no longer its port's link"},
    {"set_current", (PyCFunction)LinkTable_set_current, METH_VARARGS, "set_current(fd): its port's link again"},
    {"load", (PyCFunction)LinkTable_load, METH_VARARGS,
     "load(fd, out_fd) -> bool: take ownership of the port's counters, forwarding to out_fd"},
    {"unload", (PyCFunction)LinkTable_unload, METH_VARARGS, "unload(fd): write back, ownership to Python"},
    {"flush", (PyCFunction)LinkTable_flush, METH_VARARGS, "flush(fd): write back, keep ownership"},
    {"flush_all", (PyCFunction)LinkTable_flush_all, METH_NOARGS, "flush every loaded link"},
    {"loaded", (PyCFunction)LinkTable_loaded, METH_VARARGS, "loaded(fd) -> bool"},
    {"close", (PyCFunction)LinkTable_close, METH_NOARGS, "unload and forget every link; drain reads nothing"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject LinkTableType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "media._fastpath.LinkTable",
    .tp_basicsize = sizeof(LinkTable),
    .tp_dealloc = (destructor)LinkTable_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The latched+linked packet path of a media plane (see the module's comment).",
    .tp_methods = LinkTable_methods,
    .tp_init = (initproc)LinkTable_init,
    .tp_new = PyType_GenericNew,
};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT, "media._fastpath", "The relay's latched+linked packet path (media/plane.py).", -1, NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastpath(void) {
#define INTERN(var, text)                                \
    if ((var = PyUnicode_InternFromString(text)) == NULL) \
        return NULL;
    INTERN(s_packets, "packets")
    INTERN(s_bytes, "bytes")
    INTERN(s_last_seen, "last_seen")
    INTERN(s_drops_send_failed, "drops_send_failed")
    INTERN(s_stats, "stats")
    INTERN(s_ssrc, "ssrc")
    INTERN(s_max_seq, "max_seq")
    INTERN(s_cycles, "cycles")
    INTERN(s_received, "received")
    INTERN(s_jitter, "jitter")
    INTERN(s_transit, "_transit")
    INTERN(s_timed, "_timed")
    INTERN(s_clock_rate, "clock_rate")
#undef INTERN
    if (PyType_Ready(&LinkTableType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&fastpath_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&LinkTableType);
    if (PyModule_AddObject(m, "LinkTable", (PyObject *)&LinkTableType) < 0) {
        Py_DECREF(&LinkTableType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
