"""Generate the cffi (API mode) C source of the binding from the public header.

The declarations between `/* cdef-begin */` and `/* cdef-end */` in csrc/include/mllama.h are the
cdef: the C compiler then checks the binding against the same header the C++ implements, so Python
never mirrors a struct layout by hand. Usage: python build_ffi.py mllama.h out.c
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

# Python-side callbacks (cffi `extern "Python"`), implemented in python/mllama/_native/log.py.
PYTHON_CALLBACKS = 'extern "Python" void _mllama_log_trampoline(int32_t, const char *, void *);\n'


def cdef_from_header(header_text: str) -> str:
    match = re.search(r"/\* cdef-begin \*/(.*)/\* cdef-end \*/", header_text, re.S)
    if not match:
        raise SystemExit("mllama.h has no cdef-begin/cdef-end section")
    body = match.group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)  # comments
    body = body.replace("MLLAMA_API ", "")
    return body + PYTHON_CALLBACKS


def build_ffi(header: Path):
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(cdef_from_header(header.read_text()))
    ffi.set_source("mllama._mllama_cffi", '#include "mllama.h"\n')
    return ffi


def main(argv: list[str]) -> None:
    header, out = Path(argv[1]), Path(argv[2])
    build_ffi(header).emit_c_code(str(out))


if __name__ == "__main__":
    main(sys.argv)
