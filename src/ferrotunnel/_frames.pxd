# Data frame header of the compiled codec, cimported by _sched.pyx. The inline bodies live here
# because Cython only inlines a cdef inline function into another module from its .pxd.

from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.stdint cimport uint32_t

cdef enum:
    # u32 BE length, type 0x01, u32 BE stream id, flags (0x01 = end of stream); the same as
    # _model.DATA_HEADER_SIZE, which _frames.pyx checks at import
    DATA_HEADER_SIZE = 10
    # what the length counts before the payload (type, stream id, flags), not the prefix itself
    DATA_BODY_PREFIX = DATA_HEADER_SIZE - 4


cdef inline void _put_be32(unsigned char* p, uint32_t v) noexcept nogil:
    p[0] = (v >> 24) & 0xFF
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF


cdef inline void write_data_header(unsigned char* p, uint32_t sid, Py_ssize_t n, bint eos) noexcept nogil:
    """The header of a data frame carrying ``n`` payload bytes, at ``p`` (unchecked)."""
    _put_be32(p, <uint32_t>(n + DATA_BODY_PREFIX))
    p[4] = 1
    _put_be32(p + 5, sid)
    p[9] = 1 if eos else 0


cdef inline bytes data_header(uint32_t sid, Py_ssize_t n, bint eos):
    """``write_data_header`` into a new bytes object."""
    cdef bytes h = PyBytes_FromStringAndSize(NULL, DATA_HEADER_SIZE)
    write_data_header(<unsigned char*>PyBytes_AS_STRING(h), sid, n, eos)
    return h
