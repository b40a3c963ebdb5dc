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

# client/aead.h loads libcrypto at run time (dlopen: libdl on older glibc)
_DL = ["dl"] if sys.platform.startswith("linux") else []
_HEADERS = ["client/aead.h", "client/json_out.h"]


def _extension(name: str, libraries: list[str]) -> Extension:
    return Extension(
        f"client.{name}",
        sources=[f"client/{name}.c"],
        depends=_HEADERS,
        extra_compile_args=["-O3", "-std=c11", "-Wall"],
        libraries=libraries,
        optional=True,
    )


setup(
    ext_modules=[
        _extension("_native", _DL),
        _extension("_pii", []),
        _extension("_seal", _DL),
    ]
)
