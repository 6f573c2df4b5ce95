/* The serving fast path in C: session ciphers and a responder that answers PING and FIND_NODE in
 * established sessions straight from the socket.
 *
 * The executable specification is _fastpath_py.py: the same classes and functions (but
 * use_aead: the twin calls aead.py itself), the same argument checks, the same bytes out and the
 * same counters (tests/test_fastpath.py runs both side by side). docs/engine.md ("The serving fast path") says what the responder does and what it
 * hands back to the engine.
 *
 * - Cipher: one session's keys, send counter and replay window; seal/open a MESSAGE packet
 *   (docs/protocol.md, "Packets"). ChaCha20-Poly1305 IETF (RFC 8439) is libsodium's: the module
 *   is given the addresses of crypto_aead_chacha20poly1305_ietf_{encrypt,decrypt} from the copy
 *   PyNaCl loaded (use_aead), so there is no second libsodium and no home-made cipher.
 * - Responder: reads a batch with recvmmsg(2); a MESSAGE in an indexed session whose plaintext is
 *   a well-formed PING or FIND_NODE is answered here (the engine's token buckets, routing table
 *   and own record seq are asked through the hooks it was given) and the answers leave in one
 *   sendmmsg(2). Everything else goes back to Python in arrival order: datagrams untouched (no
 *   session, failed tag, replay, other kinds), or decrypted messages of other types.
 * - recv_batch / send_batch: the batch system calls for a connected client socket (benchmarks).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>

#define ID_BYTES 20
#define KEY_BYTES 32
#define TAG_BYTES 16
#define MESSAGE_HEAD 38 /* magic 2, version 1, kind 1, nonce 12, authdata length 2, src node ID 20 */
#define MAX_PACKET 1280
#define MAX_SEALED_MESSAGE (MAX_PACKET - MESSAGE_HEAD - TAG_BYTES)
#define MAX_MESSAGE 1118 /* constants.MAX_MESSAGE_BYTES */
#define WINDOW_BITS 1024 /* session.REPLAY_WINDOW */
#define WINDOW_WORDS (WINDOW_BITS / 64)
#define MAX_BATCH 64
#define MAX_NODES 20 /* wire.MAX_NODES_PER_MESSAGE */
#define PING_BYTES 17 /* type, request ID, seq */
#define FIND_NODE_BYTES 29 /* type, request ID, target */
#define NODES_HEAD 11 /* type, request ID, total, count */
#define MAX_SEND_RETRIES 8

typedef int (*aead_encrypt_fn)(unsigned char *, unsigned long long *, const unsigned char *,
                               unsigned long long, const unsigned char *, unsigned long long,
                               const unsigned char *, const unsigned char *, const unsigned char *);
typedef int (*aead_decrypt_fn)(unsigned char *, unsigned long long *, unsigned char *,
                               const unsigned char *, unsigned long long, const unsigned char *,
                               unsigned long long, const unsigned char *, const unsigned char *);

static aead_encrypt_fn aead_encrypt = NULL;
static aead_decrypt_fn aead_decrypt = NULL;
static PyObject *REPLAYED = NULL; /* Cipher.open's answer for a counter seen before */

static PyObject *str_address, *str_encoded, *str_encode, *str_last_used, *str_touched,
    *str_last_message;

static int
require_aead(void)
{
    if (aead_encrypt == NULL || aead_decrypt == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_fastpath.use_aead has not been called");
        return -1;
    }
    return 0;
}

static inline uint64_t
read_be64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | p[i];
    return v;
}

static inline void
write_be64(unsigned char *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        p[i] = (unsigned char)(v & 0xff);
        v >>= 8;
    }
}

/* --- Cipher ---------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    unsigned char send_key[KEY_BYTES];
    unsigned char recv_key[KEY_BYTES];
    uint64_t send_counter; /* the last counter sealed; the first packet uses 1 */
    uint64_t recv_max;     /* the highest counter accepted */
    uint64_t seen[WINDOW_WORDS]; /* bit d (word d / 64, bit d % 64): counter recv_max - d accepted */
} Cipher;

static PyTypeObject Cipher_Type;

static int
Cipher_init(Cipher *self, PyObject *args, PyObject *kwds)
{
    static char *names[] = {"send_key", "recv_key", NULL};
    Py_buffer send, recv;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*y*:Cipher", names, &send, &recv))
        return -1;
    int ok = send.len == KEY_BYTES && recv.len == KEY_BYTES;
    if (ok) {
        memcpy(self->send_key, send.buf, KEY_BYTES);
        memcpy(self->recv_key, recv.buf, KEY_BYTES);
    }
    PyBuffer_Release(&send);
    PyBuffer_Release(&recv);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "send_key and recv_key must be 32 bytes each");
        return -1;
    }
    self->send_counter = 0;
    self->recv_max = 0;
    memset(self->seen, 0, sizeof self->seen);
    self->seen[0] = 1; /* counter 0 is never accepted */
    return 0;
}

/* The MESSAGE packet of `message` under the next counter into `out` (room for MAX_PACKET bytes);
 * its length. The caller checked send_counter < UINT64_MAX and mlen <= MAX_SEALED_MESSAGE. */
static size_t
seal_into(Cipher *c, const unsigned char *own_id, const unsigned char *message, size_t mlen,
          unsigned char *out)
{
    uint64_t counter = ++c->send_counter;
    out[0] = 's';
    out[1] = 'd';
    out[2] = 1; /* version */
    out[3] = 0; /* KIND_MESSAGE */
    memset(out + 4, 0, 4);
    write_be64(out + 8, counter); /* nonce: 4 zero bytes, then the counter */
    out[16] = 0;
    out[17] = ID_BYTES;
    memcpy(out + 18, own_id, ID_BYTES);
    unsigned long long clen = 0;
    aead_encrypt(out + MESSAGE_HEAD, &clen, message, mlen, out, MESSAGE_HEAD, NULL, out + 4,
                 c->send_key);
    return MESSAGE_HEAD + (size_t)clen;
}

static void
shift_window(Cipher *c, uint64_t by)
{
    if (by >= WINDOW_BITS) {
        memset(c->seen, 0, sizeof c->seen);
        return;
    }
    unsigned words = (unsigned)(by / 64), bits = (unsigned)(by % 64);
    for (int i = WINDOW_WORDS - 1; i >= 0; i--) {
        uint64_t v = 0;
        int from = i - (int)words;
        if (from >= 0) {
            v = c->seen[from] << bits;
            if (bits && from >= 1)
                v |= c->seen[from - 1] >> (64 - bits);
        }
        c->seen[i] = v;
    }
}

/* Open a MESSAGE packet (len MESSAGE_HEAD + TAG_BYTES .. MAX_PACKET, counter nonce): 1 and the
 * plaintext in `out`, 0 if the tag does not verify, -1 for a counter seen before or older than
 * the window. The window moves only after the tag verified (docs/protocol.md). */
static int
open_into(Cipher *c, const unsigned char *packet, size_t len, unsigned char *out, size_t *plen)
{
    uint64_t counter = read_be64(packet + 8);
    if (counter <= c->recv_max) {
        uint64_t behind = c->recv_max - counter;
        if (behind >= WINDOW_BITS || ((c->seen[behind / 64] >> (behind % 64)) & 1))
            return -1;
    }
    unsigned long long mlen = 0;
    if (aead_decrypt(out, &mlen, NULL, packet + MESSAGE_HEAD, len - MESSAGE_HEAD, packet,
                     MESSAGE_HEAD, packet + 4, c->recv_key) != 0)
        return 0;
    if (counter > c->recv_max) {
        shift_window(c, counter - c->recv_max);
        c->seen[0] |= 1;
        c->recv_max = counter;
    }
    else {
        uint64_t behind = c->recv_max - counter;
        c->seen[behind / 64] |= (uint64_t)1 << (behind % 64);
    }
    *plen = (size_t)mlen;
    return 1;
}

static int
is_counter_message(const unsigned char *d, size_t len)
{
    return len >= MESSAGE_HEAD + TAG_BYTES && len <= MAX_PACKET && d[0] == 's' && d[1] == 'd' &&
           d[2] == 1 && d[3] == 0 && d[16] == 0 && d[17] == ID_BYTES && d[4] == 0 && d[5] == 0 &&
           d[6] == 0 && d[7] == 0;
}

static PyObject *
Cipher_seal(Cipher *self, PyObject *args)
{
    Py_buffer own, message;
    unsigned char out[MAX_PACKET];
    if (require_aead() < 0 || !PyArg_ParseTuple(args, "y*y*:seal", &own, &message))
        return NULL;
    PyObject *result = NULL;
    if (own.len != ID_BYTES)
        PyErr_SetString(PyExc_ValueError, "own_id must be 20 bytes");
    else if (message.len > MAX_SEALED_MESSAGE)
        PyErr_Format(PyExc_ValueError, "message of %zd bytes does not fit a packet (at most %d)",
                     message.len, MAX_SEALED_MESSAGE);
    else if (self->send_counter == UINT64_MAX)
        PyErr_SetString(PyExc_OverflowError, "the session's send counter is exhausted");
    else {
        size_t n = seal_into(self, own.buf, message.buf, (size_t)message.len, out);
        result = PyBytes_FromStringAndSize((const char *)out, (Py_ssize_t)n);
    }
    PyBuffer_Release(&own);
    PyBuffer_Release(&message);
    return result;
}

static PyObject *
Cipher_open(Cipher *self, PyObject *args)
{
    Py_buffer packet;
    unsigned char out[MAX_PACKET];
    if (require_aead() < 0 || !PyArg_ParseTuple(args, "y*:open", &packet))
        return NULL;
    PyObject *result = NULL;
    size_t plen = 0;
    if (!is_counter_message(packet.buf, (size_t)packet.len))
        result = Py_NewRef(Py_None);
    else {
        int r = open_into(self, packet.buf, (size_t)packet.len, out, &plen);
        if (r > 0)
            result = PyBytes_FromStringAndSize((const char *)out, (Py_ssize_t)plen);
        else
            result = Py_NewRef(r < 0 ? REPLAYED : Py_None);
    }
    PyBuffer_Release(&packet);
    return result;
}

static PyObject *
Cipher_get_send_counter(Cipher *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong(self->send_counter);
}

static PyObject *
Cipher_get_recv_max(Cipher *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong(self->recv_max);
}

static PyObject *
Cipher_get_send_key(Cipher *self, void *closure)
{
    (void)closure;
    return PyBytes_FromStringAndSize((const char *)self->send_key, KEY_BYTES);
}

static PyObject *
Cipher_get_recv_key(Cipher *self, void *closure)
{
    (void)closure;
    return PyBytes_FromStringAndSize((const char *)self->recv_key, KEY_BYTES);
}

static PyMethodDef Cipher_methods[] = {
    {"seal", (PyCFunction)Cipher_seal, METH_VARARGS,
     "seal(own_id, message) -> the MESSAGE packet under the next send counter"},
    {"open", (PyCFunction)Cipher_open, METH_VARARGS,
     "open(packet) -> plaintext, None (not a counter MESSAGE, or the tag fails) or REPLAYED"},
    {NULL},
};

static PyGetSetDef Cipher_getset[] = {
    {"send_counter", (getter)Cipher_get_send_counter, NULL, "the last counter sealed", NULL},
    {"recv_max", (getter)Cipher_get_recv_max, NULL, "the highest counter accepted", NULL},
    {"send_key", (getter)Cipher_get_send_key, NULL, NULL, NULL},
    {"recv_key", (getter)Cipher_get_recv_key, NULL, NULL, NULL},
    {NULL},
};

static PyTypeObject Cipher_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "sovereign_discovery._fastpath.Cipher",
    .tp_basicsize = sizeof(Cipher),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Cipher(send_key, recv_key): one session's AEAD keys, send counter and replay window.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Cipher_init,
    .tp_methods = Cipher_methods,
    .tp_getset = Cipher_getset,
};

/* --- Responder entries ------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    PyObject *session;     /* the session layer's _Session: last_used, touched, last_message */
    Cipher *cipher;
    PyObject *peer;        /* its Contact */
    PyObject *address;     /* peer.address */
    PyObject *observed;    /* peer.address.encode() (the Address's cached bytes): PONG's observed */
    double created;
    double entered_at;     /* when the routing table was last told about the peer */
} Entry;

static void
Entry_dealloc(Entry *self)
{
    Py_XDECREF(self->session);
    Py_XDECREF(self->cipher);
    Py_XDECREF(self->peer);
    Py_XDECREF(self->address);
    Py_XDECREF(self->observed);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject Entry_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "sovereign_discovery._fastpath._Entry",
    .tp_basicsize = sizeof(Entry),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)Entry_dealloc,
};

/* --- Responder -------------------------------------------------------------------------------- */

enum {
    C_PACKETS_IN, /* session layer: packets, bytes and messages it took in and sent */
    C_BYTES_IN,
    C_DELIVERED,
    C_PACKETS_OUT,
    C_BYTES_OUT,
    C_PING_IN, /* engine: messages by type */
    C_FIND_NODE_IN,
    C_PONG_OUT,
    C_NODES_OUT,
    C_HOOK_ERRORS,
    C_COUNT,
};

static const char *const counter_names[C_COUNT] = {
    "packets_in", "bytes_in", "delivered", "packets_out", "bytes_out",
    "ping_in", "find_node_in", "pong_out", "nodes_out", "hook_errors",
};

typedef struct {
    PyObject_HEAD
    unsigned char own_id[ID_BYTES];
    PyObject *index; /* dict: index key (node ID || IP || port) -> Entry */
    PyObject *admit, *enter_table, *closest, *own_seq, *serve;
    int bucket_size;
    double lifetime, reenter_s;
    unsigned long long counters[C_COUNT];
} Responder;

/* The buffers of one batch (~170 KB). Every responder of the process uses the one shared set (they
 * all run under the GIL and a batch never waits), so that a process hosting thousands of nodes
 * does not pay for them per node; a batch started while it is in use (a hook reaching another
 * responder) gets its own for the call. */
typedef struct {
    unsigned char in[MAX_BATCH][MAX_PACKET + 1];
    struct sockaddr_storage from[MAX_BATCH];
    struct iovec in_iov[MAX_BATCH];
    struct mmsghdr in_msgs[MAX_BATCH];
    unsigned char out[MAX_BATCH][MAX_PACKET];
    size_t out_len[MAX_BATCH];
    Entry *out_entry[MAX_BATCH];
    struct sockaddr_storage out_to[MAX_BATCH];
    socklen_t out_tolen[MAX_BATCH];
    struct iovec out_iov[MAX_BATCH];
    struct mmsghdr out_msgs[MAX_BATCH];
} Batch;

static Batch *shared_batch = NULL;
static int shared_batch_busy = 0;

static Batch *
acquire_batch(void)
{
    Batch *b;
    if (!shared_batch_busy && shared_batch != NULL)
        b = shared_batch;
    else {
        b = PyMem_Malloc(sizeof(Batch));
        if (b == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        if (!shared_batch_busy && shared_batch == NULL)
            shared_batch = b;
    }
    if (b == shared_batch)
        shared_batch_busy = 1;
    for (int i = 0; i < MAX_BATCH; i++) {
        b->in_iov[i].iov_base = b->in[i];
        b->out_iov[i].iov_base = b->out[i];
    }
    return b;
}

static void
release_batch(Batch *b)
{
    if (b == shared_batch)
        shared_batch_busy = 0;
    else
        PyMem_Free(b);
}

static int
Responder_init(Responder *self, PyObject *args, PyObject *kwds)
{
    static char *names[] = {"own_id", "admit", "enter_table", "closest", "own_seq", "serve",
                            "bucket_size", "session_lifetime_s", "reenter_s", NULL};
    Py_buffer own;
    PyObject *admit, *enter_table, *closest, *own_seq, *serve;
    int bucket_size;
    double lifetime, reenter;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*OOOOOidd:Responder", names, &own, &admit,
                                     &enter_table, &closest, &own_seq, &serve, &bucket_size,
                                     &lifetime, &reenter))
        return -1;
    Py_ssize_t own_len = own.len;
    if (own_len == ID_BYTES)
        memcpy(self->own_id, own.buf, ID_BYTES);
    PyBuffer_Release(&own);
    if (own_len != ID_BYTES) {
        PyErr_SetString(PyExc_ValueError, "own_id must be 20 bytes");
        return -1;
    }
    if (!PyCallable_Check(admit) || !PyCallable_Check(enter_table) || !PyCallable_Check(closest) ||
        !PyCallable_Check(own_seq) || !PyCallable_Check(serve)) {
        PyErr_SetString(PyExc_TypeError, "the hooks must be callable");
        return -1;
    }
    if (bucket_size < 1) {
        PyErr_SetString(PyExc_ValueError, "bucket_size must be at least 1");
        return -1;
    }
    Py_XSETREF(self->index, PyDict_New());
    if (self->index == NULL)
        return -1;
    Py_XSETREF(self->admit, Py_NewRef(admit));
    Py_XSETREF(self->enter_table, Py_NewRef(enter_table));
    Py_XSETREF(self->closest, Py_NewRef(closest));
    Py_XSETREF(self->own_seq, Py_NewRef(own_seq));
    Py_XSETREF(self->serve, Py_NewRef(serve));
    self->bucket_size = bucket_size;
    self->lifetime = lifetime;
    self->reenter_s = reenter;
    memset(self->counters, 0, sizeof self->counters);
    return 0;
}

static int
Responder_traverse(Responder *self, visitproc visit, void *arg)
{
    Py_VISIT(self->index);
    Py_VISIT(self->admit);
    Py_VISIT(self->enter_table);
    Py_VISIT(self->closest);
    Py_VISIT(self->own_seq);
    Py_VISIT(self->serve);
    return 0;
}

static int
Responder_clear(Responder *self)
{
    Py_CLEAR(self->index);
    Py_CLEAR(self->admit);
    Py_CLEAR(self->enter_table);
    Py_CLEAR(self->closest);
    Py_CLEAR(self->own_seq);
    Py_CLEAR(self->serve);
    return 0;
}

static void
Responder_dealloc(Responder *self)
{
    PyObject_GC_UnTrack(self);
    Responder_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Responder_add(Responder *self, PyObject *args, PyObject *kwds)
{
    static char *names[] = {"key", "session", "cipher", "peer", "address", "observed",
                            "created", NULL};
    PyObject *key, *session, *cipher, *peer, *address, *observed;
    double created;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "SOO!OOSd:add", names, &key, &session,
                                     &Cipher_Type, &cipher, &peer, &address, &observed,
                                     &created))
        return NULL;
    Py_ssize_t n = PyBytes_GET_SIZE(key);
    if (n != ID_BYTES + 4 + 2 && n != ID_BYTES + 16 + 2) {
        PyErr_SetString(PyExc_ValueError, "key must be node ID || IPv4 or IPv6 address || port");
        return NULL;
    }
    Entry *entry = PyObject_New(Entry, &Entry_Type);
    if (entry == NULL)
        return NULL;
    entry->session = Py_NewRef(session);
    entry->cipher = (Cipher *)Py_NewRef(cipher);
    entry->peer = Py_NewRef(peer);
    entry->address = Py_NewRef(address);
    entry->observed = Py_NewRef(observed);
    entry->created = created;
    entry->entered_at = -1e300;
    int r = PyDict_SetItem(self->index, key, (PyObject *)entry);
    Py_DECREF(entry);
    if (r < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Responder_remove(Responder *self, PyObject *key)
{
    if (PyDict_DelItem(self->index, key) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_KeyError))
            return NULL;
        PyErr_Clear();
    }
    Py_RETURN_NONE;
}

static PyObject *
Responder_counters(Responder *self, PyObject *unused)
{
    (void)unused;
    PyObject *out = PyDict_New();
    if (out == NULL)
        return NULL;
    for (int i = 0; i < C_COUNT; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(self->counters[i]);
        if (v == NULL || PyDict_SetItemString(out, counter_names[i], v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(v);
    }
    return out;
}

static PyObject *
Responder_len(Responder *self, PyObject *unused)
{
    (void)unused;
    return PyLong_FromSsize_t(PyDict_GET_SIZE(self->index));
}

/* The source of a datagram as Python's socket module gives it: (host, port) for IPv4 and
 * (host, port, flowinfo, scope_id) for IPv6, the host numeric (with %zone when scoped). */
static PyObject *
source_tuple(const struct sockaddr_storage *from, socklen_t len)
{
    char host[NI_MAXHOST];
    if (getnameinfo((const struct sockaddr *)from, len, host, sizeof host, NULL, 0,
                    NI_NUMERICHOST) != 0)
        return Py_BuildValue("(si)", "", 0);
    if (from->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)from;
        return Py_BuildValue("(siII)", host, ntohs(a->sin6_port), ntohl(a->sin6_flowinfo),
                             a->sin6_scope_id);
    }
    const struct sockaddr_in *a = (const struct sockaddr_in *)from;
    return Py_BuildValue("(si)", host, ntohs(a->sin_port));
}

/* The index key of (node ID, source): node ID || IP (4 or 16 bytes) || port, big-endian. NULL
 * (no error set) for a source the index cannot hold (another family, a scoped IPv6 address). */
static PyObject *
index_key(const unsigned char *node_id, const struct sockaddr_storage *from)
{
    unsigned char key[ID_BYTES + 16 + 2];
    size_t n;
    memcpy(key, node_id, ID_BYTES);
    if (from->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)from;
        memcpy(key + ID_BYTES, &a->sin_addr, 4);
        memcpy(key + ID_BYTES + 4, &a->sin_port, 2);
        n = ID_BYTES + 6;
    }
    else if (from->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)from;
        if (a->sin6_scope_id != 0)
            return NULL;
        memcpy(key + ID_BYTES, &a->sin6_addr, 16);
        memcpy(key + ID_BYTES + 16, &a->sin6_port, 2);
        n = ID_BYTES + 18;
    }
    else
        return NULL;
    return PyBytes_FromStringAndSize((const char *)key, (Py_ssize_t)n);
}

static int
append_item(PyObject *items, int kind, PyObject *a, PyObject *b)
{
    if (a == NULL || b == NULL) {
        Py_XDECREF(a);
        Py_XDECREF(b);
        return -1;
    }
    PyObject *item = Py_BuildValue("(iNN)", kind, a, b);
    if (item == NULL)
        return -1;
    int r = PyList_Append(items, item);
    Py_DECREF(item);
    return r;
}

/* A hook raised: that is a bug on the Python side; count it, report it as unraisable and let the
 * engine's own path handle the message (where the same bug is caught and logged with context). */
static void
hook_failed(Responder *self, PyObject *hook)
{
    self->counters[C_HOOK_ERRORS]++;
    PyErr_WriteUnraisable(hook);
}

/* Build the answer to a PING / FIND_NODE in `reply`: its length, 0 when the engine must serve it
 * (its answer does not fit one NODES message, a contact cannot be encoded, a hook failed). */
static size_t
build_answer(Responder *self, Entry *entry, const unsigned char *plain, unsigned char *reply)
{
    if (plain[0] == 0x01) { /* PING -> PONG(request ID, own record seq, observed address) */
        PyObject *seq = PyObject_CallNoArgs(self->own_seq);
        unsigned long long value = seq ? PyLong_AsUnsignedLongLong(seq) : 0;
        Py_XDECREF(seq);
        if (seq == NULL || PyErr_Occurred()) {
            hook_failed(self, self->own_seq);
            return 0;
        }
        Py_ssize_t olen = PyBytes_GET_SIZE(entry->observed);
        reply[0] = 0x02;
        memcpy(reply + 1, plain + 1, 8);
        write_be64(reply + 9, (uint64_t)value);
        memcpy(reply + 17, PyBytes_AS_STRING(entry->observed), (size_t)olen);
        return 17 + (size_t)olen;
    }
    /* FIND_NODE -> NODES(request ID, total 1, the bucket_size closest contacts) */
    PyObject *target = PyBytes_FromStringAndSize((const char *)plain + 9, ID_BYTES);
    PyObject *contacts = NULL;
    if (target != NULL) {
        PyObject *count = PyLong_FromLong(self->bucket_size);
        if (count != NULL) {
            PyObject *argv[2] = {target, count};
            contacts = PyObject_Vectorcall(self->closest, argv, 2, NULL);
            Py_DECREF(count);
        }
        Py_DECREF(target);
    }
    if (contacts == NULL || !PyList_Check(contacts)) {
        if (contacts == NULL)
            hook_failed(self, self->closest);
        Py_XDECREF(contacts);
        return 0;
    }
    Py_ssize_t n = PyList_GET_SIZE(contacts);
    size_t size = 0;
    if (n <= MAX_NODES) {
        size = NODES_HEAD;
        reply[0] = 0x04;
        memcpy(reply + 1, plain + 1, 8);
        reply[9] = 1;
        reply[10] = (unsigned char)n;
        for (Py_ssize_t i = 0; i < n && size; i++) {
            PyObject *contact = PyList_GET_ITEM(contacts, i);
            PyObject *encoded = PyObject_GetAttr(contact, str_encoded);
            if (encoded == Py_None) { /* not cached yet: Contact.encode caches it */
                Py_DECREF(encoded);
                encoded = PyObject_CallMethodNoArgs(contact, str_encode);
            }
            if (encoded == NULL || !PyBytes_Check(encoded) ||
                size + (size_t)PyBytes_GET_SIZE(encoded) > MAX_MESSAGE) {
                if (encoded == NULL) /* e.g. a zoned address: the engine leaves it out */
                    PyErr_Clear();
                size = 0;
            }
            else {
                memcpy(reply + size, PyBytes_AS_STRING(encoded), (size_t)PyBytes_GET_SIZE(encoded));
                size += (size_t)PyBytes_GET_SIZE(encoded);
            }
            Py_XDECREF(encoded);
        }
    }
    Py_DECREF(contacts);
    return size;
}

/* Try to answer datagram i in C. 1: answered (or queued for the engine as a decrypted message,
 * appended to items); 0: hand the datagram back untouched; -1: a Python error (out of memory). */
static int
serve_one(Responder *self, Batch *b, int i, size_t len, double now, PyObject *items, int *nout)
{
    const unsigned char *d = b->in[i];
    if (!is_counter_message(d, len))
        return 0;
    PyObject *key = index_key(d + 18, &b->from[i]);
    if (key == NULL)
        return PyErr_Occurred() ? -1 : 0;
    Entry *entry = (Entry *)PyDict_GetItemWithError(self->index, key);
    Py_DECREF(key);
    if (entry == NULL)
        return PyErr_Occurred() ? -1 : 0;
    if (now - entry->created >= self->lifetime || entry->cipher->send_counter >= UINT64_MAX - 1)
        return 0; /* the session layer expires it */
    unsigned char plain[MAX_PACKET];
    size_t plen = 0;
    if (open_into(entry->cipher, d, len, plain, &plen) <= 0)
        return 0; /* the session layer counts the failure (the window did not move) */
    Py_INCREF(entry); /* the hooks may remove it from the index */
    int result = 1;
    unsigned long long *c = self->counters;
    c[C_PACKETS_IN]++;
    c[C_BYTES_IN] += len;
    c[C_DELIVERED]++;
    PyObject *when = PyFloat_FromDouble(now);
    if (when == NULL || PyObject_SetAttr(entry->session, str_last_used, when) < 0 ||
        PyObject_SetAttr(entry->session, str_touched, Py_True) < 0) {
        result = -1;
        goto done;
    }
    int ping = plen == PING_BYTES && plain[0] == 0x01;
    int find_node = plen == FIND_NODE_BYTES && plain[0] == 0x03;
    if (!ping && !find_node) { /* another message: the engine's */
        if (append_item(items, 1, Py_NewRef(entry->peer),
                        PyBytes_FromStringAndSize((const char *)plain, (Py_ssize_t)plen)) < 0)
            result = -1;
        goto done;
    }
    /* the engine's admission (token buckets), as DhtEngine._on_message applies it */
    PyObject *argv[3] = {entry->address, when, NULL};
    PyObject *admitted = PyObject_Vectorcall(self->admit, argv, 2, NULL);
    int ok = admitted != NULL ? PyObject_IsTrue(admitted) : -1;
    Py_XDECREF(admitted);
    if (ok < 0)
        hook_failed(self, self->admit);
    if (ok != 1) { /* refused (or a failed hook): the engine drops and counts it */
        if (append_item(items, 1, Py_NewRef(entry->peer),
                        PyBytes_FromStringAndSize((const char *)plain, (Py_ssize_t)plen)) < 0)
            result = -1;
        goto done;
    }
    if (now - entry->entered_at >= self->reenter_s) {
        argv[0] = entry->peer;
        PyObject *r = PyObject_Vectorcall(self->enter_table, argv, 2, NULL);
        if (r == NULL)
            hook_failed(self, self->enter_table);
        Py_XDECREF(r);
        entry->entered_at = now;
    }
    unsigned char reply[MAX_PACKET];
    size_t rlen = build_answer(self, entry, plain, reply);
    if (rlen == 0 || *nout >= MAX_BATCH) { /* the engine serves it (admitted already) */
        PyObject *message = PyBytes_FromStringAndSize((const char *)plain, (Py_ssize_t)plen);
        if (message == NULL) {
            result = -1;
            goto done;
        }
        argv[0] = entry->peer;
        argv[1] = message;
        argv[2] = when;
        PyObject *r = PyObject_Vectorcall(self->serve, argv, 3, NULL);
        if (r == NULL)
            hook_failed(self, self->serve);
        Py_XDECREF(r);
        Py_DECREF(message);
        goto done;
    }
    /* An answer is not kept for a re-handshake (session.py keeps the last message sent, to carry
     * it again should the peer have lost the session): the peer that lost it retries its own
     * request, and a kept NODES answer would cost ~1 KB per session. */
    PyObject *last = PyBytes_FromStringAndSize(NULL, 0);
    if (last == NULL || PyObject_SetAttr(entry->session, str_last_message, last) < 0) {
        Py_XDECREF(last);
        result = -1;
        goto done;
    }
    Py_DECREF(last);
    int o = (*nout)++;
    b->out_len[o] = seal_into(entry->cipher, self->own_id, reply, rlen, b->out[o]);
    b->out_entry[o] = (Entry *)Py_NewRef(entry);
    b->out_to[o] = b->from[i];
    b->out_tolen[o] = b->in_msgs[i].msg_hdr.msg_namelen;
    c[ping ? C_PING_IN : C_FIND_NODE_IN]++;
    c[ping ? C_PONG_OUT : C_NODES_OUT]++;
    c[C_PACKETS_OUT]++;
    c[C_BYTES_OUT] += b->out_len[o];
done:
    Py_XDECREF(when);
    Py_DECREF(entry);
    return result;
}

/* serve_batch(sock, now, max_batch, max_bytes, send) -> (items, unsent, udp counts). */
static PyObject *
Responder_serve_batch(Responder *self, PyObject *args)
{
    PyObject *sock;
    double now;
    int max_batch, max_bytes, send_now;
    if (require_aead() < 0 ||
        !PyArg_ParseTuple(args, "Odiip:serve_batch", &sock, &now, &max_batch, &max_bytes, &send_now))
        return NULL;
    if (max_batch < 1 || max_batch > MAX_BATCH || max_bytes < 1 || max_bytes > MAX_PACKET) {
        PyErr_Format(PyExc_ValueError, "max_batch must be 1..%d and max_bytes 1..%d", MAX_BATCH,
                     MAX_PACKET);
        return NULL;
    }
    int fd = PyObject_AsFileDescriptor(sock);
    if (fd < 0)
        return NULL;
    Batch *b = acquire_batch();
    if (b == NULL)
        return NULL;
    PyObject *items = NULL, *unsent = NULL, *result = NULL;
    int nout = 0;
    unsigned long long datagrams_in = 0, bytes_in = 0, oversize = 0, receive_errors = 0;
    unsigned long long datagrams_out = 0, bytes_out = 0, send_errors = 0;
    for (int i = 0; i < max_batch; i++) {
        memset(&b->in_msgs[i].msg_hdr, 0, sizeof(struct msghdr));
        b->in_msgs[i].msg_hdr.msg_name = &b->from[i];
        b->in_msgs[i].msg_hdr.msg_namelen = sizeof(struct sockaddr_storage);
        b->in_msgs[i].msg_hdr.msg_iov = &b->in_iov[i];
        b->in_msgs[i].msg_hdr.msg_iovlen = 1;
        b->in_iov[i].iov_len = (size_t)max_bytes + 1;
    }
    int received = -1;
    for (int attempt = 0; attempt < max_batch && received < 0; attempt++) {
        received = recvmmsg(fd, b->in_msgs, (unsigned)max_batch, MSG_DONTWAIT, NULL);
        if (received < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                received = 0;
            else if (errno != EINTR) /* e.g. ICMP port unreachable reported on a later read */
                receive_errors++;
        }
    }
    if (received < 0)
        received = 0;
    items = PyList_New(0);
    unsent = PyList_New(0);
    if (items == NULL || unsent == NULL)
        goto done;
    for (int i = 0; i < received; i++) {
        size_t len = b->in_msgs[i].msg_len;
        if (len > (size_t)max_bytes || (b->in_msgs[i].msg_hdr.msg_flags & MSG_TRUNC)) {
            oversize++;
            continue;
        }
        datagrams_in++;
        bytes_in += len;
        int r = serve_one(self, b, i, len, now, items, &nout);
        if (r < 0)
            goto done;
        if (r == 0 &&
            append_item(items, 0,
                        PyBytes_FromStringAndSize((const char *)b->in[i], (Py_ssize_t)len),
                        source_tuple(&b->from[i], b->in_msgs[i].msg_hdr.msg_namelen)) < 0)
            goto done;
    }
    /* the answers go back to the source each request came from */
    int sent = 0;
    for (int o = 0; send_now && o < nout; o++) {
        struct msghdr *h = &b->out_msgs[o].msg_hdr;
        memset(h, 0, sizeof *h);
        h->msg_name = &b->out_to[o];
        h->msg_namelen = b->out_tolen[o];
        b->out_iov[o].iov_len = b->out_len[o];
        h->msg_iov = &b->out_iov[o];
        h->msg_iovlen = 1;
    }
    for (int retries = 0; send_now && sent < nout && retries < MAX_SEND_RETRIES;) {
        int r = sendmmsg(fd, b->out_msgs + sent, (unsigned)(nout - sent), MSG_DONTWAIT);
        if (r > 0) {
            for (int o = sent; o < sent + r; o++) {
                datagrams_out++;
                bytes_out += b->out_len[o];
            }
            sent += r;
        }
        else if (errno == EAGAIN || errno == EWOULDBLOCK)
            break;
        else if (errno == EINTR)
            retries++;
        else { /* this datagram is refused (unreachable, …): UDP gives no guarantee */
            send_errors++;
            sent++;
            retries++;
        }
    }
    for (int o = sent; o < nout; o++) {
        PyObject *item = Py_BuildValue(
            "(Oy#)", b->out_entry[o]->address, (const char *)b->out[o],
            (Py_ssize_t)b->out_len[o]);
        if (item == NULL || PyList_Append(unsent, item) < 0) {
            Py_XDECREF(item);
            goto done;
        }
        Py_DECREF(item);
    }
    result = Py_BuildValue("(OO(KKKKKKK))", items, unsent, datagrams_in, bytes_in, oversize,
                           receive_errors, datagrams_out, bytes_out, send_errors);
done:
    for (int o = 0; o < nout; o++)
        Py_DECREF(b->out_entry[o]);
    release_batch(b);
    Py_XDECREF(items);
    Py_XDECREF(unsent);
    return result;
}

static PyMethodDef Responder_methods[] = {
    {"add", (PyCFunction)(void (*)(void))Responder_add, METH_VARARGS | METH_KEYWORDS,
     "add(key, session, cipher, peer, address, observed, created): index a session"},
    {"remove", (PyCFunction)Responder_remove, METH_O, "remove(key): forget a session if indexed"},
    {"counters", (PyCFunction)Responder_counters, METH_NOARGS, "what the responder did, by name"},
    {"indexed", (PyCFunction)Responder_len, METH_NOARGS, "how many sessions are indexed"},
    {"serve_batch", (PyCFunction)Responder_serve_batch, METH_VARARGS,
     "serve_batch(sock, now, max_batch, max_bytes, send) -> (items, unsent, udp_counts)"},
    {NULL},
};

static PyTypeObject Responder_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "sovereign_discovery._fastpath.Responder",
    .tp_basicsize = sizeof(Responder),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The serving fast path of one socket: see _fastpath_py.Responder.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Responder_init,
    .tp_traverse = (traverseproc)Responder_traverse,
    .tp_clear = (inquiry)Responder_clear,
    .tp_dealloc = (destructor)Responder_dealloc,
    .tp_methods = Responder_methods,
};

/* --- module functions ------------------------------------------------------------------------- */

static PyObject *
fp_use_aead(PyObject *module, PyObject *args)
{
    (void)module;
    unsigned long long encrypt, decrypt;
    if (!PyArg_ParseTuple(args, "KK:use_aead", &encrypt, &decrypt))
        return NULL;
    if (encrypt == 0 || decrypt == 0) {
        PyErr_SetString(PyExc_ValueError, "null function address");
        return NULL;
    }
    aead_encrypt = (aead_encrypt_fn)(uintptr_t)encrypt;
    aead_decrypt = (aead_decrypt_fn)(uintptr_t)decrypt;
    Py_RETURN_NONE;
}

/* recv_batch(sock, max_count, max_bytes) -> list of datagrams (a connected socket's). */
static PyObject *
fp_recv_batch(PyObject *module, PyObject *args)
{
    (void)module;
    PyObject *sock;
    int max_count, max_bytes;
    if (!PyArg_ParseTuple(args, "Oii:recv_batch", &sock, &max_count, &max_bytes))
        return NULL;
    if (max_count < 1 || max_count > MAX_BATCH || max_bytes < 1 || max_bytes > 65535) {
        PyErr_Format(PyExc_ValueError, "max_count must be 1..%d and max_bytes 1..65535", MAX_BATCH);
        return NULL;
    }
    int fd = PyObject_AsFileDescriptor(sock);
    if (fd < 0)
        return NULL;
    size_t size = (size_t)max_count * (size_t)max_bytes;
    unsigned char *buffer = PyMem_Malloc(size);
    struct mmsghdr msgs[MAX_BATCH];
    struct iovec iov[MAX_BATCH];
    if (buffer == NULL)
        return PyErr_NoMemory();
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < max_count; i++) {
        iov[i].iov_base = buffer + (size_t)i * (size_t)max_bytes;
        iov[i].iov_len = (size_t)max_bytes;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    int n = recvmmsg(fd, msgs, (unsigned)max_count, MSG_DONTWAIT, NULL);
    PyObject *out = NULL;
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
        PyErr_SetFromErrno(PyExc_OSError);
    else if ((out = PyList_New(n < 0 ? 0 : n)) != NULL) {
        for (int i = 0; i < n; i++) {
            PyObject *d = PyBytes_FromStringAndSize((const char *)iov[i].iov_base,
                                                    (Py_ssize_t)msgs[i].msg_len);
            if (d == NULL) {
                Py_CLEAR(out);
                break;
            }
            PyList_SET_ITEM(out, i, d);
        }
    }
    PyMem_Free(buffer);
    return out;
}

/* send_batch(sock, datagrams) -> how many were sent (a connected socket; stops when it would block). */
static PyObject *
fp_send_batch(PyObject *module, PyObject *args)
{
    (void)module;
    PyObject *sock, *list;
    if (!PyArg_ParseTuple(args, "OO!:send_batch", &sock, &PyList_Type, &list))
        return NULL;
    int fd = PyObject_AsFileDescriptor(sock);
    if (fd < 0)
        return NULL;
    Py_ssize_t total = PyList_GET_SIZE(list), sent = 0;
    struct mmsghdr msgs[MAX_BATCH];
    struct iovec iov[MAX_BATCH];
    for (Py_ssize_t i = 0; i < total; i++) {
        if (!PyBytes_CheckExact(PyList_GET_ITEM(list, i))) {
            PyErr_SetString(PyExc_TypeError, "datagrams must be bytes");
            return NULL;
        }
    }
    while (sent < total) {
        int n = 0;
        for (Py_ssize_t i = sent; i < total && n < MAX_BATCH; i++, n++) {
            PyObject *d = PyList_GET_ITEM(list, i);
            memset(&msgs[n], 0, sizeof msgs[n]);
            iov[n].iov_base = PyBytes_AS_STRING(d);
            iov[n].iov_len = (size_t)PyBytes_GET_SIZE(d);
            msgs[n].msg_hdr.msg_iov = &iov[n];
            msgs[n].msg_hdr.msg_iovlen = 1;
        }
        int r = sendmmsg(fd, msgs, (unsigned)n, MSG_DONTWAIT);
        if (r < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            if (errno == EINTR)
                continue;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        sent += r;
        if (r < n)
            break;
    }
    return PyLong_FromSsize_t(sent);
}

static PyMethodDef fp_methods[] = {
    {"use_aead", fp_use_aead, METH_VARARGS,
     "use_aead(encrypt_address, decrypt_address): libsodium's ChaCha20-Poly1305 IETF functions"},
    {"recv_batch", fp_recv_batch, METH_VARARGS, NULL},
    {"send_batch", fp_send_batch, METH_VARARGS, NULL},
    {NULL},
};

static struct PyModuleDef fp_module = {
    PyModuleDef_HEAD_INIT, "_fastpath",
    "The serving fast path in C; the specification is _fastpath_py.py.", -1, fp_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__fastpath(void)
{
    if (PyType_Ready(&Cipher_Type) < 0 || PyType_Ready(&Entry_Type) < 0 ||
        PyType_Ready(&Responder_Type) < 0)
        return NULL;
    str_address = PyUnicode_InternFromString("address");
    str_encoded = PyUnicode_InternFromString("_encoded");
    str_encode = PyUnicode_InternFromString("encode");
    str_last_used = PyUnicode_InternFromString("last_used");
    str_touched = PyUnicode_InternFromString("touched");
    str_last_message = PyUnicode_InternFromString("last_message");
    if (!str_address || !str_encoded || !str_encode || !str_last_used || !str_touched ||
        !str_last_message)
        return NULL;
    PyObject *m = PyModule_Create(&fp_module);
    if (m == NULL)
        return NULL;
    REPLAYED = PyObject_CallNoArgs((PyObject *)&PyBaseObject_Type);
    if (REPLAYED == NULL || PyModule_AddObjectRef(m, "REPLAYED", REPLAYED) < 0 ||
        PyModule_AddObjectRef(m, "Cipher", (PyObject *)&Cipher_Type) < 0 ||
        PyModule_AddObjectRef(m, "Responder", (PyObject *)&Responder_Type) < 0 ||
        PyModule_AddIntConstant(m, "MAX_BATCH", MAX_BATCH) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
