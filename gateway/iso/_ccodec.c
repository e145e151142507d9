/*
 * gateway.iso._ccodec: the compiled codec. Exactly what gateway.iso.codec.PureCodec does (pyiso8583's
 * field walking plus our checks), in one pass over the bytes, for every field property a dialect TOML
 * can declare. PureCodec is the specification and the oracle (tests/test_codec_differential.py); when
 * this file and it disagree, this file is wrong.
 *
 * The per-field tables are prepared in Python (gateway/iso/codec.py, `_compiled_fields`), so this
 * file reads no TOML and no spec dicts. Text encodings other than "ascii" and "latin-1" go through the
 * same CPython codec calls pyiso8583 makes (bytes.decode / str.encode), so they behave identically by
 * construction. A few inputs that cannot occur with well-typed data are handed to the pure codec
 * instead of being re-implemented here ("delegate"): values or keys that are not exactly `str`,
 * fields that are not exactly a dict, messages that are not exactly a Message, and lone surrogates in
 * a checked field (the pure codec's `.encode()` raises on them). The pure codec then gives the exact
 * pure answer.
 *
 * Untrusted input: every length read from the wire is checked against the bytes that remain before
 * anything is read at it; field lengths are bounded by the dialect's max_len (<= 99,999) before use.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

#ifndef GATEWAY_CCODEC_SOURCE_HASH
#define GATEWAY_CCODEC_SOURCE_HASH ""
#endif

#define MAX_FIELD 128
#define MTI_TABLE 10000

/* how a length prefix is encoded */
enum { LEN_FIXED = 0, LEN_BIN = 1, LEN_BCD = 2, LEN_ASCII = 3, LEN_TEXT = 4 };
/* how field data is encoded; DATA_ASCII_SUPERSET: a CPython codec that is plain ASCII for ASCII-only
 * data (gbk, utf-8, cp1252, ...), so ASCII-only data skips the codec call */
enum { DATA_BIN = 0, DATA_ASCII = 1, DATA_LATIN1 = 2, DATA_TEXT = 3, DATA_ASCII_SUPERSET = 4 };
/* which of our checks applies (one per fmt; "an"/"ans" have none) */
enum { CHECK_NONE = 0, CHECK_NUMERIC = 1, CHECK_TRACK = 2, CHECK_HEX = 3, CHECK_XN = 4 };
#define SECURITY_FIELD 53 /* 53.3 == '1': tracks are TDK-encrypted, any upper-case hex is valid */

typedef struct {
    int defined;
    PyObject *key;        /* "2".."128" */
    int len_type;         /* 0..4 prefix bytes */
    int len_kind;         /* LEN_* */
    PyObject *len_enc;    /* encoding name (str) for LEN_TEXT */
    const char *len_enc_c;  /* its UTF-8, owned by len_enc */
    long max_len;
    int nibbles;          /* len_count = "nibbles" */
    char left_pad;        /* 0 or the pad nibble character */
    char right_pad;
    int data_kind;        /* DATA_* */
    PyObject *data_enc;   /* encoding name (str) for DATA_TEXT */
    const char *data_enc_c;
    int check;            /* CHECK_* */
    int ascii_len_check;  /* PureCodec._ascii_lengths: the prefix must be ASCII digits */
    int track_bcd;        /* a z field in BCD: '=' is sent as nibble D */
} FieldSpec;

typedef struct {
    PyObject_HEAD
    int ready;               /* set as the last step of a successful __init__: nothing runs before */
    PyObject *pure;          /* the PureCodec with the same dialect and options (delegate, oracle) */
    PyObject *message_type;  /* gateway.iso.message.Message */
    PyObject *error_type;    /* gateway.iso.errors.CodecError */
    PyObject *dialect_name;
    PyObject *mti_decode;    /* dict: wire bytes -> MTI str as pyiso8583 decodes it */
    PyObject *mti_encode;    /* dict: MTI str -> wire bytes */
    PyObject *empty;         /* "" */
    PyObject *key_p, *key_1, *key_t;
    PyObject *mti_by_number[MTI_TABLE]; /* borrowed from mti_decode; fast path when mti_fast */
    int mti_fast;            /* wire MTIs are BCD (binary) or ASCII digits: index by their value */
    int mti_binary;
    Py_ssize_t mti_len;      /* 2 (BCD) or 4 */
    int bitmap_binary;
    Py_ssize_t bitmap_len;   /* 8 (binary) or 16 (hex text) */
    int secondary;           /* the dialect has a secondary bitmap */
    int lenient;             /* xn: any sign character */
    uint64_t bad_primary;    /* bits of fields 1..64 that the dialect does not define (bit 1: no secondary) */
    uint64_t bad_secondary;
    PyObject *member_mti, *member_fields; /* Message's slot descriptors */
    FieldSpec fields[MAX_FIELD + 1];
} CodecObject;

static const char HEX_UPPER[] = "0123456789ABCDEF";

/* ------------------------------------------------------------------------------------------------ */
/* errors                                                                                            */

/* Raise CodecError(reason, field=field, offset=offset). `reason` is stolen; NULL means an error is
 * already set (e.g. MemoryError while formatting). offset < 0 means None. */
static void
codec_error(CodecObject *self, PyObject *reason, PyObject *field, Py_ssize_t offset)
{
    PyObject *args = NULL, *kwargs = NULL, *off = NULL, *exc = NULL;
    if (reason == NULL)
        return;
    args = PyTuple_Pack(1, reason);
    kwargs = PyDict_New();
    if (args == NULL || kwargs == NULL)
        goto done;
    if (field != NULL && PyDict_SetItemString(kwargs, "field", field) < 0)
        goto done;
    if (offset >= 0) {
        off = PyLong_FromSsize_t(offset);
        if (off == NULL || PyDict_SetItemString(kwargs, "offset", off) < 0)
            goto done;
    }
    exc = PyObject_Call(self->error_type, args, kwargs);
    if (exc != NULL)
        PyErr_SetObject(self->error_type, exc);
done:
    Py_DECREF(reason);
    Py_XDECREF(args);
    Py_XDECREF(kwargs);
    Py_XDECREF(off);
    Py_XDECREF(exc);
}

/* Map a failed codec call the way pyiso8583 does: LookupError -> `lookup`, any other Exception ->
 * `other`; anything that is not an Exception (KeyboardInterrupt, ...) propagates. Returns the reason
 * (new ref) or NULL with the original error still set. */
static PyObject *
codec_call_reason(const char *lookup, const char *other)
{
    if (PyErr_ExceptionMatches(PyExc_LookupError)) {
        PyErr_Clear();
        return PyUnicode_FromString(lookup);
    }
    if (PyErr_ExceptionMatches(PyExc_Exception)) {
        PyErr_Clear();
        return PyUnicode_FromString(other);
    }
    return NULL;
}

static const char *
count_name(const FieldSpec *fs)
{
    return fs->nibbles ? "nibbles" : "bytes";
}

/* ------------------------------------------------------------------------------------------------ */
/* character classes on str values                                                                   */

static int
has_surrogate(PyObject *s)
{
    Py_ssize_t i, n = PyUnicode_GET_LENGTH(s);
    int kind = PyUnicode_KIND(s);
    const void *data = PyUnicode_DATA(s);
    if (kind == PyUnicode_1BYTE_KIND)
        return 0;
    for (i = 0; i < n; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        if (c >= 0xD800 && c <= 0xDFFF)
            return 1;
    }
    return 0;
}

/* character classes as bit masks of a 128-entry table (ASCII only; anything else is in no class) */
enum { CLASS_DIGIT = 1, CLASS_TRACK = 2, CLASS_HEX = 4 };
static unsigned char char_class[128];

static void
init_char_classes(void)
{
    const char *c;
    for (c = "0123456789"; *c; c++)
        char_class[(unsigned char)*c] |= CLASS_DIGIT | CLASS_TRACK | CLASS_HEX;
    for (c = "D="; *c; c++)
        char_class[(unsigned char)*c] |= CLASS_TRACK;
    for (c = "ABCDEF"; *c; c++)
        char_class[(unsigned char)*c] |= CLASS_HEX;
}

/* Every character is in the class (digits, track characters "0-9 D =", upper-case hex); the empty
 * string passes. */
static int
all_in(PyObject *s, int allowed)
{
    Py_ssize_t i, n;
    const Py_UCS1 *p;
    if (!PyUnicode_IS_ASCII(s))
        return 0;
    n = PyUnicode_GET_LENGTH(s);
    p = PyUnicode_1BYTE_DATA(s);
    for (i = 0; i < n; i++) {
        if (!(char_class[p[i]] & allowed)) /* ASCII: p[i] < 128 */
            return 0;
    }
    return 1;
}

static int
all_digits_from(PyObject *s, Py_ssize_t start)
{
    Py_ssize_t i, n;
    const Py_UCS1 *p;
    if (!PyUnicode_IS_ASCII(s))
        return 0;
    n = PyUnicode_GET_LENGTH(s);
    p = PyUnicode_1BYTE_DATA(s);
    for (i = start; i < n; i++) {
        if (p[i] < '0' || p[i] > '9')
            return 0;
    }
    return 1;
}

#define DIGITS CLASS_DIGIT
#define TRACK_CHARS CLASS_TRACK
#define HEX_CHARS CLASS_HEX

/* PureCodec._signed_amount: 'C'/'D' then digits (lenient: any first character), at least 2 chars */
static int
signed_amount_ok(PyObject *v, int lenient)
{
    Py_UCS4 c;
    if (PyUnicode_GET_LENGTH(v) <= 1)
        return 0;
    c = PyUnicode_READ_CHAR(v, 0);
    if (!lenient && c != 'C' && c != 'D')
        return 0;
    /* value[1:] must be ASCII digits; a non-ASCII first character does not make the rest non-ASCII */
    if (PyUnicode_IS_ASCII(v))
        return all_digits_from(v, 1);
    {
        Py_ssize_t i, n = PyUnicode_GET_LENGTH(v);
        for (i = 1; i < n; i++) {
            c = PyUnicode_READ_CHAR(v, i);
            if (c < '0' || c > '9')
                return 0;
        }
        return 1;
    }
}

/* PureCodec._encrypted_track: field 53 position 3 is '1' and the track is upper-case hex */
static int
encrypted_track(PyObject *security, PyObject *track)
{
    if (security == NULL || PyUnicode_GET_LENGTH(security) < 3 || PyUnicode_READ_CHAR(security, 2) != '1')
        return 0;
    return all_in(track, HEX_CHARS);
}

/* The group checks of PureCodec (numeric, tracks, hex text): values[] in field order.
 * Returns 1 when every value is made of `allowed`, 0 when one is not, -1 when a value holds a lone
 * surrogate (the pure codec's "".join(...).encode() raises there: delegate). */
static int
group_ok(PyObject **values, int count, int allowed)
{
    int i, ok = 1;
    for (i = 0; i < count; i++) {
        if (!PyUnicode_IS_ASCII(values[i])) {
            if (has_surrogate(values[i]))
                return -1;
            ok = 0;
        } else if (ok && !all_in(values[i], allowed)) {
            ok = 0;
        }
    }
    return ok;
}

/* str.upper() of a value that is not plain upper-case hex (new ref) */
static PyObject *
upper(PyObject *v)
{
    return PyObject_CallMethod(v, "upper", NULL);
}

/* ------------------------------------------------------------------------------------------------ */
/* bitmaps                                                                                           */

/* hex digit value of a byte (either case), 0xFF for anything else */
static unsigned char hex_value[256];

/* a byte as its two upper-case hex characters */
static char hex_pair[256][2];

static void
init_hex_values(void)
{
    int c;
    for (c = 0; c < 256; c++) {
        hex_pair[c][0] = HEX_UPPER[c >> 4];
        hex_pair[c][1] = HEX_UPPER[c & 0xF];
    }
    memset(hex_value, 0xFF, sizeof hex_value);
    for (c = 0; c < 10; c++)
        hex_value['0' + c] = (unsigned char)c;
    for (c = 0; c < 6; c++)
        hex_value['A' + c] = hex_value['a' + c] = (unsigned char)(10 + c);
}

static int
hex_nibble(unsigned char c)
{
    return hex_value[c] == 0xFF ? -1 : hex_value[c];
}

/* PureCodec._bitmap_word: one 64-bit bitmap word at `start`, or -1 with CodecError set.
 * Hex text is read the way the pure codec reads it, `raw.isalnum() and int(raw, 16)`, and int() takes
 * a "0x" prefix: such a word passes the pure codec's check (*prefixed = 1) and then fails in
 * pyiso8583's bytes.fromhex(), which the caller reports after the bit checks. */
static int
bitmap_word(CodecObject *self, const unsigned char *s, Py_ssize_t n, Py_ssize_t start, PyObject *field,
            uint64_t *word, int *prefixed)
{
    Py_ssize_t i, avail = n - start, first = 0;
    uint64_t w = 0;
    *prefixed = 0;
    if (avail < self->bitmap_len) {
        codec_error(self,
                    PyUnicode_FromFormat("bitmap is %zd bytes, expecting %zd", avail < 0 ? 0 : avail,
                                         self->bitmap_len),
                    field, start);
        return -1;
    }
    if (self->bitmap_binary) {
        for (i = 0; i < 8; i++)
            w = (w << 8) | s[start + i];
    } else {
        if (s[start] == '0' && (s[start + 1] == 'x' || s[start + 1] == 'X')) {
            first = 2;
            *prefixed = 1;
        }
        for (i = first; i < 16; i++) {
            int v = hex_nibble(s[start + i]);
            if (v < 0) {
                codec_error(self, PyUnicode_FromString("bitmap is not hexadecimal"), field, start);
                return -1;
            }
            w = (w << 4) | (uint64_t)v;
        }
    }
    *word = w;
    return 0;
}

/* lowest-numbered field (base+1 .. base+64) whose bit is set in a nonzero word */
static int
first_bit(uint64_t word, int base)
{
    return base + 1 + __builtin_clzll(word);
}

static void
bitmap_error(CodecObject *self, uint64_t bad, int base, PyObject *field, Py_ssize_t offset)
{
    codec_error(self,
                PyUnicode_FromFormat("bitmap names field %d, which the dialect does not define",
                                     first_bit(bad, base)),
                field, offset);
}

static void
put_bitmap(CodecObject *self, char *out, uint64_t word)
{
    int i;
    if (self->bitmap_binary) {
        for (i = 0; i < 8; i++)
            out[i] = (char)(word >> (56 - 8 * i));
    } else {
        for (i = 0; i < 16; i++)
            out[i] = HEX_UPPER[(word >> (60 - 4 * i)) & 0xF];
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* decode                                                                                            */

/* what the walk learnt about one field */
typedef struct {
    PyObject *value;       /* new ref */
    Py_ssize_t start;      /* offset of its length prefix (pure's `_offset`) */
} Decoded;

/* bytes -> str with pyiso8583's error mapping ("Failed to decode field, ..."); new ref or NULL */
static PyObject *
decode_text(CodecObject *self, const FieldSpec *fs, const unsigned char *p, Py_ssize_t len, Py_ssize_t pos)
{
    PyObject *r;
    Py_ssize_t i;
    int kind = fs->data_kind;
    if (kind == DATA_ASCII_SUPERSET) {
        for (i = 0; i < len && !(p[i] & 0x80); i++)
            ;
        kind = i == len ? DATA_ASCII : DATA_TEXT;
    }
    switch (kind) {
    case DATA_ASCII:
        for (i = 0; i < len; i++) {
            if (p[i] & 0x80) {
                codec_error(self, PyUnicode_FromString("Failed to decode field, invalid data"), fs->key, pos);
                return NULL;
            }
        }
        r = PyUnicode_New(len, 127);
        if (r != NULL)
            memcpy(PyUnicode_1BYTE_DATA(r), p, (size_t)len);
        return r;
    case DATA_LATIN1:
        return PyUnicode_DecodeLatin1((const char *)p, len, NULL);
    default:
        r = PyUnicode_Decode((const char *)p, len, fs->data_enc_c, NULL);
        if (r == NULL)
            codec_error(self,
                        codec_call_reason("Failed to decode field, unknown encoding specified",
                                          "Failed to decode field, invalid data"),
                        fs->key, pos);
        return r;
    }
}

/* upper-case hex of `len` bytes, dropping the first (skip_first) or last (skip_last) nibble (one at most) */
static PyObject *
hex_string(const unsigned char *p, Py_ssize_t len, int skip_first, int skip_last)
{
    Py_ssize_t i = 0, k = 0, end = len - (skip_last ? 1 : 0);
    PyObject *r = PyUnicode_New(2 * len - skip_first - skip_last, 127);
    Py_UCS1 *out;
    if (r == NULL)
        return NULL;
    out = PyUnicode_1BYTE_DATA(r);
    if (skip_first && len > 0) {
        out[k++] = (Py_UCS1)HEX_UPPER[p[0] & 0xF];
        i = 1;
    }
    for (; i < end; i++, k += 2)
        memcpy(out + k, hex_pair[p[i]], 2);
    if (skip_last && len > 0)
        out[k++] = (Py_UCS1)HEX_UPPER[p[len - 1] >> 4];
    return r;
}

enum { WALK_OK = 0, WALK_ERROR = -1, WALK_DELEGATE = -2 };

/* A text length prefix the pyiso8583 way: bytes.decode(len_enc) then int(). Only reached for
 * encodings other than ascii, or ascii prefixes that are not plain digits (" 12", "+1", "1_2", "-1"). */
static int
text_length(CodecObject *self, const FieldSpec *fs, const unsigned char *p, Py_ssize_t pos, long long *out)
{
    const char *enc = fs->len_kind == LEN_ASCII ? "ascii" : fs->len_enc_c;
    PyObject *text, *num;
    int overflow = 0;
    long long v;
    text = PyUnicode_Decode((const char *)p, fs->len_type, enc, NULL);
    if (text == NULL) {
        codec_error(self,
                    codec_call_reason("Failed to decode field length, unknown encoding specified",
                                      "Failed to decode field length, invalid data"),
                    fs->key, pos);
        return WALK_ERROR;
    }
    num = PyLong_FromUnicodeObject(text, 10);
    Py_DECREF(text);
    if (num == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_Exception))
            return WALK_ERROR;
        PyErr_Clear();
        codec_error(self, PyUnicode_FromString("Failed to decode field length, non-numeric data"), fs->key, pos);
        return WALK_ERROR;
    }
    v = PyLong_AsLongLongAndOverflow(num, &overflow);
    Py_DECREF(num);
    /* a prefix of at most 4 bytes holds at most 4 digits in any sane codec; anything else is for the
     * pure codec to describe */
    if (overflow || v > 1000000000LL || v < -1000000000LL)
        return WALK_DELEGATE;
    *out = v;
    return WALK_OK;
}

/* pyiso8583 _decode_field: returns WALK_OK and advances *idx, or WALK_ERROR (CodecError set) */
static int
decode_field(CodecObject *self, const FieldSpec *fs, const unsigned char *s, Py_ssize_t n, Py_ssize_t *idx,
             PyObject **value)
{
    Py_ssize_t at = *idx, avail = n - at, got, data_at;
    int i, lt = fs->len_type;
    long long L, byte_len, stop;

    if (avail < lt) {
        codec_error(self, PyUnicode_FromFormat("Field length is %zd bytes wide, expecting %d", avail, lt),
                    fs->key, at);
        return WALK_ERROR;
    }
    if (lt == 0) {
        L = fs->max_len;
    } else {
        const unsigned char *p = s + at;
        L = 0;
        switch (fs->len_kind) {
        case LEN_BIN:
            for (i = 0; i < lt; i++)
                L = (L << 8) | p[i];
            break;
        case LEN_BCD:
            for (i = 0; i < lt; i++) {
                int hi = p[i] >> 4, lo = p[i] & 0xF;
                if (hi > 9 || lo > 9) {
                    codec_error(self, PyUnicode_FromString("Failed to decode field length, invalid BCD data"),
                                fs->key, at);
                    return WALK_ERROR;
                }
                L = L * 100 + hi * 10 + lo;
            }
            break;
        case LEN_ASCII:
            for (i = 0; i < lt; i++) {
                if (p[i] < '0' || p[i] > '9')
                    break;
                L = L * 10 + (p[i] - '0');
            }
            if (i == lt)
                break;
            /* not plain digits: let int() decide */
            /* fall through */
        default: {
            int r = text_length(self, fs, p, at, &L);
            if (r != WALK_OK)
                return r;
        }
        }
        if (L > fs->max_len) {
            codec_error(self,
                        PyUnicode_FromFormat("Field data is %lld %s, larger than maximum %ld", L, count_name(fs),
                                             fs->max_len),
                        fs->key, at);
            return WALK_ERROR;
        }
    }
    data_at = at + lt;
    if (L == 0) {
        Py_INCREF(self->empty);
        *value = self->empty;
        *idx = data_at;
        return WALK_OK;
    }
    /* L may be negative here (int() of "-1" in a text prefix); (L + 1) is even when L is odd, so
     * C division matches Python's floor division */
    byte_len = fs->nibbles ? ((L & 1) ? (L + 1) / 2 : L / 2) : L;
    /* len(s[data_at : data_at + byte_len]) with Python's slice rules */
    stop = (long long)data_at + byte_len;
    if (stop < 0) {
        stop += n;
        if (stop < 0)
            stop = 0;
    }
    if (stop > n)
        stop = n;
    got = stop > data_at ? (Py_ssize_t)(stop - data_at) : 0;
    if (got != byte_len) {
        codec_error(self,
                    PyUnicode_FromFormat("Field data is %zd %s, expecting %lld", fs->nibbles ? got * 2 : got,
                                         count_name(fs), L),
                    fs->key, data_at);
        return WALK_ERROR;
    }
    /* from here 0 <= byte_len == got <= n - data_at */
    if (fs->data_kind == DATA_BIN) {
        const unsigned char *p = s + data_at;
        int skip_first = 0, skip_last = 0;
        if (fs->nibbles && (L & 1)) {
            if (fs->left_pad && byte_len > 0 && HEX_UPPER[p[0] >> 4] == fs->left_pad)
                skip_first = 1;
            else if (fs->right_pad && byte_len > 0 && HEX_UPPER[p[byte_len - 1] & 0xF] == fs->right_pad)
                skip_last = 1;
            else {
                codec_error(self,
                            PyUnicode_FromFormat("Field data is %lld nibbles, expecting %lld", 2 * byte_len, L),
                            fs->key, data_at);
                return WALK_ERROR;
            }
        }
        *value = hex_string(p, (Py_ssize_t)byte_len, skip_first, skip_last);
    } else {
        *value = decode_text(self, fs, s + data_at, (Py_ssize_t)byte_len, data_at);
    }
    if (*value == NULL)
        return WALK_ERROR;
    *idx = data_at + (Py_ssize_t)byte_len;
    return WALK_OK;
}

static PyObject *
new_message(CodecObject *self, PyObject *mti, PyObject *fields)
{
    PyTypeObject *type = (PyTypeObject *)self->message_type;
    PyObject *msg = type->tp_alloc(type, 0);
    if (msg == NULL)
        return NULL;
    if (Py_TYPE(self->member_mti)->tp_descr_set(self->member_mti, msg, mti) < 0 ||
        Py_TYPE(self->member_fields)->tp_descr_set(self->member_fields, msg, fields) < 0) {
        Py_DECREF(msg);
        return NULL;
    }
    return msg;
}

static PyObject *
delegate(CodecObject *self, const char *method, PyObject *arg)
{
    return PyObject_CallMethod(self->pure, method, "O", arg);
}

/* The post-walk checks of PureCodec.decode, in its order. Returns WALK_OK, WALK_ERROR or
 * WALK_DELEGATE; may replace hex-text values with their upper-case form. */
static int
decode_checks(CodecObject *self, const unsigned char *s, const int *nums, int count, Decoded *dec)
{
    PyObject *group[MAX_FIELD];
    int gnums[MAX_FIELD];
    int i, g, r;
    PyObject *security = NULL;

    /* ASCII length prefixes must be digits (pyiso8583's int() also takes " 12", "+12", "1_2") */
    for (i = 0; i < count; i++) {
        const FieldSpec *fs = &self->fields[nums[i]];
        if (fs->ascii_len_check) {
            int k;
            for (k = 0; k < fs->len_type; k++) {
                unsigned char c = s[dec[i].start + k];
                if (c < '0' || c > '9') {
                    codec_error(self, PyUnicode_FromString("length prefix is not decimal digits"), fs->key,
                                dec[i].start);
                    return WALK_ERROR;
                }
            }
        }
    }
    for (i = 0; i < count; i++) {
        if (nums[i] == SECURITY_FIELD)
            security = dec[i].value;
    }
    /* numeric */
    for (g = 0, i = 0; i < count; i++) {
        if (self->fields[nums[i]].check == CHECK_NUMERIC) {
            gnums[g] = i;
            group[g++] = dec[i].value;
        }
    }
    if (g) {
        r = group_ok(group, g, DIGITS);
        if (r < 0)
            return WALK_DELEGATE;
        if (r == 0) {
            for (i = 0; i < g; i++) {
                if (!all_in(group[i], DIGITS)) {
                    int at = gnums[i];
                    codec_error(self, PyUnicode_FromString("non-digit in numeric field"),
                                self->fields[nums[at]].key, dec[at].start);
                    return WALK_ERROR;
                }
            }
        }
    }
    /* tracks */
    for (g = 0, i = 0; i < count; i++) {
        if (self->fields[nums[i]].check == CHECK_TRACK) {
            gnums[g] = i;
            group[g++] = dec[i].value;
        }
    }
    if (g) {
        r = group_ok(group, g, TRACK_CHARS);
        if (r < 0)
            return WALK_DELEGATE;
        if (r == 0) {
            for (i = 0; i < g; i++) {
                if (!all_in(group[i], TRACK_CHARS) && !encrypted_track(security, group[i])) {
                    int at = gnums[i];
                    codec_error(self,
                                PyUnicode_FromString("track data holds characters other than digits and separator"),
                                self->fields[nums[at]].key, dec[at].start);
                    return WALK_ERROR;
                }
            }
        }
    }
    /* hex text: lower case is accepted and upper-cased */
    for (g = 0, i = 0; i < count; i++) {
        if (self->fields[nums[i]].check == CHECK_HEX) {
            gnums[g] = i;
            group[g++] = dec[i].value;
        }
    }
    if (g) {
        r = group_ok(group, g, HEX_CHARS);
        if (r < 0)
            return WALK_DELEGATE;
        if (r == 0) {
            for (i = 0; i < g; i++) {
                int at = gnums[i];
                PyObject *up;
                if (all_in(group[i], HEX_CHARS))
                    continue;
                up = upper(group[i]);
                if (up == NULL)
                    return WALK_ERROR;
                if (!all_in(up, HEX_CHARS)) {
                    Py_DECREF(up);
                    codec_error(self, PyUnicode_FromString("binary field is not hexadecimal"),
                                self->fields[nums[at]].key, dec[at].start);
                    return WALK_ERROR;
                }
                Py_SETREF(dec[at].value, up);
            }
        }
    }
    /* x+n amounts */
    for (i = 0; i < count; i++) {
        if (self->fields[nums[i]].check == CHECK_XN && !signed_amount_ok(dec[i].value, self->lenient)) {
            codec_error(self, PyUnicode_FromString("amount must be C or D followed by digits"),
                        self->fields[nums[i]].key, dec[i].start);
            return WALK_ERROR;
        }
    }
    return WALK_OK;
}

static PyObject *
Codec_decode(CodecObject *self, PyObject *body)
{
    PyObject *owned = NULL, *mti = NULL, *fields = NULL, *result = NULL;
    const unsigned char *s;
    Py_ssize_t n, idx, start;
    uint64_t primary = 0, second = 0;
    int nums[MAX_FIELD], count = 0, i, r, prefixed, prefixed_1 = 0;
    Decoded dec[MAX_FIELD];
    PyObject *last_key;

    if (!PyBytes_CheckExact(body)) {
        if (PyBytes_Check(body) || PyByteArray_Check(body) || PyMemoryView_Check(body)) {
            owned = PyBytes_FromObject(body);
            if (owned == NULL)
                return NULL;
            body = owned;
        } else {
            PyObject *name = PyType_GetName(Py_TYPE(body));
            codec_error(self, name ? PyUnicode_FromFormat("message body must be bytes, not %U", name) : NULL, NULL, -1);
            Py_XDECREF(name);
            return NULL;
        }
    }
    s = (const unsigned char *)PyBytes_AS_STRING(body);
    n = PyBytes_GET_SIZE(body);

    /* MTI: one the dialect accepts, checked on the raw bytes first */
    if (n >= self->mti_len) {
        if (self->mti_fast) {
            int number = 0, ok = 1;
            if (self->mti_binary) {
                for (i = 0; i < 2; i++) {
                    int hi = s[i] >> 4, lo = s[i] & 0xF;
                    ok &= hi <= 9 && lo <= 9;
                    number = number * 100 + hi * 10 + lo;
                }
            } else {
                for (i = 0; i < 4; i++) {
                    ok &= s[i] >= '0' && s[i] <= '9';
                    number = number * 10 + (s[i] - '0');
                }
            }
            if (ok && number >= 0 && number < MTI_TABLE)
                mti = self->mti_by_number[number];
        } else {
            PyObject *wire = PyBytes_FromStringAndSize((const char *)s, self->mti_len);
            if (wire == NULL)
                goto done;
            mti = PyDict_GetItemWithError(self->mti_decode, wire);
            Py_DECREF(wire);
            if (mti == NULL && PyErr_Occurred())
                goto done;
        }
    }
    if (mti == NULL) {
        if (n < self->mti_len)
            codec_error(self, PyUnicode_FromFormat("message is %zd bytes, too short for an MTI", n), self->key_t, 0);
        else
            codec_error(self, PyUnicode_FromString("MTI is not a message type this dialect accepts"), self->key_t, 0);
        goto done;
    }
    Py_INCREF(mti);

    /* bitmaps: only fields the dialect defines, bit 1 only with a secondary bitmap */
    start = self->mti_len;
    if (bitmap_word(self, s, n, start, self->key_p, &primary, &prefixed) < 0)
        goto done;
    if (primary & self->bad_primary) {
        if ((primary >> 63) && !self->secondary)
            codec_error(self, PyUnicode_FromString("bitmap sets bit 1 but this dialect has no secondary bitmap"),
                        self->key_p, start);
        else
            bitmap_error(self, primary & self->bad_primary, 0, self->key_p, start);
        goto done;
    }
    idx = start + self->bitmap_len;
    last_key = self->key_p;
    if (primary >> 63) {
        if (bitmap_word(self, s, n, idx, self->key_1, &second, &prefixed_1) < 0)
            goto done;
        if (second & self->bad_secondary) {
            bitmap_error(self, second & self->bad_secondary, 64, self->key_1, idx);
            goto done;
        }
        idx += self->bitmap_len;
        last_key = self->key_1;
    }
    if (prefixed || prefixed_1) { /* "0x..." got past the pure codec's check, not past pyiso8583 */
        codec_error(self, PyUnicode_FromString("Failed to decode field, non-hex data"),
                    prefixed ? self->key_p : self->key_1, prefixed ? start : start + self->bitmap_len);
        goto done;
    }
    /* the fields named, ascending: field base + 1 + (leading zeros) for each set bit */
    for (uint64_t w = primary & ~(1ULL << 63); w; w &= ~(1ULL << (63 - __builtin_clzll(w))))
        nums[count++] = 1 + __builtin_clzll(w);
    for (uint64_t w = second; w; w &= ~(1ULL << (63 - __builtin_clzll(w))))
        nums[count++] = 65 + __builtin_clzll(w);

    /* pyiso8583's walk */
    for (i = 0; i < count; i++) {
        dec[i].start = idx;
        dec[i].value = NULL;
        r = decode_field(self, &self->fields[nums[i]], s, n, &idx, &dec[i].value);
        if (r != WALK_OK) {
            count = i;
            if (r == WALK_DELEGATE)
                result = delegate(self, "decode", body);
            goto done;
        }
        last_key = self->fields[nums[i]].key;
    }
    if (idx != n) {
        codec_error(self, PyUnicode_FromString("Extra data after last field"), last_key, idx);
        goto done;
    }

    r = decode_checks(self, s, nums, count, dec);
    if (r != WALK_OK) {
        if (r == WALK_DELEGATE)
            result = delegate(self, "decode", body);
        goto done;
    }
#if PY_VERSION_HEX < 0x030D0000
    fields = _PyDict_NewPresized(count);
#else
    fields = PyDict_New();
#endif
    if (fields == NULL)
        goto done;
    for (i = 0; i < count; i++) {
        if (PyDict_SetItem(fields, self->fields[nums[i]].key, dec[i].value) < 0)
            goto done;
    }
    result = new_message(self, mti, fields);

done:
    for (i = 0; i < count; i++)
        Py_XDECREF(dec[i].value);
    Py_XDECREF(fields);
    Py_XDECREF(mti);
    Py_XDECREF(owned);
    return result;
}

/* ------------------------------------------------------------------------------------------------ */
/* encode                                                                                            */

typedef struct {
    const FieldSpec *fs;
    PyObject *value;        /* borrowed from the message, or an owned replacement (see owned) */
    PyObject *owned;        /* new ref to free: the replaced value (upper-cased hex, track with D) */
    PyObject *owned_data;   /* new ref to free: the value encoded by a generic codec */
    const char *data;       /* text: the bytes to write; binary: the hex characters */
    Py_ssize_t data_len;    /* text: bytes; binary: hex characters (even, pad included) */
    char pad_before, pad_after;
    char prefix[4];
    Py_ssize_t prefix_len;
    PyObject *prefix_owned; /* generic-codec prefix bytes, or NULL */
} Encoded;

static void
encode_error(CodecObject *self, const FieldSpec *fs, PyObject *reason)
{
    codec_error(self, reason, fs->key, -1);
}

/* pyiso8583 _encode_bindary_field: validate the hex, fill e->data / data_len; returns the counted
 * length (nibbles: characters of the value; bytes: bytes) or -1 with CodecError set */
static long long
encode_binary(CodecObject *self, Encoded *e)
{
    const FieldSpec *fs = e->fs;
    PyObject *v = e->value;
    Py_ssize_t len = PyUnicode_GET_LENGTH(v), total, i;
    int padded = 0;
    const Py_UCS1 *p;
    e->pad_before = e->pad_after = 0;
    if (fs->nibbles && (len & 1)) {
        if (fs->left_pad) {
            e->pad_before = fs->left_pad;
            padded = 1;
        } else if (fs->right_pad) {
            e->pad_after = fs->right_pad;
            padded = 1;
        }
    }
    total = len + padded;
    if (PyUnicode_IS_ASCII(v) && !(total & 1)) {
        p = PyUnicode_1BYTE_DATA(v);
        for (i = 0; i < len; i++) {
            if (hex_value[p[i]] == 0xFF)
                break;
        }
        if (i == len) {
            e->data = (const char *)p;
            e->data_len = total;
            return fs->nibbles ? len : total / 2;
        }
    }
    if (fs->nibbles && (total & 1))
        encode_error(self, fs, PyUnicode_FromString("Failed to encode field, odd-length nibble data, specify pad"));
    else if (total & 1)
        encode_error(self, fs, PyUnicode_FromString("Failed to encode field, odd-length hex data"));
    else
        encode_error(self, fs, PyUnicode_FromString("Failed to encode field, non-hex data"));
    return -1;
}

/* pyiso8583 _encode_text_field */
static long long
encode_text(CodecObject *self, Encoded *e)
{
    const FieldSpec *fs = e->fs;
    PyObject *v = e->value;
    Py_ssize_t len;
    int kind = fs->data_kind;
    if (kind == DATA_ASCII_SUPERSET)
        kind = PyUnicode_IS_ASCII(v) ? DATA_ASCII : DATA_TEXT;
    if (kind == DATA_ASCII || kind == DATA_LATIN1) {
        if (kind == DATA_ASCII ? !PyUnicode_IS_ASCII(v) : PyUnicode_KIND(v) != PyUnicode_1BYTE_KIND) {
            encode_error(self, fs, PyUnicode_FromString("Failed to encode field, invalid data"));
            return -1;
        }
        e->data = (const char *)PyUnicode_1BYTE_DATA(v);
        len = PyUnicode_GET_LENGTH(v);
    } else {
        PyObject *b = PyUnicode_AsEncodedString(v, fs->data_enc_c, NULL);
        if (b == NULL) {
            encode_error(self, fs,
                         codec_call_reason("Failed to encode field, unknown encoding specified",
                                           "Failed to encode field, invalid data"));
            return -1;
        }
        if (!PyBytes_Check(b)) { /* cannot happen: str.encode() checks its codec returns bytes */
            Py_DECREF(b);
            encode_error(self, fs, PyUnicode_FromString("Failed to encode field, invalid data"));
            return -1;
        }
        Py_XSETREF(e->owned_data, b);
        e->data = PyBytes_AS_STRING(b);
        len = PyBytes_GET_SIZE(b);
    }
    e->data_len = len;
    return fs->nibbles ? 2 * (long long)len : len;
}

/* `value` in decimal, zero-padded to `width` digits; returns the number of digits (may exceed width) */
static int
decimal(char *out, long long value, int width)
{
    char tmp[24];
    int n = 0, k = 0;
    do {
        tmp[n++] = (char)('0' + value % 10);
        value /= 10;
    } while (value > 0);
    while (n + k < width)
        out[k++] = '0';
    while (n > 0)
        out[k++] = tmp[--n];
    out[k] = 0;
    return k;
}

static const char DOES_NOT_FIT[] =
    "Failed to encode field length, field length does not fit into configured field size";

/* pyiso8583 _encode_field after the data: the length check and the prefix */
static int
encode_length(CodecObject *self, Encoded *e, long long counted)
{
    const FieldSpec *fs = e->fs;
    int lt = fs->len_type, i;
    char digits[32];
    if (lt == 0) {
        if (counted != fs->max_len) {
            encode_error(self, fs,
                         PyUnicode_FromFormat("Field data is %lld %s, expecting %ld", counted, count_name(fs),
                                              fs->max_len));
            return -1;
        }
        e->prefix_len = 0;
        return 0;
    }
    if (counted > fs->max_len) {
        encode_error(self, fs,
                     PyUnicode_FromFormat("Field data is %lld %s, larger than maximum %ld", counted, count_name(fs),
                                          fs->max_len));
        return -1;
    }
    switch (fs->len_kind) {
    case LEN_BIN:
        if (lt < 8 && counted >= (1LL << (8 * lt))) {
            encode_error(self, fs, PyUnicode_FromString(DOES_NOT_FIT));
            return -1;
        }
        for (i = 0; i < lt; i++)
            e->prefix[i] = (char)(counted >> (8 * (lt - 1 - i)));
        e->prefix_len = lt;
        return 0;
    case LEN_BCD: {
        int nd = decimal(digits, counted, 2 * lt);
        if (nd > 2 * lt) {
            encode_error(self, fs, PyUnicode_FromString(DOES_NOT_FIT));
            return -1;
        }
        for (i = 0; i < lt; i++)
            e->prefix[i] = (char)(((digits[2 * i] - '0') << 4) | (digits[2 * i + 1] - '0'));
        e->prefix_len = lt;
        return 0;
    }
    case LEN_ASCII: {
        int nd = decimal(digits, counted, lt);
        if (nd > lt) {
            encode_error(self, fs, PyUnicode_FromString(DOES_NOT_FIT));
            return -1;
        }
        memcpy(e->prefix, digits, (size_t)nd);
        e->prefix_len = nd;
        return 0;
    }
    default: {
        PyObject *text, *b;
        decimal(digits, counted, lt);
        if ((text = PyUnicode_FromString(digits)) == NULL)
            return -1;
        b = PyUnicode_AsEncodedString(text, fs->len_enc_c, NULL);
        Py_DECREF(text);
        if (b == NULL) {
            if (PyErr_ExceptionMatches(PyExc_LookupError)) {
                PyErr_Clear();
                encode_error(self, fs, PyUnicode_FromString("Failed to encode field length, unknown encoding specified"));
            } else if (PyErr_ExceptionMatches(PyExc_Exception)) {
                PyObject *type, *val, *tb, *text_e;
                PyErr_Fetch(&type, &val, &tb);
                PyErr_NormalizeException(&type, &val, &tb);
                text_e = val ? PyObject_Str(val) : NULL;
                Py_XDECREF(type);
                Py_XDECREF(val);
                Py_XDECREF(tb);
                encode_error(self, fs, text_e ? PyUnicode_FromFormat("Failed to encode field length, %U", text_e) : NULL);
                Py_XDECREF(text_e);
            }
            return -1;
        }
        if (PyBytes_GET_SIZE(b) > lt) {
            Py_DECREF(b);
            encode_error(self, fs, PyUnicode_FromString(DOES_NOT_FIT));
            return -1;
        }
        e->prefix_owned = b;
        e->prefix_len = PyBytes_GET_SIZE(b);
        return 0;
    }
    }
}

/* field key -> field number when the key is one the dialect defines ("2".."128", canonical), else 0 */
static int
field_number(CodecObject *self, PyObject *key)
{
    Py_ssize_t len = PyUnicode_GET_LENGTH(key), i;
    const Py_UCS1 *p;
    int f = 0;
    if (!PyUnicode_IS_ASCII(key) || len < 1 || len > 3)
        return 0;
    p = PyUnicode_1BYTE_DATA(key);
    if (p[0] == '0')
        return 0;
    for (i = 0; i < len; i++) {
        if (p[i] < '0' || p[i] > '9')
            return 0;
        f = f * 10 + (p[i] - '0');
    }
    return f <= MAX_FIELD && self->fields[f].defined ? f : 0;
}

/* the value for field `f` as the message gives it, in encode's group checks */
static int
encode_checks(CodecObject *self, Encoded *enc, int count, PyObject *security)
{
    PyObject *group[MAX_FIELD];
    int gidx[MAX_FIELD];
    int i, g, r, kind;
    static const int kinds[] = {CHECK_NUMERIC, CHECK_TRACK, CHECK_HEX};
    static const int allowed[] = {DIGITS, TRACK_CHARS, HEX_CHARS};

    for (kind = 0; kind < 3; kind++) {
        for (g = 0, i = 0; i < count; i++) {
            if (enc[i].fs->check == kinds[kind]) {
                gidx[g] = i;
                group[g++] = enc[i].value;
            }
        }
        if (!g)
            continue;
        r = group_ok(group, g, allowed[kind]);
        if (r < 0)
            return WALK_DELEGATE;
        if (kinds[kind] == CHECK_NUMERIC && r == 0) {
            for (i = 0; i < g; i++) {
                if (!all_in(group[i], DIGITS)) {
                    encode_error(self, enc[gidx[i]].fs, PyUnicode_FromString("non-digit in numeric field"));
                    return WALK_ERROR;
                }
            }
        } else if (kinds[kind] == CHECK_TRACK) {
            for (i = 0; i < g; i++) {
                Encoded *e = &enc[gidx[i]];
                PyObject *v = group[i];
                if (r == 0 && !all_in(v, TRACK_CHARS) && !encrypted_track(security, v)) {
                    encode_error(self, e->fs,
                                 PyUnicode_FromString("track data holds characters other than digits and separator"));
                    return WALK_ERROR;
                }
                /* BCD has no '=': the separator travels as nibble D */
                if (e->fs->track_bcd && PyUnicode_FindChar(v, '=', 0, PyUnicode_GET_LENGTH(v), 1) >= 0) {
                    PyObject *d = PyObject_CallMethod(v, "replace", "ss", "=", "D");
                    if (d == NULL)
                        return WALK_ERROR;
                    Py_XSETREF(e->owned, d);
                    e->value = d;
                }
            }
        } else if (kinds[kind] == CHECK_HEX && r == 0) {
            for (i = 0; i < g; i++) {
                Encoded *e = &enc[gidx[i]];
                PyObject *up;
                if (all_in(group[i], HEX_CHARS))
                    continue;
                up = upper(group[i]);
                if (up == NULL)
                    return WALK_ERROR;
                if (!all_in(up, HEX_CHARS)) {
                    Py_DECREF(up);
                    encode_error(self, e->fs, PyUnicode_FromString("binary field is not hexadecimal"));
                    return WALK_ERROR;
                }
                Py_XSETREF(e->owned, up);
                e->value = up;
            }
        }
    }
    for (i = 0; i < count; i++) {
        if (enc[i].fs->check == CHECK_XN && !signed_amount_ok(enc[i].value, self->lenient)) {
            encode_error(self, enc[i].fs, PyUnicode_FromString("amount must be C or D followed by digits"));
            return WALK_ERROR;
        }
    }
    return WALK_OK;
}

/* e->data_len hex characters (the pad nibble included) -> data_len / 2 bytes; validated before */
static void
write_binary(char *out, const Encoded *e)
{
    const unsigned char *d = (const unsigned char *)e->data;
    Py_ssize_t k, nb = e->data_len / 2;
    if (nb == 0)
        return;
    if (e->pad_before) {
        out[0] = (char)((hex_value[(unsigned char)e->pad_before] << 4) | hex_value[d[0]]);
        for (k = 1; k < nb; k++)
            out[k] = (char)((hex_value[d[2 * k - 1]] << 4) | hex_value[d[2 * k]]);
        return;
    }
    for (k = 0; k < nb - (e->pad_after ? 1 : 0); k++)
        out[k] = (char)((hex_value[d[2 * k]] << 4) | hex_value[d[2 * k + 1]]);
    if (e->pad_after)
        out[nb - 1] = (char)((hex_value[d[2 * nb - 2]] << 4) | hex_value[(unsigned char)e->pad_after]);
}

static PyObject *
Codec_encode(CodecObject *self, PyObject *msg)
{
    PyObject *fields = NULL, *mti = NULL, *key, *value, *wire, *result = NULL;
    PyObject *present[MAX_FIELD + 1] = {NULL};
    PyObject *security = NULL;
    Encoded enc[MAX_FIELD];
    int count = 0, f, i, r;
    Py_ssize_t pos = 0, total, at;
    uint64_t primary = 0, second = 0;
    char *out;

    if (Py_TYPE(msg) != (PyTypeObject *)self->message_type)
        return delegate(self, "encode", msg);
    fields = Py_TYPE(self->member_fields)->tp_descr_get(self->member_fields, msg, self->message_type);
    if (fields == NULL) {
        PyErr_Clear();
        return delegate(self, "encode", msg);
    }
    mti = Py_TYPE(self->member_mti)->tp_descr_get(self->member_mti, msg, self->message_type);
    if (mti == NULL) {
        PyErr_Clear();
        Py_DECREF(fields);
        return delegate(self, "encode", msg);
    }
    if (!PyDict_CheckExact(fields) || !PyUnicode_CheckExact(mti)) {
        result = delegate(self, "encode", msg);
        goto done_refs;
    }
    /* keys and values exactly str, else the pure codec says what is wrong (it checks in its order) */
    while (PyDict_Next(fields, &pos, &key, &value)) {
        if (!PyUnicode_CheckExact(key) || !PyUnicode_CheckExact(value)) {
            result = delegate(self, "encode", msg);
            goto done_refs;
        }
    }
    /* every key must be a field the dialect defines (checked in the message's order, before the MTI) */
    pos = 0;
    while (PyDict_Next(fields, &pos, &key, &value)) {
        f = field_number(self, key);
        if (f == 0) {
            PyObject *name = PyUnicode_GET_LENGTH(key) <= 8 ? key : NULL;
            PyObject *shown = name ? (Py_INCREF(name), name) : PyUnicode_FromString("str");
            if (shown != NULL)
                codec_error(self,
                            PyUnicode_FromFormat("field %U is not defined in dialect %U", shown, self->dialect_name),
                            shown, -1);
            Py_XDECREF(shown);
            goto done_refs;
        }
        present[f] = value;
    }
    wire = PyDict_GetItemWithError(self->mti_encode, mti);
    if (wire == NULL) {
        if (!PyErr_Occurred())
            codec_error(self, PyUnicode_FromString("MTI is not a message type this dialect accepts"), self->key_t, -1);
        goto done_refs;
    }
    for (f = 2; f <= MAX_FIELD; f++) {
        if (present[f] == NULL)
            continue;
        enc[count].fs = &self->fields[f];
        enc[count].value = present[f];
        enc[count].owned = NULL;
        enc[count].owned_data = NULL;
        enc[count].prefix_owned = NULL;
        enc[count].pad_before = enc[count].pad_after = 0;
        count++;
        if (f <= 64)
            primary |= 1ULL << (64 - f);
        else
            second |= 1ULL << (128 - f);
    }
    security = present[SECURITY_FIELD];
    r = encode_checks(self, enc, count, security);
    if (r != WALK_OK) {
        if (r == WALK_DELEGATE)
            result = delegate(self, "encode", msg);
        goto done;
    }
    /* pyiso8583's encode, field by field in order: data first, then its length */
    total = self->mti_len + self->bitmap_len * (second ? 2 : 1);
    for (i = 0; i < count; i++) {
        long long counted = enc[i].fs->data_kind == DATA_BIN ? encode_binary(self, &enc[i]) : encode_text(self, &enc[i]);
        if (counted < 0 || encode_length(self, &enc[i], counted) < 0)
            goto done;
        total += enc[i].prefix_len + (enc[i].fs->data_kind == DATA_BIN ? enc[i].data_len / 2 : enc[i].data_len);
    }
    if (second)
        primary |= 1ULL << 63;
    result = PyBytes_FromStringAndSize(NULL, total);
    if (result == NULL)
        goto done;
    out = PyBytes_AS_STRING(result);
    memcpy(out, PyBytes_AS_STRING(wire), (size_t)self->mti_len);
    at = self->mti_len;
    put_bitmap(self, out + at, primary);
    at += self->bitmap_len;
    if (second) {
        put_bitmap(self, out + at, second);
        at += self->bitmap_len;
    }
    for (i = 0; i < count; i++) {
        const Encoded *e = &enc[i];
        memcpy(out + at, e->prefix_owned ? PyBytes_AS_STRING(e->prefix_owned) : e->prefix, (size_t)e->prefix_len);
        at += e->prefix_len;
        if (e->fs->data_kind == DATA_BIN) {
            write_binary(out + at, e);
            at += e->data_len / 2;
        } else {
            memcpy(out + at, e->data, (size_t)e->data_len);
            at += e->data_len;
        }
    }
    if (at != total) { /* a bug here, never the input's fault */
        Py_CLEAR(result);
        PyErr_SetString(PyExc_SystemError, "compiled codec: encoded size mismatch");
    }
done:
    for (i = 0; i < count; i++) {
        Py_XDECREF(enc[i].owned);
        Py_XDECREF(enc[i].owned_data);
        Py_XDECREF(enc[i].prefix_owned);
    }
done_refs:
    Py_XDECREF(fields);
    Py_XDECREF(mti);
    return result;
}

/* ------------------------------------------------------------------------------------------------ */
/* construction                                                                                      */

static int
as_char(PyObject *s, char *out)
{
    if (!PyUnicode_Check(s))
        return -1;
    if (PyUnicode_GET_LENGTH(s) == 0) {
        *out = 0;
        return 0;
    }
    if (PyUnicode_GET_LENGTH(s) != 1 || PyUnicode_READ_CHAR(s, 0) > 127)
        return -1;
    *out = (char)PyUnicode_READ_CHAR(s, 0);
    return 0;
}

static int
load_field(CodecObject *self, PyObject *row)
{
    int num, len_type, len_kind, nibbles, data_kind, check, ascii_len_check, track_bcd;
    long max_len;
    PyObject *key, *len_enc, *data_enc, *left, *right;
    FieldSpec *fs;
    if (!PyArg_ParseTuple(row, "iUiiUlpUUiUipp;field row", &num, &key, &len_type, &len_kind, &len_enc, &max_len,
                          &nibbles, &left, &right, &data_kind, &data_enc, &check, &ascii_len_check, &track_bcd))
        return -1;
    if (num < 2 || num > MAX_FIELD || num == 65 || len_type < 0 || len_type > 4 || len_kind < LEN_FIXED ||
        len_kind > LEN_TEXT || (len_type == 0) != (len_kind == LEN_FIXED) || max_len < 0 || max_len > 99999 ||
        data_kind < DATA_BIN || data_kind > DATA_ASCII_SUPERSET || check < CHECK_NONE || check > CHECK_XN) {
        PyErr_Format(PyExc_ValueError, "field row for %d out of range", num);
        return -1;
    }
    fs = &self->fields[num];
    if (fs->defined) {
        PyErr_Format(PyExc_ValueError, "field %d given twice", num);
        return -1;
    }
    if (as_char(left, &fs->left_pad) < 0 || as_char(right, &fs->right_pad) < 0) {
        PyErr_SetString(PyExc_ValueError, "pads must be one ASCII character or empty");
        return -1;
    }
    if ((fs->len_enc_c = PyUnicode_AsUTF8(len_enc)) == NULL || (fs->data_enc_c = PyUnicode_AsUTF8(data_enc)) == NULL)
        return -1;
    fs->defined = 1;
    Py_INCREF(key);
    PyUnicode_InternInPlace(&key);
    fs->key = key;
    fs->len_type = len_type;
    fs->len_kind = len_kind;
    Py_INCREF(len_enc);
    fs->len_enc = len_enc;
    fs->max_len = max_len;
    fs->nibbles = nibbles;
    fs->data_kind = data_kind;
    Py_INCREF(data_enc);
    fs->data_enc = data_enc;
    fs->check = check;
    fs->ascii_len_check = ascii_len_check;
    fs->track_bcd = track_bcd;
    return 0;
}

static PyObject *
member(PyObject *type, const char *name)
{
    PyObject *d = PyObject_GetAttrString(type, name);
    if (d == NULL)
        return NULL;
    if (Py_TYPE(d)->tp_descr_get == NULL || Py_TYPE(d)->tp_descr_set == NULL) {
        Py_DECREF(d);
        PyErr_Format(PyExc_TypeError, "Message.%s must be a slot", name);
        return NULL;
    }
    return d;
}

static int
Codec_init(CodecObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"pure",     "message_type", "error_type", "dialect_name", "mti_decode", "mti_encode",
                             "mti_binary", "bitmap_binary", "secondary", "fields",     "lenient",    NULL};
    PyObject *pure, *message_type, *error_type, *dialect_name, *mti_decode, *mti_encode, *rows;
    int mti_binary, bitmap_binary, secondary, lenient, f;
    Py_ssize_t i, pos = 0;
    PyObject *wire, *mti;

    if (self->pure != NULL) { /* once, successful or not: a half-built table is never used */
        PyErr_SetString(PyExc_TypeError, "CompiledCodec is initialised once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOUO!O!pppO!p", kwlist, &pure, &message_type, &error_type,
                                     &dialect_name, &PyDict_Type, &mti_decode, &PyDict_Type, &mti_encode,
                                     &mti_binary, &bitmap_binary, &secondary, &PyTuple_Type, &rows, &lenient))
        return -1;
    if (!PyType_Check(message_type) || !PyType_Check(error_type)) {
        PyErr_SetString(PyExc_TypeError, "message_type and error_type must be classes");
        return -1;
    }
    Py_INCREF(pure);
    self->pure = pure;
    Py_INCREF(message_type);
    self->message_type = message_type;
    Py_INCREF(error_type);
    self->error_type = error_type;
    Py_INCREF(dialect_name);
    self->dialect_name = dialect_name;
    Py_INCREF(mti_decode);
    self->mti_decode = mti_decode;
    Py_INCREF(mti_encode);
    self->mti_encode = mti_encode;
    if ((self->member_mti = member(message_type, "mti")) == NULL ||
        (self->member_fields = member(message_type, "fields")) == NULL)
        return -1;
    if ((self->empty = PyUnicode_FromString("")) == NULL || (self->key_p = PyUnicode_InternFromString("p")) == NULL ||
        (self->key_1 = PyUnicode_InternFromString("1")) == NULL ||
        (self->key_t = PyUnicode_InternFromString("t")) == NULL)
        return -1;
    self->mti_binary = mti_binary;
    self->mti_len = mti_binary ? 2 : 4;
    self->bitmap_binary = bitmap_binary;
    self->bitmap_len = bitmap_binary ? 8 : 16;
    self->secondary = secondary;
    self->lenient = lenient;

    /* the MTI table: the fast path when every wire MTI is BCD (binary) or ASCII digits */
    self->mti_fast = 1;
    while (PyDict_Next(mti_decode, &pos, &wire, &mti)) {
        const unsigned char *w;
        int number = 0, k;
        if (!PyBytes_Check(wire) || PyBytes_GET_SIZE(wire) != self->mti_len || !PyUnicode_Check(mti)) {
            PyErr_SetString(PyExc_ValueError, "mti_decode must map wire bytes of the MTI length to str");
            return -1;
        }
        w = (const unsigned char *)PyBytes_AS_STRING(wire);
        for (k = 0; k < self->mti_len; k++) {
            if (mti_binary) {
                if ((w[k] >> 4) > 9 || (w[k] & 0xF) > 9)
                    self->mti_fast = 0;
                number = number * 100 + (w[k] >> 4) * 10 + (w[k] & 0xF);
            } else {
                if (w[k] < '0' || w[k] > '9')
                    self->mti_fast = 0;
                number = number * 10 + (w[k] - '0');
            }
        }
        if (self->mti_fast && number >= 0 && number < MTI_TABLE)
            self->mti_by_number[number] = mti;
    }
    pos = 0;
    while (PyDict_Next(mti_encode, &pos, &mti, &wire)) {
        if (!PyBytes_Check(wire) || PyBytes_GET_SIZE(wire) != self->mti_len) {
            PyErr_SetString(PyExc_ValueError, "mti_encode must map MTIs to wire bytes of the MTI length");
            return -1;
        }
    }

    for (i = 0; i < PyTuple_GET_SIZE(rows); i++) {
        if (load_field(self, PyTuple_GET_ITEM(rows, i)) < 0)
            return -1;
    }
    self->bad_primary = 0;
    for (f = 2; f <= 64; f++) {
        if (!self->fields[f].defined)
            self->bad_primary |= 1ULL << (64 - f);
    }
    if (!secondary)
        self->bad_primary |= 1ULL << 63;
    self->bad_secondary = 0;
    for (f = 65; f <= 128; f++) {
        if (!self->fields[f].defined)
            self->bad_secondary |= 1ULL << (128 - f);
    }
    self->ready = 1;
    return 0;
}

static int
Codec_traverse(CodecObject *self, visitproc visit, void *arg)
{
    int f;
    Py_VISIT(self->pure);
    Py_VISIT(self->message_type);
    Py_VISIT(self->error_type);
    Py_VISIT(self->mti_decode);
    Py_VISIT(self->mti_encode);
    Py_VISIT(self->member_mti);
    Py_VISIT(self->member_fields);
    for (f = 0; f <= MAX_FIELD; f++) {
        Py_VISIT(self->fields[f].len_enc);
        Py_VISIT(self->fields[f].data_enc);
    }
    return 0;
}

static int
Codec_clear(CodecObject *self)
{
    int f;
    self->ready = 0;
    Py_CLEAR(self->pure);
    Py_CLEAR(self->message_type);
    Py_CLEAR(self->error_type);
    Py_CLEAR(self->dialect_name);
    Py_CLEAR(self->mti_decode);
    Py_CLEAR(self->mti_encode);
    Py_CLEAR(self->member_mti);
    Py_CLEAR(self->member_fields);
    Py_CLEAR(self->empty);
    Py_CLEAR(self->key_p);
    Py_CLEAR(self->key_1);
    Py_CLEAR(self->key_t);
    memset(self->mti_by_number, 0, sizeof self->mti_by_number);
    for (f = 0; f <= MAX_FIELD; f++) {
        Py_CLEAR(self->fields[f].key);
        Py_CLEAR(self->fields[f].len_enc);
        Py_CLEAR(self->fields[f].data_enc);
        self->fields[f].defined = 0;
    }
    return 0;
}

static void
Codec_dealloc(CodecObject *self)
{
    PyObject_GC_UnTrack(self);
    Codec_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Codec_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    /* tp_alloc zero-fills: every pointer starts NULL, every field undefined */
    return type->tp_alloc(type, 0);
}

static PyObject *
checked(CodecObject *self)
{
    if (!self->ready) {
        PyErr_SetString(PyExc_TypeError, "CompiledCodec is not initialised");
        return NULL;
    }
    return (PyObject *)self;
}

static PyObject *
Codec_decode_checked(CodecObject *self, PyObject *body)
{
    return checked(self) ? Codec_decode(self, body) : NULL;
}

static PyObject *
Codec_encode_checked(CodecObject *self, PyObject *msg)
{
    return checked(self) ? Codec_encode(self, msg) : NULL;
}

static PyMethodDef Codec_methods[] = {
    {"decode", (PyCFunction)Codec_decode_checked, METH_O,
     "decode(body) -> Message: a message body (MTI + bitmap + fields); raises CodecError"},
    {"encode", (PyCFunction)Codec_encode_checked, METH_O, "encode(msg) -> bytes; raises CodecError"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CodecType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "gateway.iso._ccodec.CompiledCodec",
    .tp_basicsize = sizeof(CodecObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The compiled codec of one dialect; build it through gateway.iso.codec.Codec.",
    .tp_new = Codec_new,
    .tp_init = (initproc)Codec_init,
    .tp_dealloc = (destructor)Codec_dealloc,
    .tp_traverse = (traverseproc)Codec_traverse,
    .tp_clear = (inquiry)Codec_clear,
    .tp_methods = Codec_methods,
};

static struct PyModuleDef ccodec_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "gateway.iso._ccodec",
    .m_doc = "The compiled ISO 8583 codec (see gateway.iso.codec).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__ccodec(void)
{
    PyObject *m;
    init_char_classes();
    init_hex_values();
    if (PyType_Ready(&CodecType) < 0)
        return NULL;
    m = PyModule_Create(&ccodec_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&CodecType);
    if (PyModule_AddObject(m, "CompiledCodec", (PyObject *)&CodecType) < 0 ||
        PyModule_AddStringConstant(m, "SOURCE_HASH", GATEWAY_CCODEC_SOURCE_HASH) < 0) {
        Py_DECREF(&CodecType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
