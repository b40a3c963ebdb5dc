"""Build of the native hot paths; everything else is configured in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "client._native",
            sources=["client/_native.c"],
            extra_compile_args=["-O3", "-std=c11", "-Wall"],
        )
    ]
)
