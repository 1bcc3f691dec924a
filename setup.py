"""Declares the Cython extensions; all metadata lives in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(f"ferrotunnel.{name}", [f"src/ferrotunnel/{name}.pyx"], extra_compile_args=["-O2"])
    for name in ("_frames", "_pool", "_sched")
]

setup(
    ext_modules=cythonize(extensions, compiler_directives={"language_level": 3}),
)
