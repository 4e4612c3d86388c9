/* The profiler's two hot loops in C: the greenlet switch hook and the watchdog's wake-ups.
 *
 * Why C: measured on the bid workload (benchmarks/profiler_overhead.py), a Python hook
 * added 564 ns per greenlet switch (a Python frame per call; this one: 113-291 ns), two switches
 * per keep-alive request; and a Python watchdog thread cost ~60-90 us of the server's
 * core per wake-up on these VMs (a GIL hand-off and the interpreter's sleep loop),
 * 100 wake-ups a second. Here the hook is a plain C call (one clock read, a few
 * stores), and the watchdog looks at the span in progress without the GIL: it takes
 * the GIL, and calls back into Python (tafe/profiler/watchdog.py), only when a span
 * is older than its sampling period, i.e. when the loop is blocked.
 *
 * Hook(hub, threshold_s, on_block, sampled): installed with greenlet.settrace; called
 * as hook(event, (origin, target)) after every switch. It ends the running span,
 * calls on_block(origin, start, span) for a span of a non-hub greenlet over the
 * threshold, appends the span to sampled[origin] (a list) when that greenlet is
 * sampled, then chains to hook.previous. hook[0] is (start of the running span,
 * greenlet running it), as the Python hook keeps it (tafe/profiler/tracer.py).
 * Times are perf_counter() seconds (CLOCK_MONOTONIC, like CPython's on Linux).
 *
 * Watch(hook, period_s, threshold_s, on_long, schedstat_fd): a POSIX thread. At each
 * wake-up it reads the hub thread's run-queue wait (pread of /proc schedstat, if
 * fd >= 0) and the span in progress; a span of a non-hub greenlet older than period_s
 * is handed to on_long() under the GIL, which returns the seconds to sleep next; one
 * older than a fifth of period_s is looked at again when period_s old; otherwise it
 * sleeps threshold_s. stop() ends and joins the thread.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static inline int64_t
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline double
seconds(int64_t ns)
{
    return (double)ns / 1e9;
}

/* --- Hook ------------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    int64_t last_ns;   /* start of the running span; read by the watch thread without the GIL */
    PyObject *running; /* the greenlet running it (strong); compared, never used, off the GIL */
    PyObject *hub;
    int64_t threshold_ns;
    PyObject *on_block;
    PyObject *sampled; /* dict: greenlet -> list of span seconds */
    PyObject *previous;
} HookObject;

static void
hook_set_span(HookObject *self, int64_t start, PyObject *running)
{
    PyObject *old = self->running;
    Py_XINCREF(running);
    __atomic_store_n(&self->last_ns, start, __ATOMIC_RELEASE);
    __atomic_store_n(&self->running, running, __ATOMIC_RELEASE);
    Py_XDECREF(old);
}

static PyObject *
hook_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    HookObject *self = (HookObject *)op;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != 2 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0)) {
        PyErr_SetString(PyExc_TypeError, "hook(event, args) takes 2 positional arguments");
        return NULL;
    }
    PyObject *pair = args[1];
    if (PyTuple_CheckExact(pair) && PyTuple_GET_SIZE(pair) == 2) {
        int64_t now = now_ns();
        int64_t start = self->last_ns;
        PyObject *origin = PyTuple_GET_ITEM(pair, 0);
        Py_INCREF(origin); /* the span's greenlet outlives the old reference we drop below */
        hook_set_span(self, now, PyTuple_GET_ITEM(pair, 1));
        if (origin != self->hub) {
            int64_t span = now - start;
            if (span >= self->threshold_ns && self->on_block != Py_None) {
                PyObject *r = PyObject_CallFunction(self->on_block, "Odd", origin, seconds(start), seconds(span));
                if (r == NULL)
                    PyErr_WriteUnraisable(self->on_block); /* never let greenlet drop the hook */
                Py_XDECREF(r);
            }
            if (self->sampled != NULL && PyDict_GET_SIZE(self->sampled)) {
                PyObject *spans = PyDict_GetItemWithError(self->sampled, origin); /* borrowed */
                if (spans != NULL && PyList_Check(spans)) {
                    PyObject *value = PyFloat_FromDouble(seconds(span));
                    if (value == NULL || PyList_Append(spans, value) < 0)
                        PyErr_WriteUnraisable(op);
                    Py_XDECREF(value);
                } else if (PyErr_Occurred()) {
                    PyErr_WriteUnraisable(op);
                }
            }
        }
        Py_DECREF(origin);
    }
    if (self->previous != NULL && self->previous != Py_None)
        return PyObject_Vectorcall(self->previous, args, 2, NULL);
    Py_RETURN_NONE;
}

static PyObject *
hook_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"hub", "threshold_s", "on_block", "sampled", NULL};
    PyObject *hub, *on_block, *sampled;
    double threshold;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OdOO!", kwlist, &hub, &threshold, &on_block, &PyDict_Type, &sampled))
        return NULL;
    HookObject *self = (HookObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->vectorcall = hook_vectorcall;
    self->last_ns = now_ns();
    self->running = NULL;
    Py_INCREF(hub);
    self->hub = hub;
    self->threshold_ns = (int64_t)(threshold * 1e9);
    Py_INCREF(on_block);
    self->on_block = on_block;
    Py_INCREF(sampled);
    self->sampled = sampled;
    self->previous = NULL;
    return (PyObject *)self;
}

static int
hook_traverse(HookObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->running);
    Py_VISIT(self->hub);
    Py_VISIT(self->on_block);
    Py_VISIT(self->sampled);
    Py_VISIT(self->previous);
    return 0;
}

static int
hook_clear(HookObject *self)
{
    Py_CLEAR(self->running);
    Py_CLEAR(self->hub);
    Py_CLEAR(self->on_block);
    Py_CLEAR(self->sampled);
    Py_CLEAR(self->previous);
    return 0;
}

static void
hook_dealloc(HookObject *self)
{
    PyObject_GC_UnTrack(self);
    hook_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* hook[0] -> (start, running): what tracer.current[0] is for the Python hook. */
static PyObject *
hook_item(HookObject *self, Py_ssize_t i)
{
    if (i != 0) {
        PyErr_SetString(PyExc_IndexError, "only [0]: (span start, greenlet)");
        return NULL;
    }
    return Py_BuildValue("(dO)", seconds(self->last_ns), self->running ? self->running : Py_None);
}

static Py_ssize_t
hook_len(HookObject *self)
{
    return 1;
}

static PyObject *
hook_restart(HookObject *self, PyObject *running)
{
    hook_set_span(self, now_ns(), running);
    Py_RETURN_NONE;
}

/* Is the running span already over the threshold (and not the hub's)? One call at
   the end of each request, so a server can keep a long span attributed to it. */
static PyObject *
hook_over(HookObject *self, PyObject *unused)
{
    if (self->running != self->hub && now_ns() - self->last_ns >= self->threshold_ns)
        Py_RETURN_TRUE;
    Py_RETURN_FALSE;
}

static PyObject *
hook_get_threshold(HookObject *self, void *closure)
{
    return PyFloat_FromDouble(seconds(self->threshold_ns));
}

static int
hook_set_threshold(HookObject *self, PyObject *value, void *closure)
{
    double t = value ? PyFloat_AsDouble(value) : -1.0;
    if (t == -1.0 && PyErr_Occurred())
        return -1;
    self->threshold_ns = t >= 9.2e9 ? INT64_MAX : (int64_t)(t * 1e9);
    return 0;
}

static PyObject *
hook_get_previous(HookObject *self, void *closure)
{
    PyObject *p = self->previous ? self->previous : Py_None;
    Py_INCREF(p);
    return p;
}

static int
hook_set_previous(HookObject *self, PyObject *value, void *closure)
{
    Py_XINCREF(value);
    Py_XSETREF(self->previous, value);
    return 0;
}

static PyMethodDef hook_methods[] = {
    {"restart", (PyCFunction)hook_restart, METH_O, "Start the running span now, run by the given greenlet."},
    {"over", (PyCFunction)hook_over, METH_NOARGS, "True if the running span (not the hub's) is over the threshold."},
    {NULL}};

static PyGetSetDef hook_getset[] = {
    {"threshold", (getter)hook_get_threshold, (setter)hook_set_threshold, "seconds", NULL},
    {"previous", (getter)hook_get_previous, (setter)hook_set_previous, "the chained tracer", NULL},
    {NULL}};

static PySequenceMethods hook_as_sequence = {
    .sq_length = (lenfunc)hook_len,
    .sq_item = (ssizeargfunc)hook_item,
};

static PyTypeObject HookType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tafe.profiler._accel.Hook",
    .tp_basicsize = sizeof(HookObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "The greenlet switch hook (see the module source).",
    .tp_new = hook_new,
    .tp_dealloc = (destructor)hook_dealloc,
    .tp_traverse = (traverseproc)hook_traverse,
    .tp_clear = (inquiry)hook_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(HookObject, vectorcall),
    .tp_as_sequence = &hook_as_sequence,
    .tp_methods = hook_methods,
    .tp_getset = hook_getset,
};

/* --- Watch ----------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    HookObject *hook;
    PyObject *on_long;
    int64_t period_ns, threshold_ns;
    int fd;
    pthread_t thread;
    int started, stopping;
    pthread_mutex_t lock; /* guards stopping (with wake) and the readings */
    pthread_cond_t wake;
    double reading_t, previous_t;
    long long reading_wait, previous_wait; /* -1: unknown */
    unsigned long long wakeups, errors;
    long native_id;
    int realtime;
} WatchObject;

static long long
runqueue_wait(int fd)
{
    char buf[128];
    if (fd < 0)
        return -1;
    ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    char *p = strchr(buf, ' '); /* "<run ns> <wait ns> <slices>" */
    return p ? strtoll(p + 1, NULL, 10) : -1;
}

static void *
watch_main(void *arg)
{
    WatchObject *w = (WatchObject *)arg;
    struct sched_param sp = {.sched_priority = 1};
    int64_t interval = w->threshold_ns;
    pthread_mutex_lock(&w->lock);
    w->native_id = (long)syscall(SYS_gettid);
    w->realtime = sched_setscheduler(0, SCHED_RR, &sp) == 0;
    pthread_cond_broadcast(&w->wake); /* the starter waits until the thread runs */
    for (;;) {
        struct timespec until;
        int64_t deadline = now_ns() + interval;
        until.tv_sec = deadline / 1000000000LL;
        until.tv_nsec = deadline % 1000000000LL;
        while (!w->stopping && pthread_cond_timedwait(&w->wake, &w->lock, &until) != ETIMEDOUT)
            ;
        if (w->stopping)
            break;
        int64_t now = now_ns();
        w->wakeups++;
        w->previous_t = w->reading_t;
        w->previous_wait = w->reading_wait;
        w->reading_t = seconds(now);
        w->reading_wait = runqueue_wait(w->fd);
        pthread_mutex_unlock(&w->lock);
        HookObject *hook = w->hook;
        int64_t start = __atomic_load_n(&hook->last_ns, __ATOMIC_ACQUIRE);
        PyObject *running = __atomic_load_n(&hook->running, __ATOMIC_ACQUIRE);
        interval = w->threshold_ns;
        int64_t age = now - start;
        if (running != hook->hub && age < w->period_ns && age >= w->period_ns / 5) {
            /* Already long for a loop whose spans last ~0.1 ms: look again when it is
               period_s old, not a whole threshold later, so that a span just over the
               threshold is sampled too. Short spans (the usual case) keep one wake-up
               per threshold. */
            interval = w->period_ns - age;
        } else if (running != hook->hub && age >= w->period_ns) {
            /* A long span: the loop is blocked (or about to switch). Python samples it. */
            PyGILState_STATE g = PyGILState_Ensure();
            if (!__atomic_load_n(&w->stopping, __ATOMIC_ACQUIRE)) {
                PyObject *r = PyObject_CallNoArgs(w->on_long);
                double next = r ? PyFloat_AsDouble(r) : -1.0;
                Py_XDECREF(r);
                if (PyErr_Occurred()) {
                    PyErr_Clear();
                    w->errors++;
                }
                interval = next > 0 ? (int64_t)(next * 1e9) : w->period_ns;
            }
            PyGILState_Release(g);
        }
        pthread_mutex_lock(&w->lock);
    }
    pthread_mutex_unlock(&w->lock);
    return NULL;
}

static PyObject *
watch_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"hook", "period_s", "threshold_s", "on_long", "schedstat_fd", NULL};
    PyObject *hook, *on_long;
    double period, threshold;
    int fd;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!ddOi", kwlist, &HookType, &hook, &period, &threshold, &on_long, &fd))
        return NULL;
    WatchObject *self = (WatchObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    Py_INCREF(hook);
    self->hook = (HookObject *)hook;
    Py_INCREF(on_long);
    self->on_long = on_long;
    self->period_ns = (int64_t)(period * 1e9);
    self->threshold_ns = (int64_t)(threshold * 1e9);
    self->fd = fd;
    self->reading_wait = self->previous_wait = -1;
    pthread_mutex_init(&self->lock, NULL);
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&self->wake, &attr);
    pthread_condattr_destroy(&attr);
    return (PyObject *)self;
}

static PyObject *
watch_start(WatchObject *self, PyObject *unused)
{
    if (self->started) {
        PyErr_SetString(PyExc_RuntimeError, "already started");
        return NULL;
    }
    Py_INCREF(self); /* the thread's reference, dropped by stop() after the join */
    int rc;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->lock);
    rc = pthread_create(&self->thread, NULL, watch_main, self);
    if (rc == 0) {
        struct timespec until;
        int64_t deadline = now_ns() + 1000000000LL;
        until.tv_sec = deadline / 1000000000LL;
        until.tv_nsec = deadline % 1000000000LL;
        while (self->native_id == 0 && pthread_cond_timedwait(&self->wake, &self->lock, &until) != ETIMEDOUT)
            ;
    }
    pthread_mutex_unlock(&self->lock);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        Py_DECREF(self);
        errno = rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    self->started = 1;
    Py_RETURN_NONE;
}

static PyObject *
watch_stop(WatchObject *self, PyObject *unused)
{
    if (!self->started || self->stopping)
        Py_RETURN_NONE;
    Py_BEGIN_ALLOW_THREADS /* the thread may be waiting for the GIL to call on_long */
    pthread_mutex_lock(&self->lock);
    self->stopping = 1;
    pthread_cond_broadcast(&self->wake);
    pthread_mutex_unlock(&self->lock);
    pthread_join(self->thread, NULL);
    Py_END_ALLOW_THREADS
    Py_DECREF(self);
    Py_RETURN_NONE;
}

static PyObject *
watch_readings(WatchObject *self, PyObject *unused)
{
    double t, pt;
    long long w, pw;
    /* The watch thread never waits for the GIL while it holds the lock: no need to release it. */
    pthread_mutex_lock(&self->lock);
    t = self->reading_t, w = self->reading_wait, pt = self->previous_t, pw = self->previous_wait;
    pthread_mutex_unlock(&self->lock);
    PyObject *wv = w < 0 ? Py_NewRef(Py_None) : PyLong_FromLongLong(w);
    PyObject *pwv = pw < 0 ? Py_NewRef(Py_None) : PyLong_FromLongLong(pw);
    return Py_BuildValue("((dN)(dN))", t, wv, pt, pwv);
}

static PyObject *
watch_stats(WatchObject *self, PyObject *unused)
{
    return Py_BuildValue("{s:K,s:K,s:l,s:O}", "wakeups", self->wakeups, "errors", self->errors, "native_id",
                         self->native_id, "realtime", self->realtime ? Py_True : Py_False);
}

static int
watch_traverse(WatchObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->hook);
    Py_VISIT(self->on_long);
    return 0;
}

static int
watch_clear(WatchObject *self)
{
    Py_CLEAR(self->hook);
    Py_CLEAR(self->on_long);
    return 0;
}

static void
watch_dealloc(WatchObject *self)
{
    /* Only reached once the thread has been joined (it holds a reference until then). */
    PyObject_GC_UnTrack(self);
    watch_clear(self);
    pthread_mutex_destroy(&self->lock);
    pthread_cond_destroy(&self->wake);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef watch_methods[] = {
    {"start", (PyCFunction)watch_start, METH_NOARGS, "Start the thread; returns once it runs (at most 1 s)."},
    {"stop", (PyCFunction)watch_stop, METH_NOARGS, "End the thread and wait for it."},
    {"readings", (PyCFunction)watch_readings, METH_NOARGS,
     "((time, run-queue wait ns or None) at the last wake-up, the same at the one before)."},
    {"stats", (PyCFunction)watch_stats, METH_NOARGS, "wakeups, errors, native_id, realtime."},
    {NULL}};

static PyTypeObject WatchType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tafe.profiler._accel.Watch",
    .tp_basicsize = sizeof(WatchObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The watchdog's wake-up loop (see the module source).",
    .tp_new = watch_new,
    .tp_dealloc = (destructor)watch_dealloc,
    .tp_traverse = (traverseproc)watch_traverse,
    .tp_clear = (inquiry)watch_clear,
    .tp_methods = watch_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "tafe.profiler._accel", "The profiler's hook and watchdog loop in C.", -1, NULL,
};

PyMODINIT_FUNC
PyInit__accel(void)
{
    if (PyType_Ready(&HookType) < 0 || PyType_Ready(&WatchType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Hook", (PyObject *)&HookType) < 0 ||
        PyModule_AddObjectRef(m, "Watch", (PyObject *)&WatchType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
