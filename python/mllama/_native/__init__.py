"""The C library as Python sees it: the cffi binding, typed exceptions, handles, logging, and the
library's tables (GGUF names, ggml types, devices, defaults). Nothing above this package calls
`lib` without going through `call()`."""
