"""Build of the native hot paths (client/_native.c: gate fast path, PII screen,
keyed hashes, shingles, LSH index, dedup-key filter; client/_pii.c: the exact PII
scrubbing of ASCII text; client/_seal.c: a batch's contents as JSON, sealed with
libcrypto's AES-GCM, loaded at run time); the rest is in pyproject.toml.

The extensions are optional: where no C compiler is at hand (a slim container image),
the install still succeeds and client/ uses its pure-Python paths, with the same
decisions and a lower ingestion rate. CI has gcc, and the tests import the modules.
"""

import sys

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "client._native",
            sources=["client/_native.c"],
            depends=["client/aead.h"],
            extra_compile_args=["-O3", "-std=c11", "-Wall"],
            libraries=["dl"] if sys.platform.startswith("linux") else [],
            optional=True,
        ),
        Extension(
            "client._pii",
            sources=["client/_pii.c"],
            extra_compile_args=["-O3", "-std=c11", "-Wall"],
            optional=True,
        ),
        Extension(
            "client._seal",
            sources=["client/_seal.c"],
            depends=["client/aead.h"],
            extra_compile_args=["-O3", "-std=c11", "-Wall"],
            libraries=["dl"] if sys.platform.startswith("linux") else [],
            optional=True,
        ),
    ]
)
