import importlib

import pytest


def impl_module(kind: str, compiled: str, twin: str):
    name = compiled if kind == "c" else twin
    try:
        return importlib.import_module(name)
    except ImportError:
        pytest.skip("compiled module not built")
