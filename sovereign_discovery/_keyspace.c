/* The keyspace kernel in C.
 *
 * The executable specification is _keyspace_py.py: the same four functions, the same argument
 * checks in the same order, the same exception classes (ArgumentTypeError / ArgumentValueError
 * from sovereign_discovery.errors) and the same results. IDs are 160-bit big-endian unsigned
 * integers; XOR distance is Kademlia's metric (paper §2.1). A distance is held as three words
 * (hi: bytes 0..7, mid: bytes 8..15, lo: bytes 16..19) so comparing words in order compares the
 * 160-bit values.
 *
 * A table slot's ID is its contact's node_id attribute (node_id_at): read straight from the
 * object's __slots__ slot when its type allows (no Python code runs), else with PyObject_GetAttr.
 * That is the only place Python code may run during a call (a property, __getattr__, or a
 * collection it starts), and such code could change the contacts list or the sizes bytearray.
 * So closest_in_table reads sizes once, into its own copy, and the list is indexed afresh, its
 * length checked, at every use (IndexError, as the spec's contacts[slot] gives, if it shrank).
 * Elsewhere nothing calls back into Python between the argument checks and the result (errors
 * aside; see new_list). No Python object is kept after a call returns except the module state's
 * two cached exception classes and interned "node_id".
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h> /* T_OBJECT_EX, PY_AUDIT_READ (Python 3.11) */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ID_BYTES 20
#define ID_BITS 160
#define MAX_BUCKET_SIZE 255
/* Up to this many entries are ranked by insertion in a stack buffer; more are sorted by qsort. */
#define SMALL 64

typedef struct {
    PyObject *type_error;  /* sovereign_discovery.errors.ArgumentTypeError */
    PyObject *value_error; /* sovereign_discovery.errors.ArgumentValueError */
    PyObject *node_id;     /* the interned attribute name "node_id" */
} ks_state;

static inline ks_state *
get_state(PyObject *module)
{
    return (ks_state *)PyModule_GetState(module);
}

/* --- distances ------------------------------------------------------------------------------- */

/* Big-endian loads; GCC and Clang compile these to a load and a byte swap. */
static inline uint64_t
load_be64(const unsigned char *p)
{
    return ((uint64_t)p[0] << 56) | ((uint64_t)p[1] << 48) | ((uint64_t)p[2] << 40) |
           ((uint64_t)p[3] << 32) | ((uint64_t)p[4] << 24) | ((uint64_t)p[5] << 16) |
           ((uint64_t)p[6] << 8) | (uint64_t)p[7];
}

static inline uint32_t
load_be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) |
           (uint32_t)p[3];
}

static inline int
clz64(uint64_t x) /* x != 0 */
{
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_clzll(x);
#else
    int n = 0;
    while (!(x & ((uint64_t)1 << 63))) {
        x <<= 1;
        n++;
    }
    return n;
#endif
}

/* Length in bits of the common prefix of two IDs: 0..159, or 160 when equal. */
static int
common_prefix_bits(const unsigned char *a, const unsigned char *b)
{
    uint64_t x = load_be64(a) ^ load_be64(b);
    if (x)
        return clz64(x);
    x = load_be64(a + 8) ^ load_be64(b + 8);
    if (x)
        return 64 + clz64(x);
    x = (uint64_t)(load_be32(a + 16) ^ load_be32(b + 16)) << 32;
    if (x)
        return 128 + clz64(x);
    return ID_BITS;
}

/* An XOR distance with a tie-break index (the slot, or the position in the chosen order), so
 * the order is strict and total and equals Python's sort of (distance, index). */
typedef struct {
    uint64_t hi;
    uint64_t mid;
    uint32_t lo;
    Py_ssize_t idx;
} dkey;

/* The distance from `id` to the target whose words are in `t`, tagged with idx. */
static inline dkey
distance_to(const dkey *t, const unsigned char *id, Py_ssize_t idx)
{
    dkey d;
    d.hi = load_be64(id) ^ t->hi;
    d.mid = load_be64(id + 8) ^ t->mid;
    d.lo = load_be32(id + 16) ^ t->lo;
    d.idx = idx;
    return d;
}

static inline int
dkey_less(const dkey *a, const dkey *b)
{
    if (a->hi != b->hi)
        return a->hi < b->hi;
    if (a->mid != b->mid)
        return a->mid < b->mid;
    if (a->lo != b->lo)
        return a->lo < b->lo;
    return a->idx < b->idx;
}

static int
dkey_cmp(const void *a, const void *b)
{
    const dkey *x = (const dkey *)a, *y = (const dkey *)b;
    return dkey_less(x, y) ? -1 : dkey_less(y, x);
}

/* Offer d to best[0..*n), the k nearest so far, nearest first (insertion; k <= SMALL). */
static inline void
topk_offer(dkey *best, Py_ssize_t *n, Py_ssize_t k, const dkey *d)
{
    Py_ssize_t j = *n;
    if (j == k) {
        if (!dkey_less(d, &best[k - 1]))
            return;
        j--;
    }
    else {
        ++*n;
    }
    for (; j > 0 && dkey_less(d, &best[j - 1]); j--)
        best[j] = best[j - 1];
    best[j] = *d;
}

/* Sort d[0..n) nearest first: insertion when short, else qsort (the order is total). */
static void
dkey_sort(dkey *d, Py_ssize_t n)
{
    if (n > SMALL) {
        qsort(d, (size_t)n, sizeof(dkey), dkey_cmp);
        return;
    }
    for (Py_ssize_t i = 1; i < n; i++) {
        dkey v = d[i];
        Py_ssize_t j = i;
        for (; j > 0 && dkey_less(&v, &d[j - 1]); j--)
            d[j] = d[j - 1];
        d[j] = v;
    }
}

/* A list of n empty places. Creating an object may start a garbage collection, whose finalizers
 * could resize the lists and bytearrays we read; the collector is paused so that none runs. */
static PyObject *
new_list(Py_ssize_t n)
{
    int enabled = PyGC_Disable();
    PyObject *list = PyList_New(n);
    if (enabled)
        PyGC_Enable();
    return list;
}

/* result[pos + i] = items[ranked[i].idx] for i < k. */
static void
set_ranked(PyObject *result, Py_ssize_t pos, PyObject *items, const dkey *ranked, Py_ssize_t k)
{
    for (Py_ssize_t i = 0; i < k; i++) {
        PyObject *item = PyList_GET_ITEM(items, ranked[i].idx);
        Py_INCREF(item);
        PyList_SET_ITEM(result, pos + i, item);
    }
}

/* The list [items[slots[i]] for i < n], or NULL with IndexError if items has shrunk below a slot
 * (only Python code run by a node_id read can shrink it). */
static PyObject *
list_of_slots(PyObject *items, const Py_ssize_t *slots, Py_ssize_t n)
{
    PyObject *result = new_list(n);
    if (!result)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item;
        if (slots[i] >= PyList_GET_SIZE(items)) {
            Py_DECREF(result); /* its unset places are NULL, which list_dealloc skips */
            PyErr_SetString(PyExc_IndexError, "list index out of range");
            return NULL;
        }
        item = PyList_GET_ITEM(items, slots[i]);
        Py_INCREF(item);
        PyList_SET_ITEM(result, i, item);
    }
    return result;
}

/* --- argument checks (mirroring _keyspace_py, one by one) ------------------------------------ */

/* type(value).__name__ */
static const char *
type_name(PyObject *o)
{
    const char *name = Py_TYPE(o)->tp_name;
    const char *dot = strrchr(name, '.');
    return dot ? dot + 1 : name;
}

/* _check_id: bytes (subclasses too) of exactly ID_BYTES. */
static const unsigned char *
check_id(ks_state *st, PyObject *value, const char *name)
{
    if (!PyBytes_Check(value)) {
        PyErr_Format(st->type_error, "%s must be bytes (a NodeId), not %.200s", name,
                     type_name(value));
        return NULL;
    }
    if (PyBytes_GET_SIZE(value) != ID_BYTES) {
        PyErr_Format(st->value_error, "%s must be %d bytes long, not %zd", name, ID_BYTES,
                     PyBytes_GET_SIZE(value));
        return NULL;
    }
    return (const unsigned char *)PyBytes_AS_STRING(value);
}

/* _check_buffer: bytes or bytearray; gives its contents and length. */
static int
check_buffer(ks_state *st, PyObject *value, const char *name, const unsigned char **data,
             Py_ssize_t *len)
{
    if (PyBytes_Check(value)) {
        *data = (const unsigned char *)PyBytes_AS_STRING(value);
        *len = PyBytes_GET_SIZE(value);
        return 0;
    }
    if (PyByteArray_Check(value)) {
        *data = (const unsigned char *)PyByteArray_AS_STRING(value);
        *len = PyByteArray_GET_SIZE(value);
        return 0;
    }
    PyErr_Format(st->type_error, "%s must be bytes or bytearray, not %.200s", name,
                 type_name(value));
    return -1;
}

static int
check_list(ks_state *st, PyObject *value, const char *name)
{
    if (!PyList_Check(value)) {
        PyErr_Format(st->type_error, "%s must be a list, not %.200s", name, type_name(value));
        return -1;
    }
    return 0;
}

/* _check_int: an int (bool too). *out is the value clamped to Py_ssize_t, *sign its sign (-1, 0,
 * 1); ints beyond Py_ssize_t keep their sign, so "huge" behaves like "everything". */
static int
check_int(ks_state *st, PyObject *value, const char *name, Py_ssize_t *out, int *sign)
{
    int overflow;
    long long v;
    if (!PyLong_Check(value)) {
        PyErr_Format(st->type_error, "%s must be an int, not %.200s", name, type_name(value));
        return -1;
    }
    v = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (v == -1 && !overflow && PyErr_Occurred())
        return -1;
    if (overflow > 0 || (!overflow && v > (long long)PY_SSIZE_T_MAX)) {
        *out = PY_SSIZE_T_MAX;
        *sign = 1;
    }
    else if (overflow < 0 || v < -(long long)PY_SSIZE_T_MAX) {
        *out = -PY_SSIZE_T_MAX;
        *sign = -1;
    }
    else {
        *out = (Py_ssize_t)v;
        *sign = v > 0 ? 1 : v < 0 ? -1 : 0;
    }
    return 0;
}

static int
check_count(ks_state *st, PyObject *value, Py_ssize_t *count)
{
    int sign;
    if (check_int(st, value, "count", count, &sign) < 0)
        return -1;
    if (sign < 0) {
        PyErr_Format(st->value_error, "count must be >= 0, not %S", value);
        return -1;
    }
    return 0;
}

/* Where a type keeps node_id, for reading it straight from the object as PyObject_GetAttr would:
 * its offset when the type has the generic getattr and "node_id" is a plain __slots__ member
 * (Contact is a slotted dataclass), else -1. One call remembers the last type seen; Python code
 * (a getter on the generic path) may change types, so then it forgets. */
typedef struct {
    PyTypeObject *type;
    Py_ssize_t offset;
} id_reader;

static Py_ssize_t
slot_offset(ks_state *st, PyTypeObject *type)
{
    PyObject *descr;
    PyMemberDef *member;
    if (type->tp_getattro != PyObject_GenericGetAttr)
        return -1;
    descr = _PyType_Lookup(type, st->node_id); /* borrowed; no Python code runs */
    if (!descr || Py_TYPE(descr) != &PyMemberDescr_Type)
        return -1;
    member = ((PyMemberDescrObject *)descr)->d_member;
    if (member->type != T_OBJECT_EX || (member->flags & PY_AUDIT_READ))
        return -1;
    return member->offset;
}

/* _node_id_at: contacts[slot].node_id, which must be bytes of ID_BYTES; a new reference (the
 * caller DECREFs it), or NULL with the spec's error. Runs no Python code when read from a slot;
 * otherwise may (see the top). */
static PyObject *
node_id_at(ks_state *st, id_reader *reader, PyObject *contacts, Py_ssize_t slot)
{
    PyObject *contact, *node_id = NULL;
    if (slot >= PyList_GET_SIZE(contacts)) {
        PyErr_SetString(PyExc_IndexError, "list index out of range");
        return NULL;
    }
    contact = PyList_GET_ITEM(contacts, slot);
    if (Py_TYPE(contact) != reader->type) {
        reader->type = Py_TYPE(contact);
        reader->offset = slot_offset(st, reader->type);
    }
    if (reader->offset >= 0)
        node_id = *(PyObject **)((char *)contact + reader->offset); /* NULL: an empty slot */
    if (node_id)
        Py_INCREF(node_id);
    else {
        reader->type = NULL;
        Py_INCREF(contact); /* a getter could drop the list's reference */
        node_id = PyObject_GetAttr(contact, st->node_id);
        if (!node_id) {
            if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
                PyErr_Clear();
                PyErr_Format(st->type_error, "contacts[%zd] has no node_id (%.200s)", slot,
                             type_name(contact));
            }
            Py_DECREF(contact);
            return NULL;
        }
        Py_DECREF(contact);
    }
    if (!PyBytes_Check(node_id)) {
        PyErr_Format(st->type_error, "contacts[%zd].node_id must be bytes (a NodeId), not %.200s",
                     slot, type_name(node_id));
        Py_DECREF(node_id);
        return NULL;
    }
    if (PyBytes_GET_SIZE(node_id) != ID_BYTES) {
        PyErr_Format(st->value_error, "contacts[%zd].node_id must be %d bytes long, not %zd",
                     slot, ID_BYTES, PyBytes_GET_SIZE(node_id));
        Py_DECREF(node_id);
        return NULL;
    }
    return node_id;
}

/* _key_at: keys[index], which must be bytes of ID_BYTES. */
static inline const unsigned char *
key_at(ks_state *st, PyObject *keys, Py_ssize_t index)
{
    PyObject *key = PyList_GET_ITEM(keys, index);
    if (!PyBytes_Check(key)) {
        PyErr_Format(st->type_error, "keys[%zd] must be bytes, not %.200s", index, type_name(key));
        return NULL;
    }
    if (PyBytes_GET_SIZE(key) != ID_BYTES) {
        PyErr_Format(st->value_error, "keys[%zd] must be %d bytes long, not %zd", index, ID_BYTES,
                     PyBytes_GET_SIZE(key));
        return NULL;
    }
    return (const unsigned char *)PyBytes_AS_STRING(key);
}

/* --- positional / keyword arguments ----------------------------------------------------------- */

/* Collect the nparams arguments (positional or by keyword) into out[]; the first nrequired are
 * required, a missing optional one is NULL. The Python functions accept keywords too. The common
 * all-positional call is handled inline by callers. */
static int
unpack_args(const char *fname, const char *const *names, Py_ssize_t nrequired, Py_ssize_t nparams,
            PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, PyObject **out)
{
    Py_ssize_t i, j, nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs > nparams) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd positional arguments but %zd were given",
                     fname, nparams, nargs);
        return -1;
    }
    for (i = 0; i < nparams; i++)
        out[i] = i < nargs ? args[i] : NULL;
    for (j = 0; j < nkw; j++) {
        PyObject *kw = PyTuple_GET_ITEM(kwnames, j);
        for (i = 0; i < nparams; i++) {
            if (PyUnicode_Check(kw) && PyUnicode_CompareWithASCIIString(kw, names[i]) == 0)
                break;
        }
        if (i == nparams) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%S'", fname,
                         kw);
            return -1;
        }
        if (out[i] != NULL) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'", fname,
                         names[i]);
            return -1;
        }
        out[i] = args[nargs + j];
    }
    for (i = 0; i < nrequired; i++) {
        if (out[i] == NULL) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", fname,
                         names[i]);
            return -1;
        }
    }
    return 0;
}

/* The first nreq of the n parameters are required; out[i] is NULL for an optional one left out. */
#define UNPACK(fname, names, nreq, n, out)                                                    \
    do {                                                                                      \
        if (kwnames == NULL && nargs >= (nreq) && nargs <= (n)) {                             \
            for (Py_ssize_t i_ = 0; i_ < (n); i_++)                                           \
                (out)[i_] = i_ < nargs ? args[i_] : NULL;                                     \
        }                                                                                     \
        else if (unpack_args((fname), (names), (nreq), (n), args, nargs, kwnames, (out)) < 0) { \
            return NULL;                                                                      \
        }                                                                                     \
    } while (0)

/* --- bucket_index ---------------------------------------------------------------------------- */

PyDoc_STRVAR(bucket_index_doc,
             "bucket_index(local_id, node_id)\n--\n\n"
             "Length in bits of the common prefix of two IDs: 0..159, or 160 when they are equal.\n"
             "\n"
             "Kademlia puts a contact whose ID shares exactly i leading bits with the local\n"
             "ID into bucket i (paper \xc2\xa7" "2.2, in the shared-prefix form used by libp2p\n"
             "and discv5).");

static PyObject *
ks_bucket_index(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"local_id", "node_id"};
    ks_state *st = get_state(module);
    PyObject *a[2];
    const unsigned char *local_id, *node_id;
    UNPACK("bucket_index", names, 2, 2, a);
    if (!(local_id = check_id(st, a[0], "local_id")))
        return NULL;
    if (!(node_id = check_id(st, a[1], "node_id")))
        return NULL;
    return PyLong_FromLong(common_prefix_bits(local_id, node_id));
}

/* --- find_in_bucket -------------------------------------------------------------------------- */

PyDoc_STRVAR(find_in_bucket_doc,
             "find_in_bucket(contacts, first_slot, slot_count, node_id)\n--\n\n"
             "The slot in first_slot .. first_slot + slot_count - 1 whose contact's node_id is\n"
             "node_id, or -1. Each contact read is checked, up to the match.");

static PyObject *
ks_find_in_bucket(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"contacts", "first_slot", "slot_count", "node_id"};
    ks_state *st = get_state(module);
    PyObject *a[4], *contacts;
    const unsigned char *node_id;
    Py_ssize_t first, count, slots;
    int first_sign, count_sign;
    UNPACK("find_in_bucket", names, 4, 4, a);
    if (check_list(st, a[0], "contacts") < 0)
        return NULL;
    contacts = a[0];
    if (check_int(st, a[1], "first_slot", &first, &first_sign) < 0)
        return NULL;
    if (check_int(st, a[2], "slot_count", &count, &count_sign) < 0)
        return NULL;
    if (!(node_id = check_id(st, a[3], "node_id")))
        return NULL;
    /* first + count > len(contacts), without overflow */
    slots = PyList_GET_SIZE(contacts);
    if (first_sign < 0 || count_sign < 0 || first > slots || count > slots - first) {
        PyErr_Format(st->value_error,
                     "first_slot %S and slot_count %S exceed contacts (%zd items)", a[1], a[2],
                     slots);
        return NULL;
    }
    /* node_id is an argument, so the caller holds it even if a getter runs */
    id_reader reader = {NULL, -1};
    for (Py_ssize_t slot = first; slot < first + count; slot++) {
        PyObject *id = node_id_at(st, &reader, contacts, slot);
        int equal;
        if (!id)
            return NULL;
        equal = memcmp(PyBytes_AS_STRING(id), node_id, ID_BYTES) == 0;
        Py_DECREF(id);
        if (equal)
            return PyLong_FromSsize_t(slot);
    }
    return PyLong_FromLong(-1);
}

/* --- closest_in_table ------------------------------------------------------------------------ */

/* Append to chosen[0..k) the slots of the k nearest occupied slots of buckets [lo, hi), ranked by
 * (distance, slot); k <= `occupied`, the number of occupied slots there. Reads (and checks) every
 * occupied slot's node_id there, in slot order, as the spec does. */
static int
take_nearest(ks_state *st, Py_ssize_t *chosen, PyObject *contacts, const unsigned char *sizes,
             Py_ssize_t bucket_size, Py_ssize_t lo, Py_ssize_t hi, const dkey *t, Py_ssize_t k,
             Py_ssize_t occupied)
{
    dkey stack[SMALL], *best = stack;
    Py_ssize_t n = 0;
    int rc = -1;
    id_reader reader = {NULL, -1};
    if (k > SMALL && !(best = (dkey *)PyMem_Malloc((size_t)occupied * sizeof(dkey)))) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t b = lo; b < hi; b++) {
        for (Py_ssize_t slot = b * bucket_size, end = slot + sizes[b]; slot < end; slot++) {
            PyObject *id = node_id_at(st, &reader, contacts, slot);
            dkey d;
            if (!id)
                goto done;
            d = distance_to(t, (const unsigned char *)PyBytes_AS_STRING(id), slot);
            Py_DECREF(id);
            if (best == stack)
                topk_offer(best, &n, k, &d);
            else
                best[n++] = d;
        }
    }
    if (best != stack)
        dkey_sort(best, n);
    for (Py_ssize_t i = 0; i < k; i++)
        chosen[i] = best[i].idx;
    rc = 0;
done:
    if (best != stack)
        PyMem_Free(best);
    return rc;
}

PyDoc_STRVAR(closest_in_table_doc,
             "closest_in_table(contacts, sizes, bucket_size, local_id, target, count, "
             "prefixes=None)\n--\n\n"
             "The count occupied slots' objects closest to target by XOR, nearest first.\n\n"
             "Slot s's ID is contacts[s].node_id. Bucket i has prefix length p(i) = prefixes[i]\n"
             "(bytes: non-decreasing, below 160, the last greater than every other), or i when\n"
             "prefixes is None. With P = p(last) and j = min(common_prefix(local_id, target),\n"
             "P), the buckets are ranked in groups: those of prefix j, then all of prefix > j\n"
             "together, then those of prefix j-1, j-2, ... 0; within a group by (distance,\n"
             "slot), until count are chosen. For a routing table's layout (buckets of several\n"
             "prefix lengths: exactly p(i) bits shared with local_id, the last at least P) that\n"
             "is the full scan sorted by distance.");

/* _check_prefixes, in one pass over prefixes[0..n): each below ID_BITS and not below the one
 * before, the last greater than the one before it. Also counts *near, the buckets of prefix < j,
 * and *far, those of prefix <= j: as prefixes are sorted, the buckets of prefix j are
 * [*near, *far) and those of prefix > j are [*far, n). */
static int
check_prefixes(ks_state *st, const unsigned char *prefixes, Py_ssize_t n, Py_ssize_t j,
               Py_ssize_t *near, Py_ssize_t *far)
{
    Py_ssize_t below = 0, upto = 0;
    for (Py_ssize_t b = 0; b < n; b++) {
        int prefix = prefixes[b];
        if (prefix >= ID_BITS) {
            PyErr_Format(st->value_error, "prefixes[%zd] is %d, not below %d", b, prefix,
                         ID_BITS);
            return -1;
        }
        if (b > 0 && prefix < prefixes[b - 1]) {
            PyErr_Format(st->value_error,
                         "prefixes must be non-decreasing: prefixes[%zd] is %d after %d", b,
                         prefix, (int)prefixes[b - 1]);
            return -1;
        }
        below += prefix < j;
        upto += prefix <= j;
    }
    if (n > 1 && prefixes[n - 1] == prefixes[n - 2]) {
        PyErr_Format(st->value_error,
                     "the last bucket's prefix must be greater than every other's: "
                     "prefixes[%zd] is %d, as is prefixes[%zd]",
                     n - 1, (int)prefixes[n - 1], n - 2);
        return -1;
    }
    *near = below;
    *far = upto;
    return 0;
}

static PyObject *
ks_closest_in_table(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"contacts", "sizes",  "bucket_size", "local_id",
                                        "target",   "count",  "prefixes"};
    ks_state *st = get_state(module);
    PyObject *a[7], *contacts, *result = NULL;
    const unsigned char *sizes_arg, *prefixes_arg = NULL, *local_id, *target;
    /* our copies of sizes and, after them, prefixes */
    unsigned char copy_stack[512], *sizes = copy_stack, *prefixes = NULL;
    Py_ssize_t chosen_stack[SMALL], *chosen = chosen_stack;
    Py_ssize_t nbuckets, nprefixes, bucket_size, count, total, b, j, near, far, lo, hi, copied;
    Py_ssize_t filled = 0;
    int sign, stage;
    dkey t;

    UNPACK("closest_in_table", names, 6, 7, a);
    /* _check_table */
    if (check_list(st, a[0], "contacts") < 0)
        return NULL;
    contacts = a[0];
    if (check_buffer(st, a[1], "sizes", &sizes_arg, &nbuckets) < 0)
        return NULL;
    if (check_int(st, a[2], "bucket_size", &bucket_size, &sign) < 0)
        return NULL;
    if (bucket_size < 1 || bucket_size > MAX_BUCKET_SIZE) {
        PyErr_Format(st->value_error, "bucket_size must be in 1..%d, not %S", MAX_BUCKET_SIZE,
                     a[2]);
        return NULL;
    }
    if (!(local_id = check_id(st, a[3], "local_id")))
        return NULL;
    if (!(target = check_id(st, a[4], "target")))
        return NULL;
    if (check_count(st, a[5], &count) < 0)
        return NULL;
    /* _check_capacity: len(contacts) < len(sizes) * bucket_size, without overflow */
    if (nbuckets > PyList_GET_SIZE(contacts) / bucket_size) {
        /* the size needed may exceed Py_ssize_t: print it as a Python int, as the spec does */
        PyObject *needed = NULL, *n_obj = PyLong_FromSsize_t(nbuckets);
        PyObject *k_obj = PyLong_FromSsize_t(bucket_size);
        if (n_obj && k_obj)
            needed = PyNumber_Multiply(n_obj, k_obj);
        Py_XDECREF(n_obj);
        Py_XDECREF(k_obj);
        if (needed) {
            PyErr_Format(st->value_error, "contacts holds %zd items, the layout needs %S",
                         PyList_GET_SIZE(contacts), needed);
            Py_DECREF(needed);
        }
        return NULL;
    }
    total = 0;
    for (b = 0; b < nbuckets; b++) {
        if (sizes_arg[b] > bucket_size) {
            PyErr_Format(st->value_error, "sizes has a bucket of %d > bucket_size %zd",
                         (int)sizes_arg[b], bucket_size);
            return NULL;
        }
        total += sizes_arg[b];
    }
    /* The first group is the buckets of prefix j, [near, far); then those of prefix > j,
     * [far, nbuckets). Without prefixes bucket b has prefix b. */
    j = common_prefix_bits(local_id, target);
    if (a[6] == NULL || a[6] == Py_None) {
        if (j > nbuckets - 1)
            j = nbuckets - 1;
        near = j;
        far = j + 1;
    }
    else {
        /* _check_prefixes */
        if (check_buffer(st, a[6], "prefixes", &prefixes_arg, &nprefixes) < 0)
            return NULL;
        if (nprefixes != nbuckets) {
            PyErr_Format(st->value_error, "prefixes has %zd entries but sizes has %zd",
                         nprefixes, nbuckets);
            return NULL;
        }
        if (nbuckets > 0 && j > prefixes_arg[nbuckets - 1])
            j = prefixes_arg[nbuckets - 1];
        if (check_prefixes(st, prefixes_arg, nbuckets, j, &near, &far) < 0)
            return NULL;
    }
    if (count > total)
        count = total;
    if (count == 0)
        return new_list(0);
    /* Our own copies: a node_id getter could resize the bytearrays (see the top). */
    copied = prefixes_arg ? 2 * nbuckets : nbuckets;
    if (copied > (Py_ssize_t)sizeof(copy_stack) &&
        !(sizes = (unsigned char *)PyMem_Malloc((size_t)copied))) {
        PyErr_NoMemory();
        return NULL;
    }
    memcpy(sizes, sizes_arg, (size_t)nbuckets);
    if (prefixes_arg) {
        prefixes = sizes + nbuckets;
        memcpy(prefixes, prefixes_arg, (size_t)nbuckets);
    }
    if (count > SMALL &&
        !(chosen = (Py_ssize_t *)PyMem_Malloc((size_t)count * sizeof(Py_ssize_t)))) {
        PyErr_NoMemory();
        goto done;
    }

    /* The groups: [near, far) (prefix j), [far, nbuckets) (prefix > j), then below near one
     * group per prefix length, deepest first (without prefixes: one bucket each). */
    t.hi = load_be64(target);
    t.mid = load_be64(target + 8);
    t.lo = load_be32(target + 16);
    lo = near;
    hi = far;
    stage = 0;
    while (filled < count) {
        Py_ssize_t occupied = 0, k;
        for (b = lo; b < hi; b++)
            occupied += sizes[b];
        k = count - filled < occupied ? count - filled : occupied;
        if (k > 0 && take_nearest(st, chosen + filled, contacts, sizes, bucket_size, lo, hi, &t,
                                  k, occupied) < 0)
            goto done;
        filled += k;
        if (stage == 0) { /* after prefix j: all of prefix > j */
            lo = far, hi = nbuckets;
            stage = 1;
        }
        else if (near > 0) { /* the run of buckets of the prefix just below */
            hi = near;
            lo = hi - 1;
            if (prefixes)
                while (lo > 0 && prefixes[lo - 1] == prefixes[hi - 1])
                    lo--;
            near = lo;
        }
        else
            break;
    }
    result = list_of_slots(contacts, chosen, filled);
done:
    if (sizes != copy_stack)
        PyMem_Free(sizes);
    if (chosen != chosen_stack)
        PyMem_Free(chosen);
    return result;
}

/* --- closest_in_sorted ----------------------------------------------------------------------- */

PyDoc_STRVAR(closest_in_sorted_doc,
             "closest_in_sorted(keys, values, target, count)\n--\n\n"
             "The count values whose keys are closest to target by XOR, nearest first.\n\n"
             "keys is a list of distinct 20-byte IDs in ascending order and values the parallel\n"
             "list. Descends the binary trie that the sorted keys form, O(log\xc2\xb2 n) key\n"
             "reads; only keys that the search reads are checked.");

static PyObject *
ks_closest_in_sorted(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                     PyObject *kwnames)
{
    static const char *const names[] = {"keys", "values", "target", "count"};
    ks_state *st = get_state(module);
    PyObject *a[4], *keys, *values, *result = NULL;
    const unsigned char *target;
    Py_ssize_t count, nkeys, need, total, lo, hi, nchosen = 0;
    Py_ssize_t chosen_stack[SMALL], *chosen = chosen_stack;
    dkey dist_stack[SMALL], *dist = dist_stack, t;

    UNPACK("closest_in_sorted", names, 4, 4, a);
    if (check_list(st, a[0], "keys") < 0)
        return NULL;
    if (check_list(st, a[1], "values") < 0)
        return NULL;
    keys = a[0];
    values = a[1];
    if (!(target = check_id(st, a[2], "target")))
        return NULL;
    if (check_count(st, a[3], &count) < 0)
        return NULL;
    nkeys = PyList_GET_SIZE(keys);
    if (PyList_GET_SIZE(values) != nkeys) {
        PyErr_Format(st->value_error, "values has %zd items but keys has %zd",
                     PyList_GET_SIZE(values), nkeys);
        return NULL;
    }
    need = count < nkeys ? count : nkeys;
    if (need == 0)
        return PyList_New(0);
    total = need; /* the search below picks exactly `need` indices */
    if (total > SMALL) {
        chosen = (Py_ssize_t *)PyMem_Malloc((size_t)total * sizeof(Py_ssize_t));
        dist = (dkey *)PyMem_Malloc((size_t)total * sizeof(dkey));
        if (!chosen || !dist) {
            PyErr_NoMemory();
            goto done;
        }
    }

    /* The spec's descent: in [lo, hi) the keys share their first `depth` bits; the half whose
     * bit `depth` equals the target's is nearer than the other; take it whole if that is not
     * enough and continue in the other half, else continue in it. Same reads, same order. */
    lo = 0;
    hi = nkeys;
    while (need > 0) {
        const unsigned char *first, *last;
        Py_ssize_t left, right, near_lo, near_hi, far_lo, far_hi;
        int depth, byte;
        unsigned char mask;
        if (hi - lo <= need) {
            for (Py_ssize_t i = lo; i < hi; i++)
                chosen[nchosen++] = i;
            break;
        }
        if (!(first = key_at(st, keys, lo)) || !(last = key_at(st, keys, hi - 1)))
            goto done;
        depth = common_prefix_bits(first, last);
        if (depth >= ID_BITS) {
            PyErr_Format(st->value_error, "keys must be distinct (keys[%zd] == keys[%zd])", lo,
                         hi - 1);
            goto done;
        }
        byte = depth >> 3;
        mask = (unsigned char)(0x80u >> (depth & 7));
        /* first index whose bit `depth` is 1; keys[lo] has it 0 and keys[hi - 1] has it 1 */
        left = lo + 1;
        right = hi - 1;
        while (left < right) {
            Py_ssize_t middle = (left + right) >> 1;
            const unsigned char *key = key_at(st, keys, middle);
            if (!key)
                goto done;
            if (key[byte] & mask)
                right = middle;
            else
                left = middle + 1;
        }
        if (target[byte] & mask) {
            near_lo = left, near_hi = hi, far_lo = lo, far_hi = left;
        }
        else {
            near_lo = lo, near_hi = left, far_lo = left, far_hi = hi;
        }
        if (near_hi - near_lo >= need) {
            lo = near_lo;
            hi = near_hi;
        }
        else {
            for (Py_ssize_t i = near_lo; i < near_hi; i++)
                chosen[nchosen++] = i;
            need -= near_hi - near_lo;
            lo = far_lo;
            hi = far_hi;
        }
    }

    /* Rank the chosen keys by distance; ties (only possible with duplicate keys the search did
     * not compare) keep the chosen order, like Python's stable sort. Every key read is checked,
     * as in the spec (and as memory safety requires). */
    t.hi = load_be64(target);
    t.mid = load_be64(target + 8);
    t.lo = load_be32(target + 16);
    for (Py_ssize_t i = 0; i < nchosen; i++) {
        const unsigned char *key = key_at(st, keys, chosen[i]);
        if (!key)
            goto done;
        dist[i] = distance_to(&t, key, i); /* tie-break: position in the chosen order */
    }
    dkey_sort(dist, nchosen);
    for (Py_ssize_t i = 0; i < nchosen; i++)
        dist[i].idx = chosen[dist[i].idx];
    if ((result = new_list(nchosen)))
        set_ranked(result, 0, values, dist, nchosen);
done:
    if (chosen != chosen_stack)
        PyMem_Free(chosen);
    if (dist != dist_stack)
        PyMem_Free(dist);
    return result;
}

/* --- module ---------------------------------------------------------------------------------- */

static PyMethodDef ks_methods[] = {
    {"bucket_index", (PyCFunction)(void (*)(void))ks_bucket_index, METH_FASTCALL | METH_KEYWORDS,
     bucket_index_doc},
    {"find_in_bucket", (PyCFunction)(void (*)(void))ks_find_in_bucket,
     METH_FASTCALL | METH_KEYWORDS, find_in_bucket_doc},
    {"closest_in_table", (PyCFunction)(void (*)(void))ks_closest_in_table,
     METH_FASTCALL | METH_KEYWORDS, closest_in_table_doc},
    {"closest_in_sorted", (PyCFunction)(void (*)(void))ks_closest_in_sorted,
     METH_FASTCALL | METH_KEYWORDS, closest_in_sorted_doc},
    {NULL, NULL, 0, NULL},
};

static int
ks_exec(PyObject *module)
{
    ks_state *st = get_state(module);
    PyObject *errors = PyImport_ImportModule("sovereign_discovery.errors");
    PyObject *all;
    if (!errors)
        return -1;
    st->type_error = PyObject_GetAttrString(errors, "ArgumentTypeError");
    st->value_error = st->type_error ? PyObject_GetAttrString(errors, "ArgumentValueError") : NULL;
    Py_DECREF(errors);
    if (!st->value_error)
        return -1;
    if (!PyExceptionClass_Check(st->type_error) || !PyExceptionClass_Check(st->value_error)) {
        PyErr_SetString(PyExc_ImportError,
                        "sovereign_discovery.errors.ArgumentTypeError/ArgumentValueError are not "
                        "exception classes");
        return -1;
    }
    if (!(st->node_id = PyUnicode_InternFromString("node_id")))
        return -1;
    if (PyModule_AddIntConstant(module, "ID_BYTES", ID_BYTES) < 0 ||
        PyModule_AddIntConstant(module, "ID_BITS", ID_BITS) < 0 ||
        PyModule_AddIntConstant(module, "MAX_BUCKET_SIZE", MAX_BUCKET_SIZE) < 0)
        return -1;
    all = Py_BuildValue("[ssss]", "bucket_index", "find_in_bucket", "closest_in_table",
                        "closest_in_sorted");
    if (!all || PyModule_AddObject(module, "__all__", all) < 0) {
        Py_XDECREF(all);
        return -1;
    }
    return 0;
}

static int
ks_traverse(PyObject *module, visitproc visit, void *arg)
{
    ks_state *st = get_state(module);
    Py_VISIT(st->type_error);
    Py_VISIT(st->value_error);
    Py_VISIT(st->node_id);
    return 0;
}

static int
ks_clear(PyObject *module)
{
    ks_state *st = get_state(module);
    Py_CLEAR(st->type_error);
    Py_CLEAR(st->value_error);
    Py_CLEAR(st->node_id);
    return 0;
}

static void
ks_free(void *module)
{
    ks_clear((PyObject *)module);
}

static PyModuleDef_Slot ks_slots[] = {
    {Py_mod_exec, (void *)ks_exec},
    {0, NULL},
};

PyDoc_STRVAR(ks_doc,
             "The keyspace kernel in C: bucket_index, find_in_bucket, closest_in_table and\n"
             "closest_in_sorted over 160-bit big-endian IDs and XOR distance (Kademlia\n"
             "\xc2\xa7" "2.1).\n"
             "\n"
             "sovereign_discovery._keyspace_py is its executable specification: same functions,\n"
             "same argument checks in the same order, same exception classes, same results.");

static struct PyModuleDef ks_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "sovereign_discovery._keyspace",
    .m_doc = ks_doc,
    .m_size = sizeof(ks_state),
    .m_methods = ks_methods,
    .m_slots = ks_slots,
    .m_traverse = ks_traverse,
    .m_clear = ks_clear,
    .m_free = ks_free,
};

PyMODINIT_FUNC
PyInit__keyspace(void)
{
    return PyModuleDef_Init(&ks_module);
}
