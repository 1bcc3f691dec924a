"""Declares the Cython extensions; all metadata lives in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(f"ferrotunnel.{name}", [f"src/ferrotunnel/{name}.pyx"], extra_compile_args=["-O2"])
    for name in ("_frames", "_pool", "_sched", "http_kernel")
]

setup(
    # src on the include path: _sched.pyx cimports ferrotunnel/_frames.pxd (relative or absolute)
    ext_modules=cythonize(extensions, include_path=["src"], compiler_directives={"language_level": 3}),
)
