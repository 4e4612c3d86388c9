/* The server's hot loop for the usual request, in C: read, parse, build the fast
 * path's environ, call the app's ``handle``, frame the answer, send it (or hold it to
 * leave with others: the outbox, below). ``tafe.connection``
 * runs it per connection and keeps everything else in Python: waiting (gevent),
 * timeouts, draining decisions, refusals, the WSGI path, logs.
 *
 * Rules. A request is served here only when it is *simple*, a strict subset of what
 * ``tafe.http.RequestReader`` accepts, read the same way:
 * - request line ``METHOD SP target SP HTTP/1.1|HTTP/1.0 CRLF``; METHOD one of GET,
 *   HEAD, POST, PUT, DELETE, OPTIONS, PATCH; the target in origin form (``/``...) of
 *   RFC 3986 characters, without ``#``, nor ``%`` in its path (no percent-decoding);
 * - header lines ``token ":" OWS value CRLF``; a value of visible ASCII, SP and HTAB
 *   (its trailing whitespace dropped, as tafe.http does); at most 64 headers; the
 *   head, counted as tafe.http counts it, within its limit;
 * - exactly one Host (HTTP/1.1), at most one (HTTP/1.0);
 * - at most one Content-Length, of digits, within the body limit; no Transfer-Encoding,
 *   Expect or Upgrade; Connection, at most once, is ``close`` or ``keep-alive``.
 * Anything else (a bad request too) is not decided here: ``step`` answers GENERAL and
 * the connection goes on in Python, where llhttp and tafe.http decide (400, 413...).
 * A request still arriving is checked as far as it goes, so garbage is handed over at
 * once instead of waiting for its end.
 *
 * Costs: no Python between the socket and ``handle`` (tafe.http's reader costs ~5 us a
 * request, its environ and head ~3.5 us, gevent's socket methods a few more).
 * One buffer per connection while it reads and answers, grown as a request needs (up
 * to the head and body limits) and freed whenever the connection waits with nothing
 * buffered: thousands of idle keep-alive connections hold none.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

/* step() results; tafe/_fastpath.pyi and tafe.connection use the same numbers. */
enum { DONE = 0, CLOSE = 1, WAIT = 2, GONE = 3, GENERAL = 4, WSGI = 5, UNSENT = 6 };

#define MAX_HEADERS 64
#define FIRST_CAPACITY 8192

typedef struct {
    const char *name, *value;
    Py_ssize_t name_len, value_len;
} header_t;

typedef struct {
    Py_ssize_t head_len, end, path_len, target_len, body_len;
    const char *target;
    int method;  /* index in METHODS */
    int http11, keep_alive, nheaders;
    header_t headers[MAX_HEADERS];
} simple_t;

static const char *const METHODS[] = {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"};
#define N_METHODS 7
static PyObject *method_str[N_METHODS];

/* Interned names. */
static PyObject *s_REQUEST_METHOD, *s_PATH_INFO, *s_body, *s_arrival, *s_says_close, *s_comma, *empty_bytes;
static PyObject *status_cache; /* status str -> (code int, status line bytes) */

enum { NEED = 0, NOT_SIMPLE = -1, COMPLETE = 1 };

static int
is_tchar(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || (c && strchr("!#$&'*+-.^_`|~%", c));
}

static int
is_target_char(unsigned char c)
{
    /* RFC 3986 unreserved, sub-delims, ":", "@", "/", "?"; "%" only in the query (see parse). */
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || (c && strchr("-._~!$&'()*+,;=:@/?", c));
}

static int
lower_eq(const char *s, Py_ssize_t n, const char *lower)
{
    Py_ssize_t i;
    for (i = 0; i < n; i++) {
        char c = s[i];
        if (c >= 'A' && c <= 'Z')
            c += 32;
        if (c != lower[i] || !lower[i])
            return 0;
    }
    return lower[n] == 0;
}

/* NEED, NOT_SIMPLE or COMPLETE (with r filled). */
static int
parse(const char *b, Py_ssize_t n, Py_ssize_t max_head, Py_ssize_t max_body, simple_t *r)
{
    Py_ssize_t i = 0, start, clen = -1;
    int m, kind, hosts = 0, connection = 0, close = 0, keep = 0;

    while (i < n && b[i] >= 'A' && b[i] <= 'Z' && i < 8)
        i++;
    if (i == n) { /* a method still arriving: wait only if it can become one of ours */
        for (m = 0; m < N_METHODS; m++)
            if ((Py_ssize_t)strlen(METHODS[m]) >= i && memcmp(b, METHODS[m], i) == 0)
                return NEED;
        return NOT_SIMPLE;
    }
    if (b[i] != ' ')
        return NOT_SIMPLE;
    for (m = 0; m < N_METHODS; m++)
        if ((Py_ssize_t)strlen(METHODS[m]) == i && memcmp(b, METHODS[m], i) == 0)
            break;
    if (m == N_METHODS)
        return NOT_SIMPLE;
    r->method = m;
    start = ++i;
    if (i == n)
        return NEED;
    if (b[i] != '/')
        return NOT_SIMPLE;
    r->path_len = -1;
    while (i < n && (is_target_char((unsigned char)b[i]) || (b[i] == '%' && r->path_len >= 0))) {
        if (b[i] == '?' && r->path_len < 0)
            r->path_len = i - start;
        i++;
    }
    if (i - start > max_head)
        return NOT_SIMPLE;
    if (i == n)
        return NEED;
    if (b[i] != ' ')
        return NOT_SIMPLE;
    r->target = b + start;
    r->target_len = i - start;
    if (r->path_len < 0)
        r->path_len = r->target_len;
    i++;
    {
        Py_ssize_t left = n - i < 10 ? n - i : 10;
        if (memcmp(b + i, "HTTP/1.1\r\n", left) == 0)
            r->http11 = 1;
        else if (memcmp(b + i, "HTTP/1.0\r\n", left) == 0)
            r->http11 = 0;
        else
            return NOT_SIMPLE;
        if (left < 10)
            return NEED;
        i += 10;
    }
    r->nheaders = 0;
    for (;;) {
        header_t *h;
        Py_ssize_t v_end;
        if (i > max_head)
            return NOT_SIMPLE;
        if (i == n)
            return NEED;
        if (b[i] == '\r') {
            if (i + 1 == n)
                return NEED;
            if (b[i + 1] != '\n')
                return NOT_SIMPLE;
            i += 2;
            break;
        }
        if (r->nheaders == MAX_HEADERS)
            return NOT_SIMPLE;
        h = &r->headers[r->nheaders];
        h->name = b + i;
        start = i;
        while (i < n && is_tchar((unsigned char)b[i]))
            i++;
        if (i == n)
            return i > max_head ? NOT_SIMPLE : NEED;
        if (b[i] != ':' || i == start || i - start > 250)
            return NOT_SIMPLE;
        h->name_len = i - start;
        i++;
        /* What the name alone decides, at once (llhttp refuses some of it as early). */
        kind = 0;
        switch (h->name_len) {
        case 4:
            if (lower_eq(h->name, 4, "host"))
                hosts++;
            break;
        case 6:
            if (lower_eq(h->name, 6, "expect"))
                return NOT_SIMPLE;
            break;
        case 7:
            if (lower_eq(h->name, 7, "upgrade"))
                return NOT_SIMPLE;
            break;
        case 10:
            if (lower_eq(h->name, 10, "connection")) {
                if (connection++)
                    return NOT_SIMPLE;
                kind = 'C';
            }
            break;
        case 14:
            if (lower_eq(h->name, 14, "content-length")) {
                if (clen >= 0)
                    return NOT_SIMPLE;
                clen = 0;
                kind = 'L';
            }
            break;
        case 17:
            if (lower_eq(h->name, 17, "transfer-encoding"))
                return NOT_SIMPLE;
            break;
        }
        while (i < n && (b[i] == ' ' || b[i] == '\t'))
            i++;
        start = i;
        while (i < n && ((b[i] >= 0x20 && b[i] < 0x7f) || b[i] == '\t'))
            i++;
        v_end = i;
        while (v_end > start && (b[v_end - 1] == ' ' || b[v_end - 1] == '\t'))
            v_end--;
        h->value = b + start;
        h->value_len = v_end - start;
        if (kind == 'L') { /* digits, checked as they come */
            Py_ssize_t k;
            if (h->value_len > 18)
                return NOT_SIMPLE;
            for (k = 0; k < h->value_len; k++) {
                if (h->value[k] < '0' || h->value[k] > '9')
                    return NOT_SIMPLE;
                clen = clen * 10 + (h->value[k] - '0');
            }
            if (clen > max_body)
                return NOT_SIMPLE;
        }
        if (i == n)
            return i > max_head ? NOT_SIMPLE : NEED;
        if (b[i] != '\r')
            return NOT_SIMPLE;
        if (i + 1 == n)
            return NEED;
        if (b[i + 1] != '\n')
            return NOT_SIMPLE;
        i += 2;
        r->nheaders++;
        if (kind == 'L' && h->value_len == 0)
            return NOT_SIMPLE;
        if (kind == 'C') {
            if (lower_eq(h->value, h->value_len, "close"))
                close = 1;
            else if (lower_eq(h->value, h->value_len, "keep-alive"))
                keep = 1;
            else
                return NOT_SIMPLE;
        }
    }
    /* tafe.http measures a head as names + values + target + 16 + 4 per header; the
     * bytes on the wire are at least that minus one per header. */
    if (i + r->nheaders > max_head)
        return NOT_SIMPLE;
    if (r->http11 ? hosts != 1 : hosts > 1)
        return NOT_SIMPLE;
    r->head_len = i;
    r->body_len = clen < 0 ? 0 : clen;
    r->end = i + r->body_len;
    r->keep_alive = r->http11 ? !close : keep;
    return n < r->end ? NEED : COMPLETE;
}

/* --- the connection ------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    int fd;
    PyObject *handle, *base, *server;
    Py_ssize_t max_head, max_body;
    char *buf;
    Py_ssize_t len, cap;
    double arrival, last_read;
    Py_ssize_t request_end;
    PyObject *method, *target, *status, *unsent;
    int keep_alive, http11;
    Py_ssize_t bytes_out;
    PyObject *outbox; /* an Outbox, or NULL: every answer is sent at once */
    PyObject *held;   /* the last answer, in the outbox and not sent yet */
    int held_failed;  /* sending the held answer failed: the client is gone */
} Conn;

static double
monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* --- the outbox: answers that leave together ------------------------------------
 *
 * Why. A send wakes the peer reading the socket (a client, Nginx) if it sleeps, and on
 * a busy worker each answer would wake it again: measured at saturation, the worker's
 * kernel time per request was 17-20 us sending each answer at once against 9-14 us
 * holding them for up to 0.5-2 ms, about bjoern's (which writes on its loop's next turn;
 * benchmarks/RESULTS.md, "Server fast path").
 *
 * Rules. An answer on a connection that stays open is held here, unless the oldest
 * answer held is ``hold`` seconds old: then all leave at once, this one with them. Held
 * answers also all leave at:
 * - any connection's next ``step()`` once the oldest is ``hold`` old;
 * - the next ``step()`` of a connection holding one: tafe.connection steps again right
 *   after its yield, so an answer leaves before the loop waits, and at low load as soon
 *   as its greenlet has yielded;
 * - an answer that closes its connection (it is never held, and goes after them);
 * - ``Conn.send_held()``, which must be called before the connection's socket closes (a
 *   held answer goes to its descriptor's number), and ``flush()``, which tafe.connection
 *   calls before an answer of the Python path and tafe.server before it shuts
 *   connections at the end of a drain.
 * A held answer's send failing makes its connection's next step GONE; one sent in part,
 * UNSENT. Answers on one connection keep their order. The most one waits is ``hold``
 * plus what runs until the next step or answer: the request being served when it falls
 * due (greenlets that serve none, such as the metrics fold, are brief), well inside the
 * ``network_margin_ms`` kept back from ``tmax``.
 */

typedef struct {
    PyObject_HEAD
    double hold, first_at;
    Conn **conns;
    Py_ssize_t len, cap;
    int flushing;
    unsigned long long answers, batches;
} Outbox;

static PyTypeObject OutboxType;

/* One send of an answer (len bytes at p, or all of ``whole`` when given) on c's socket.
 * What the socket's full buffer would not take becomes c->unsent, for Python to send
 * waiting as it must. 0: sent or kept; -1: the client is gone; -2: no memory for the
 * rest (exception set). */
static int
send_answer(Conn *c, const char *p, Py_ssize_t len, PyObject *whole)
{
    ssize_t sent;
    PyObject *rest;
    do {
        sent = send(c->fd, p, len, MSG_NOSIGNAL);
    } while (sent < 0 && errno == EINTR);
    if (sent < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
        return -1;
    if (sent >= len)
        return 0;
    if (sent <= 0 && whole != NULL) {
        rest = Py_NewRef(whole); /* none of it went: all of it is the rest */
    } else {
        rest = PyBytes_FromStringAndSize(p + (sent < 0 ? 0 : sent), len - (sent < 0 ? 0 : sent));
        if (rest == NULL)
            return -2;
    }
    Py_XSETREF(c->unsent, rest);
    return 0;
}

/* Send c's held answer: a failure shows at the connection's next step (GONE, UNSENT). */
static void
send_held(Conn *c)
{
    PyObject *data = c->held;
    c->held = NULL;
    if (send_answer(c, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), data) < 0) {
        PyErr_Clear(); /* no memory for the rest: the connection cannot go on either */
        c->held_failed = 1;
    }
    Py_DECREF(data);
}

static void
outbox_flush_all(Outbox *box)
{
    Py_ssize_t n = box->len, k;
    if (n == 0 || box->flushing)
        return;
    /* While flushing, the array does not change: a flush called from a connection freed
     * below returns here at once, and an answer made meanwhile is sent, not held. */
    box->flushing = 1;
    for (k = 0; k < n; k++)
        if (box->conns[k]->held != NULL)
            send_held(box->conns[k]);
    box->batches++;
    box->len = 0;
    for (k = 0; k < n; k++)
        Py_DECREF(box->conns[k]);
    box->flushing = 0;
}

/* Hold c's answer (len bytes at p): 1 held, 0 not held (send it now). */
static int
outbox_hold(Outbox *box, Conn *c, const char *p, Py_ssize_t len)
{
    double now;
    if (box->flushing)
        return 0;
    now = monotonic();
    if (box->len > 0 && now - box->first_at >= box->hold) {
        outbox_flush_all(box); /* the oldest is due: this answer goes now, with them */
        return 0;
    }
    if (box->len == box->cap) {
        Py_ssize_t cap = box->cap ? box->cap * 2 : 64;
        Conn **conns = PyMem_Realloc(box->conns, cap * sizeof(Conn *));
        if (conns == NULL)
            return 0; /* no room to hold it: it is sent at once */
        box->conns = conns;
        box->cap = cap;
    }
    c->held = PyBytes_FromStringAndSize(p, len);
    if (c->held == NULL) {
        PyErr_Clear(); /* no memory to hold it: it is sent at once */
        return 0;
    }
    if (box->len == 0)
        box->first_at = now;
    box->conns[box->len++] = (Conn *)Py_NewRef(c);
    box->answers++;
    return 1;
}

static int
outbox_init(Outbox *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"hold", NULL};
    double hold;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "d", kwlist, &hold))
        return -1;
    if (!(hold > 0)) {
        PyErr_SetString(PyExc_ValueError, "hold must be > 0 seconds (no outbox sends every answer at once)");
        return -1;
    }
    outbox_flush_all(self);
    self->hold = hold;
    return 0;
}

static void
outbox_dealloc(Outbox *self)
{
    outbox_flush_all(self); /* never reached with answers held: each holds a reference */
    PyMem_Free(self->conns);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
outbox_flush(Outbox *self, PyObject *Py_UNUSED(ignored))
{
    outbox_flush_all(self);
    Py_RETURN_NONE;
}

static PyObject *
outbox_get_held(Outbox *self, void *c) { return PyLong_FromSsize_t(self->len); }
static PyObject *
outbox_get_answers(Outbox *self, void *c) { return PyLong_FromUnsignedLongLong(self->answers); }
static PyObject *
outbox_get_batches(Outbox *self, void *c) { return PyLong_FromUnsignedLongLong(self->batches); }

static PyGetSetDef outbox_getset[] = {
    {"held", (getter)outbox_get_held, NULL, "Answers held now.", NULL},
    {"answers", (getter)outbox_get_answers, NULL, "Answers ever held.", NULL},
    {"batches", (getter)outbox_get_batches, NULL, "Flushes that sent held answers.", NULL},
    {NULL}};

static PyMethodDef outbox_methods[] = {
    {"flush", (PyCFunction)outbox_flush, METH_NOARGS, "Send every held answer now."},
    {NULL}};

static PyTypeObject OutboxType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tafe._fastpath.Outbox",
    .tp_basicsize = sizeof(Outbox),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Outbox(hold): answers of many connections sent together, each held at most about hold seconds (see the module source).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)outbox_init,
    .tp_dealloc = (destructor)outbox_dealloc,
    .tp_methods = outbox_methods,
    .tp_getset = outbox_getset,
};

static int
conn_init(Conn *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "handle", "base", "server", "max_head", "max_body", "outbox", NULL};
    PyObject *handle, *base, *server, *outbox = Py_None;
    Py_ssize_t max_head, max_body;
    int fd;
    /* Into locals: a refused call leaves the connection as it was (its held answer's fd too). */
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iOO!Onn|O", kwlist, &fd, &handle, &PyDict_Type, &base, &server, &max_head,
                                     &max_body, &outbox))
        return -1;
    if (outbox != Py_None && !PyObject_TypeCheck(outbox, &OutboxType)) {
        PyErr_SetString(PyExc_TypeError, "outbox must be an Outbox or None");
        return -1;
    }
    if (self->held != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Conn holds an answer: it cannot be initialised again");
        return -1;
    }
    self->fd = fd;
    self->max_head = max_head;
    self->max_body = max_body;
    self->held_failed = 0;
    Py_CLEAR(self->unsent);
    Py_XSETREF(self->outbox, outbox == Py_None ? NULL : Py_NewRef(outbox));
    Py_XSETREF(self->handle, Py_NewRef(handle));
    Py_XSETREF(self->base, Py_NewRef(base));
    Py_XSETREF(self->server, Py_NewRef(server));
    self->arrival = self->last_read = -1.0;
    self->keep_alive = 1;
    self->http11 = 1;
    return 0;
}

static void
conn_dealloc(Conn *self)
{
    Py_XDECREF(self->handle);
    Py_XDECREF(self->base);
    Py_XDECREF(self->server);
    Py_XDECREF(self->method);
    Py_XDECREF(self->target);
    Py_XDECREF(self->status);
    Py_XDECREF(self->unsent);
    Py_XDECREF(self->held); /* NULL: the outbox keeps a held answer's connection alive */
    Py_XDECREF(self->outbox);
    PyMem_Free(self->buf);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Drop the first n buffered bytes (a request served). */
static void
consume(Conn *self, Py_ssize_t n)
{
    self->len -= n;
    if (self->len > 0) {
        memmove(self->buf, self->buf + n, self->len);
        self->arrival = self->last_read; /* pipelined: it came with the last read at the latest */
    } else {
        self->arrival = -1.0;
    }
}

/* One recv into the buffer: >0 bytes read, 0 closed, -1 would block, -2 error, -3 Python error. */
static Py_ssize_t
read_some(Conn *self)
{
    ssize_t got;
    if (self->len == self->cap) {
        Py_ssize_t cap = self->cap ? self->cap * 2 : FIRST_CAPACITY;
        char *buf = PyMem_Realloc(self->buf, cap);
        if (buf == NULL) {
            PyErr_NoMemory();
            return -3;
        }
        self->buf = buf;
        self->cap = cap;
    }
    do {
        got = recv(self->fd, self->buf + self->len, self->cap - self->len, 0);
    } while (got < 0 && errno == EINTR);
    if (got < 0)
        return (errno == EAGAIN || errno == EWOULDBLOCK) ? -1 : -2;
    if (got > 0) {
        self->last_read = monotonic();
        if (self->len == 0)
            self->arrival = self->last_read;
        self->len += got;
    }
    return got;
}

static PyObject *
make_environ(Conn *self, simple_t *r)
{
    PyObject *env = PyDict_Copy(self->base), *value = NULL, *key = NULL;
    char keybuf[5 + 256];
    int k;
    if (env == NULL)
        return NULL;
    if (PyDict_SetItem(env, s_REQUEST_METHOD, method_str[r->method]) < 0)
        goto fail;
    value = PyUnicode_DecodeLatin1(r->target, r->path_len, NULL);
    if (value == NULL || PyDict_SetItem(env, s_PATH_INFO, value) < 0)
        goto fail;
    Py_CLEAR(value);
    for (k = 0; k < r->nheaders; k++) {
        header_t *h = &r->headers[k];
        Py_ssize_t j, klen;
        PyObject *old;
        if (memchr(h->name, '_', h->name_len))
            continue; /* would alias its "-" twin (tafe.http drops it too) */
        if (lower_eq(h->name, h->name_len, "content-type") || lower_eq(h->name, h->name_len, "content-length")) {
            klen = 0;
        } else {
            memcpy(keybuf, "HTTP_", 5);
            klen = 5;
        }
        for (j = 0; j < h->name_len; j++) {
            char c = h->name[j];
            keybuf[klen++] = c == '-' ? '_' : (c >= 'a' && c <= 'z') ? c - 32 : c;
        }
        key = PyUnicode_FromStringAndSize(keybuf, klen);
        value = PyUnicode_DecodeLatin1(h->value, h->value_len, NULL);
        if (key == NULL || value == NULL)
            goto fail;
        old = PyDict_GetItemWithError(env, key);
        if (old != NULL) { /* a repeated header: joined with "," (TypeError if base holds a non-str) */
            PyObject *joined = PyUnicode_Concat(old, s_comma), *all;
            if (joined == NULL)
                goto fail;
            all = PyUnicode_Concat(joined, value);
            Py_DECREF(joined);
            if (all == NULL)
                goto fail;
            Py_SETREF(value, all);
        } else if (PyErr_Occurred()) {
            goto fail;
        }
        if (PyDict_SetItem(env, key, value) < 0)
            goto fail;
        Py_CLEAR(key);
        Py_CLEAR(value);
    }
    value = r->body_len ? PyBytes_FromStringAndSize(self->buf + r->head_len, r->body_len) : Py_NewRef(empty_bytes);
    if (value == NULL || PyDict_SetItem(env, s_body, value) < 0)
        goto fail;
    Py_CLEAR(value);
    value = PyFloat_FromDouble(self->arrival);
    if (value == NULL || PyDict_SetItem(env, s_arrival, value) < 0)
        goto fail;
    Py_DECREF(value);
    return env;
fail:
    Py_XDECREF(key);
    Py_XDECREF(value);
    Py_DECREF(env);
    return NULL;
}

/* (code, status line bytes) of a WSGI status string, a new reference, cached;
 * ValueError if malformed (tafe.http's rules). */
static PyObject *
status_line(PyObject *status)
{
    PyObject *cached, *line, *code;
    Py_ssize_t n;
    const char *s;
    int c;
    cached = PyDict_GetItemWithError(status_cache, status);
    if (cached != NULL)
        return Py_NewRef(cached);
    if (PyErr_Occurred())
        return NULL;
    if (!PyUnicode_Check(status) || (s = PyUnicode_AsUTF8AndSize(status, &n)) == NULL || n < 3 || s[0] < '1' || s[0] > '9' ||
        s[1] < '0' || s[1] > '9' || s[2] < '0' || s[2] > '9' || (n > 3 && s[3] != ' ')) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "bad WSGI status %R", status);
        return NULL;
    }
    c = (s[0] - '0') * 100 + (s[1] - '0') * 10 + (s[2] - '0');
    line = PyUnicode_FromFormat("HTTP/1.1 %U\r\n", status);
    if (line == NULL)
        return NULL;
    Py_SETREF(line, PyUnicode_AsLatin1String(line));
    code = PyLong_FromLong(c);
    cached = line && code ? PyTuple_Pack(2, code, line) : NULL;
    Py_XDECREF(line);
    Py_XDECREF(code);
    if (cached != NULL && PyDict_GET_SIZE(status_cache) < 256 && PyDict_SetItem(status_cache, status, cached) < 0)
        Py_CLEAR(cached);
    return cached;
}

static char date_line[64];
static time_t date_second = -1;

static const char *
date(void)
{
    static const char *days[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
    static const char *months[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (ts.tv_sec != date_second) {
        gmtime_r(&ts.tv_sec, &tm);
        snprintf(date_line, sizeof date_line, "Date: %s, %02d %s %04d %02d:%02d:%02d GMT\r\n", days[tm.tm_wday], tm.tm_mday,
                 months[tm.tm_mon], tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
        date_second = ts.tv_sec;
    }
    return date_line;
}

/* A growable byte string for the head. */
typedef struct {
    char *p;
    Py_ssize_t len, cap;
    char small[4096];
} out_t;

static int
put(out_t *o, const char *s, Py_ssize_t n)
{
    if (o->len + n > o->cap) {
        Py_ssize_t cap = (o->len + n) * 2;
        char *p = o->p == o->small ? PyMem_Malloc(cap) : PyMem_Realloc(o->p, cap);
        if (p == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        if (o->p == o->small)
            memcpy(p, o->small, o->len);
        o->p = p;
        o->cap = cap;
    }
    memcpy(o->p + o->len, s, n);
    o->len += n;
    return 0;
}

static int
put_text(out_t *o, PyObject *text)
{
    if (!PyUnicode_Check(text)) {
        PyErr_Format(PyExc_TypeError, "header names and values are str, not %.100s", Py_TYPE(text)->tp_name);
        return -1;
    }
    if (PyUnicode_KIND(text) != PyUnicode_1BYTE_KIND) {
        PyObject *encoded = PyUnicode_AsLatin1String(text); /* raises UnicodeEncodeError */
        Py_XDECREF(encoded);
        if (encoded != NULL)
            PyErr_Format(PyExc_ValueError, "header text not latin-1: %R", text);
        return -1;
    }
    return put(o, (const char *)PyUnicode_1BYTE_DATA(text), PyUnicode_GET_LENGTH(text));
}

/* Whether obj.name is true: 1, 0, or -1 on error. */
static int
attr_true(PyObject *obj, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    int t;
    if (v == NULL)
        return -1;
    t = PyObject_IsTrue(v);
    Py_DECREF(v);
    return t;
}

/* Frame and send handle's answer; the step() code, or -1 with an exception set. */
static int
answer(Conn *self, simple_t *r, PyObject *result)
{
    PyObject *status, *headers, *body, *line, *seq = NULL;
    Py_ssize_t k, n, body_len;
    int code, has_body, closing, rc = -1;
    out_t o;

    o.p = o.small;
    o.len = 0;
    o.cap = sizeof o.small;
    if (!PyTuple_Check(result) || PyTuple_GET_SIZE(result) != 3) {
        PyErr_SetString(PyExc_TypeError, "handle must return (status, headers, body) or None");
        return -1;
    }
    status = PyTuple_GET_ITEM(result, 0);
    headers = PyTuple_GET_ITEM(result, 1);
    body = PyTuple_GET_ITEM(result, 2);
    if (!PyBytes_Check(body)) {
        PyErr_SetString(PyExc_TypeError, "handle's body must be bytes");
        return -1;
    }
    line = status_line(status);
    if (line == NULL)
        return -1;
    code = (int)PyLong_AsLong(PyTuple_GET_ITEM(line, 0));
    if (put(&o, PyBytes_AS_STRING(PyTuple_GET_ITEM(line, 1)), PyBytes_GET_SIZE(PyTuple_GET_ITEM(line, 1))) < 0)
        goto done;
    {
        const char *line_ = date();
        if (put(&o, line_, strlen(line_)) < 0)
            goto done;
    }
    seq = PySequence_Fast(headers, "handle's headers must be a list of (name, value)");
    if (seq == NULL)
        goto done;
    n = PySequence_Fast_GET_SIZE(seq);
    for (k = 0; k < n; k++) {
        PyObject *pair = PySequence_Fast_GET_ITEM(seq, k), *name;
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            PyErr_SetString(PyExc_TypeError, "handle's headers must be a list of (name, value)");
            goto done;
        }
        name = PyTuple_GET_ITEM(pair, 0);
        if (PyUnicode_Check(name) && PyUnicode_KIND(name) == PyUnicode_1BYTE_KIND) {
            const char *s = (const char *)PyUnicode_1BYTE_DATA(name);
            Py_ssize_t len = PyUnicode_GET_LENGTH(name);
            if (lower_eq(s, len, "connection") || lower_eq(s, len, "content-length") || lower_eq(s, len, "transfer-encoding")) {
                PyErr_Format(PyExc_ValueError, "the app's handle may not frame its answer: %U", name);
                goto done;
            }
        }
        if (put_text(&o, name) < 0 || put(&o, ": ", 2) < 0 || put_text(&o, PyTuple_GET_ITEM(pair, 1)) < 0 ||
            put(&o, "\r\n", 2) < 0)
            goto done;
    }
    body_len = PyBytes_GET_SIZE(body);
    has_body = !(code < 200 || code == 204 || code == 304);
    if (has_body) { /* "Content-Length: <digits>\r\n", the digits written backwards */
        char num[40], *p = num + sizeof num;
        Py_ssize_t v = body_len;
        *--p = '\n';
        *--p = '\r';
        do {
            *--p = (char)('0' + v % 10);
            v /= 10;
        } while (v);
        p -= 16;
        memcpy(p, "Content-Length: ", 16);
        if (put(&o, p, num + sizeof num - p) < 0)
            goto done;
    }
    /* Decided after the app ran, not at arrival: a request in flight when draining
     * began still tells its client to go elsewhere next time. */
    closing = r->keep_alive ? attr_true(self->server, s_says_close) : 1;
    if (closing < 0)
        goto done;
    self->keep_alive = !closing;
    if (closing) {
        if (put(&o, "Connection: close\r\n\r\n", 21) < 0)
            goto done;
    } else if (!r->http11) {
        if (put(&o, "Connection: keep-alive\r\n\r\n", 26) < 0)
            goto done;
    } else if (put(&o, "\r\n", 2) < 0) {
        goto done;
    }
    Py_XSETREF(self->status, Py_NewRef(status));
    if (!has_body || r->method == 1 /* HEAD */)
        body_len = 0;
    self->bytes_out = body_len;
    /* One buffer, one send: copying a usual body (a few KiB) costs less than the kernel's
     * work on a second iovec. */
    if (body_len && put(&o, PyBytes_AS_STRING(body), body_len) < 0)
        goto done;
    if (self->outbox != NULL) {
        if (self->keep_alive && outbox_hold((Outbox *)self->outbox, self, o.p, o.len)) {
            rc = DONE;
            goto done;
        }
        outbox_flush_all((Outbox *)self->outbox); /* the held ones are older: they go first */
    }
    switch (send_answer(self, o.p, o.len, NULL)) {
    case -1:
        rc = GONE; /* the client went away */
        break;
    case 0:
        rc = self->unsent != NULL ? UNSENT : self->keep_alive ? DONE : CLOSE;
        break;
    } /* -2: rc stays -1, MemoryError set */
done:
    Py_XDECREF(seq);
    Py_DECREF(line);
    if (o.p != o.small)
        PyMem_Free(o.p);
    return rc;
}

PyDoc_STRVAR(step_doc,
"step() -> code\n\n"
"Serve the next request of this connection if it is simple and handle takes it.\n"
"DONE/CLOSE: answered (keep the connection / close it); WAIT: no whole request\n"
"buffered and the socket has nothing more; GONE: the client closed or failed;\n"
"GENERAL: the buffer holds something only tafe.http may judge (take() it);\n"
"WSGI: handle left the request (None): its request_end bytes are the request;\n"
"UNSENT: answered in part, send take_unsent(). If handle raises, the request is\n"
"consumed and the exception propagates (method, target, keep_alive, http11 say\n"
"which request it was).");

static PyObject *
conn_step(Conn *self, PyObject *Py_UNUSED(ignored))
{
    simple_t r;
    PyObject *env, *result, *args[3];
    int rc;
    if (self->handle == NULL) {
        PyErr_SetString(PyExc_TypeError, "Conn.__init__ was not called");
        return NULL;
    }
    if (self->outbox != NULL) {
        /* The loop came back to this connection (its answer goes, with the others), or
         * to any while the oldest held answer is due. */
        Outbox *box = (Outbox *)self->outbox;
        if (self->held != NULL || (box->len > 0 && monotonic() - box->first_at >= box->hold))
            outbox_flush_all(box);
    }
    if (self->held_failed)
        return PyLong_FromLong(GONE);
    if (self->unsent != NULL)
        return PyLong_FromLong(UNSENT);
    for (;;) {
        rc = self->len ? parse(self->buf, self->len, self->max_head, self->max_body, &r) : NEED;
        if (rc == COMPLETE)
            break;
        if (rc == NOT_SIMPLE)
            return PyLong_FromLong(GENERAL);
        switch (read_some(self)) {
        case -1:
            if (self->len == 0) { /* idle: an idle connection holds no buffer */
                PyMem_Free(self->buf);
                self->buf = NULL;
                self->cap = 0;
            }
            return PyLong_FromLong(WAIT);
        case -2:
        case 0:
            return PyLong_FromLong(GONE);
        case -3:
            return NULL;
        }
    }
    self->request_end = r.end;
    self->keep_alive = r.keep_alive;
    self->http11 = r.http11;
    Py_XSETREF(self->method, Py_NewRef(method_str[r.method]));
    Py_XSETREF(self->target, PyBytes_FromStringAndSize(r.target, r.target_len));
    if (self->target == NULL)
        return NULL;
    env = make_environ(self, &r);
    if (env == NULL)
        return NULL;
    args[0] = self->method;
    args[1] = PyDict_GetItemWithError(env, s_PATH_INFO);
    args[2] = env;
    Py_XINCREF(args[1]); /* ours, whatever handle does to env */
    result = args[1] ? PyObject_Vectorcall(self->handle, args, 3, NULL) : NULL;
    Py_XDECREF(args[1]);
    Py_DECREF(env);
    if (result == Py_None) {
        Py_DECREF(result);
        return PyLong_FromLong(WSGI);
    }
    rc = result == NULL ? -1 : answer(self, &r, result);
    Py_XDECREF(result);
    consume(self, r.end); /* answered or failed: either way it is done with */
    return rc < 0 ? NULL : PyLong_FromLong(rc);
}

static PyObject *
conn_take(Conn *self, PyObject *args)
{
    Py_ssize_t n = -1;
    PyObject *out;
    if (!PyArg_ParseTuple(args, "|n", &n))
        return NULL;
    if (n < 0 || n > self->len)
        n = self->len;
    out = PyBytes_FromStringAndSize(self->buf, n);
    if (out != NULL && n)
        consume(self, n);
    return out;
}

static PyObject *
conn_take_unsent(Conn *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *out = self->unsent ? self->unsent : Py_NewRef(empty_bytes);
    self->unsent = NULL;
    return out;
}

static PyObject *
conn_send_held(Conn *self, PyObject *Py_UNUSED(ignored))
{
    if (self->held != NULL)
        outbox_flush_all((Outbox *)self->outbox);
    return PyBool_FromLong(!self->held_failed && self->unsent == NULL);
}

static PyObject *
conn_get_held(Conn *self, void *c) { return PyBool_FromLong(self->held != NULL); }
static PyObject *
conn_get_buffered(Conn *self, void *c) { return PyLong_FromSsize_t(self->len); }
static PyObject *
conn_get_capacity(Conn *self, void *c) { return PyLong_FromSsize_t(self->cap); }
static PyObject *
conn_get_arrival(Conn *self, void *c) { return PyFloat_FromDouble(self->arrival); }
static PyObject *
conn_get_request_end(Conn *self, void *c) { return PyLong_FromSsize_t(self->request_end); }
static PyObject *
conn_get_keep_alive(Conn *self, void *c) { return PyBool_FromLong(self->keep_alive); }
static PyObject *
conn_get_http11(Conn *self, void *c) { return PyBool_FromLong(self->http11); }
static PyObject *
conn_get_bytes_out(Conn *self, void *c) { return PyLong_FromSsize_t(self->bytes_out); }
static PyObject *
conn_get_method(Conn *self, void *c) { return Py_NewRef(self->method ? self->method : Py_None); }
static PyObject *
conn_get_target(Conn *self, void *c) { return Py_NewRef(self->target ? self->target : Py_None); }
static PyObject *
conn_get_status(Conn *self, void *c) { return Py_NewRef(self->status ? self->status : Py_None); }

static PyGetSetDef conn_getset[] = {
    {"held", (getter)conn_get_held, NULL, "Whether the last answer waits in the outbox.", NULL},
    {"buffered", (getter)conn_get_buffered, NULL, "Bytes read and not yet served.", NULL},
    {"capacity", (getter)conn_get_capacity, NULL, "Bytes of buffer held (0 while idle).", NULL},
    {"arrival", (getter)conn_get_arrival, NULL, "Monotonic time the buffered request began to arrive (-1: none).", NULL},
    {"request_end", (getter)conn_get_request_end, NULL, "Length of the last request parsed (WSGI: its bytes).", NULL},
    {"keep_alive", (getter)conn_get_keep_alive, NULL, "Whether the connection stays open after the last request.", NULL},
    {"http11", (getter)conn_get_http11, NULL, "Whether the last request was HTTP/1.1.", NULL},
    {"bytes_out", (getter)conn_get_bytes_out, NULL, "Body bytes of the last answer.", NULL},
    {"method", (getter)conn_get_method, NULL, "Method of the last request (None before one).", NULL},
    {"target", (getter)conn_get_target, NULL, "Target of the last request (None before one).", NULL},
    {"status", (getter)conn_get_status, NULL, "Status of the last answer (None before one).", NULL},
    {NULL}};

static PyMethodDef conn_methods[] = {
    {"step", (PyCFunction)conn_step, METH_NOARGS, step_doc},
    {"take", (PyCFunction)conn_take, METH_VARARGS, "take(n=-1) -> the first n buffered bytes (all by default), removed."},
    {"take_unsent", (PyCFunction)conn_take_unsent, METH_NOARGS, "The part of the last answer not sent yet (UNSENT)."},
    {"send_held", (PyCFunction)conn_send_held, METH_NOARGS,
     "Send a held answer now (with the outbox's others), before the socket closes: whether all of it went."},
    {NULL}};

static PyTypeObject ConnType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tafe._fastpath.Conn",
    .tp_basicsize = sizeof(Conn),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Conn(fd, handle, base, server, max_head, max_body, outbox=None): one connection's fast path; server.says_close is read after each answer.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)conn_init,
    .tp_dealloc = (destructor)conn_dealloc,
    .tp_methods = conn_methods,
    .tp_getset = conn_getset,
};

/* --- parse(), for tests: the fast path's reading of a buffer ---------------------- */

static PyObject *
py_parse(PyObject *module, PyObject *args)
{
    Py_buffer data;
    Py_ssize_t max_head, max_body;
    simple_t r;
    int rc, k;
    PyObject *headers, *out;
    if (!PyArg_ParseTuple(args, "y*nn", &data, &max_head, &max_body))
        return NULL;
    rc = parse(data.buf, data.len, max_head, max_body, &r);
    if (rc != COMPLETE) {
        PyBuffer_Release(&data);
        return PyLong_FromLong(rc);
    }
    headers = PyList_New(r.nheaders);
    for (k = 0; headers && k < r.nheaders; k++) {
        PyObject *pair = Py_BuildValue("(y#y#)", r.headers[k].name, r.headers[k].name_len, r.headers[k].value,
                                       r.headers[k].value_len);
        if (pair == NULL)
            Py_CLEAR(headers);
        else
            PyList_SET_ITEM(headers, k, pair);
    }
    out = headers ? Py_BuildValue("(nOy#Ny#NN)", r.end, method_str[r.method], r.target, r.target_len, headers,
                                  (char *)data.buf + r.head_len, r.body_len, PyBool_FromLong(r.keep_alive),
                                  PyBool_FromLong(r.http11))
                  : NULL;
    PyBuffer_Release(&data);
    return out;
}

static PyMethodDef module_methods[] = {
    {"parse", py_parse, METH_VARARGS,
     "parse(data, max_head, max_body) -> (end, method, target, headers, body, keep_alive, http11) for a whole\n"
     "simple request at the start of data, else 0 (not whole yet) or -1 (not simple)."},
    {NULL}};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "tafe._fastpath", "The server's hot loop for the usual request, in C (see tafe.connection).", -1,
    module_methods,
};

PyMODINIT_FUNC
PyInit__fastpath(void)
{
    PyObject *m;
    int k;
    static const char *const codes[] = {"DONE", "CLOSE", "WAIT", "GONE", "GENERAL", "WSGI", "UNSENT"};
    if (PyType_Ready(&ConnType) < 0 || PyType_Ready(&OutboxType) < 0)
        return NULL;
    for (k = 0; k < N_METHODS; k++)
        if ((method_str[k] = PyUnicode_InternFromString(METHODS[k])) == NULL)
            return NULL;
    if (!(s_REQUEST_METHOD = PyUnicode_InternFromString("REQUEST_METHOD")) ||
        !(s_PATH_INFO = PyUnicode_InternFromString("PATH_INFO")) || !(s_body = PyUnicode_InternFromString("tafe.body")) ||
        !(s_arrival = PyUnicode_InternFromString("tafe.arrival")) || !(s_says_close = PyUnicode_InternFromString("says_close")) || !(s_comma = PyUnicode_InternFromString(",")) ||
        !(empty_bytes = PyBytes_FromStringAndSize(NULL, 0)) || !(status_cache = PyDict_New()))
        return NULL;
    m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    for (k = 0; k < 7; k++)
        if (PyModule_AddIntConstant(m, codes[k], k) < 0)
            return NULL;
    if (PyModule_AddObjectRef(m, "Conn", (PyObject *)&ConnType) < 0 ||
        PyModule_AddObjectRef(m, "Outbox", (PyObject *)&OutboxType) < 0)
        return NULL;
    return m;
}
