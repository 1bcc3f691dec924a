# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled buffer pool (twin: ``_pool_py.py``, same names and behaviour).

A per-thread LIFO of reusable ``bytearray`` buffers (PROTOCOL.md section 6). The three
``FERROTUNNEL_POOL_*`` variables are read once per process, on the first acquire or release.
"""

import os
import threading

from cpython.bytearray cimport PyByteArray_GET_SIZE, PyByteArray_Resize, PyByteArray_AS_STRING, PyByteArray_FromStringAndSize
from libc.string cimport memset

cdef extern from "Python.h":
    ctypedef struct PyByteArrayObject:
        Py_ssize_t ob_exports

from ._pool_py import parse_pool_env  # parsing runs once per process: no need to compile it

__all__ = ["acquire_bytes", "release_bytes", "pool_stats", "pool_config", "parse_pool_env", "is_exported"]

from ._pool_py import DEFAULT_CAPACITY, DEFAULT_MAX_CAPACITY, DEFAULT_MAX_SIZE


cdef bint _loaded = False
cdef Py_ssize_t _max_size = 0, _max_capacity = 0, _default_capacity = 0
cdef object _local = threading.local()


cdef inline Py_ssize_t _clamp(object n):
    # a limit beyond what memory can hold behaves like "no limit"
    return n if n < <object>0x7FFFFFFFFFFFFFFF else 0x7FFFFFFFFFFFFFFF


cdef _load_config():
    global _loaded, _max_size, _max_capacity, _default_capacity
    if not _loaded:
        env = os.environ
        _max_size = _clamp(parse_pool_env(env.get("FERROTUNNEL_POOL_MAX_SIZE"), DEFAULT_MAX_SIZE))
        _max_capacity = _clamp(parse_pool_env(env.get("FERROTUNNEL_POOL_MAX_CAPACITY_BYTES"), DEFAULT_MAX_CAPACITY))
        _default_capacity = _clamp(parse_pool_env(env.get("FERROTUNNEL_POOL_DEFAULT_CAPACITY_BYTES"), DEFAULT_CAPACITY))
        _loaded = True


def pool_config():
    """(max buffers per thread, max retained capacity, default capacity), read once per process."""
    _load_config()
    return _max_size, _max_capacity, _default_capacity


cdef inline list _stack():
    try:
        return _local.stack
    except AttributeError:
        _local.stack = []
        return _local.stack


def acquire_bytes(Py_ssize_t capacity=0):
    """A buffer of at least ``max(capacity, FERROTUNNEL_POOL_DEFAULT_CAPACITY_BYTES)`` bytes.

    The most recently released buffer of this thread is reused when there is one; its old
    contents are not cleared, so treat every byte as undefined until you write it.
    """
    if not _loaded:
        _load_config()
    cdef Py_ssize_t need = capacity if capacity > _default_capacity else _default_capacity
    cdef list stack = _stack()
    cdef bytearray buf
    cdef Py_ssize_t old
    if stack:
        buf = stack.pop()
        old = PyByteArray_GET_SIZE(buf)
        if old < need:
            PyByteArray_Resize(buf, need)
            memset(PyByteArray_AS_STRING(buf) + old, 0, need - old)
        return buf
    return PyByteArray_FromStringAndSize(NULL, need)  # contents undefined, as documented


def is_exported(buf):
    """Whether a memoryview (or another buffer consumer) still exports ``buf``."""
    return (<PyByteArrayObject*>buf).ob_exports > 0 if type(buf) is bytearray else False


def release_bytes(buf):
    """Give a buffer back to this thread's pool; returns whether it was retained.

    Kept only if it is a ``bytearray`` no larger than the capacity limit, the pool is not full,
    and no memoryview still exports it (a viewed buffer must never be handed out again).
    """
    if not _loaded:
        _load_config()
    if type(buf) is not bytearray or PyByteArray_GET_SIZE(buf) > _max_capacity:
        return False
    if (<PyByteArrayObject*>buf).ob_exports > 0:
        return False
    cdef list stack = _stack()
    if len(stack) >= _max_size:
        return False
    stack.append(buf)
    return True


def pool_stats():
    """(buffers retained, their total capacity in bytes) for the calling thread."""
    cdef list stack = _stack()
    cdef Py_ssize_t total = 0
    for b in stack:
        total += PyByteArray_GET_SIZE(b)
    return len(stack), total
