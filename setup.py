"""Build of the native hot paths (client/_native.c); the rest is in pyproject.toml.

The extension is optional: where no C compiler is at hand (a slim container image),
the install still succeeds and client/ uses its pure-Python paths, with the same
decisions and a lower ingestion rate. CI has gcc, and the tests import the module.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "client._native",
            sources=["client/_native.c"],
            extra_compile_args=["-O3", "-std=c11", "-Wall"],
            optional=True,
        )
    ]
)
