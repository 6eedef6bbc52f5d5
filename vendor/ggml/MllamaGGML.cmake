# Locate ggml for mllama. Our own module: no ggml source is vendored.
#
# Default: the ggml shipped by the PyPI package libggml-python, pinned exactly (ggml has no stable
# ABI). scikit-build-core puts its CMake config on the prefix path through the `cmake.prefix` entry
# point. Alternative: -DMLLAMA_GGML_SOURCE_DIR=/path/to/ggml builds that ggml source tree and ships
# its libraries inside the mllama package.
#
# Defines the targets mllama links against (MLLAMA_GGML_TARGETS) and the runtime search path of
# the installed libraries (MLLAMA_GGML_RPATH, relative to the package folder).

set(MLLAMA_GGML_VERSION "0.20.2" CACHE STRING "ggml version mllama is built against (libggml-python==0.20.2.post1)")
set(MLLAMA_GGML_SOURCE_DIR "" CACHE PATH "Build this ggml source tree instead of using libggml-python")
# The folder of the library itself in a runtime search path: $ORIGIN for ELF (Linux), @loader_path on macOS.
if(APPLE)
    set(MLLAMA_RPATH_ORIGIN "@loader_path")
else()
    set(MLLAMA_RPATH_ORIGIN "$ORIGIN")
endif()

if(MLLAMA_GGML_SOURCE_DIR)
    if(NOT EXISTS "${MLLAMA_GGML_SOURCE_DIR}/CMakeLists.txt")
        message(FATAL_ERROR "MLLAMA_GGML_SOURCE_DIR='${MLLAMA_GGML_SOURCE_DIR}' is not a ggml source tree")
    endif()
    set(GGML_BUILD_TESTS OFF CACHE BOOL "" FORCE)
    set(GGML_BUILD_EXAMPLES OFF CACHE BOOL "" FORCE)
    set(BUILD_SHARED_LIBS ON CACHE BOOL "" FORCE)
    add_subdirectory("${MLLAMA_GGML_SOURCE_DIR}" "${CMAKE_BINARY_DIR}/ggml-src-build")
    set(MLLAMA_GGML_TARGETS ggml ggml-base)
    set(MLLAMA_GGML_RPATH "${MLLAMA_RPATH_ORIGIN}")
    # the ggml libraries are installed next to libmllama; let them find each other (ggml-cpu) there
    foreach(target ggml ggml-base ggml-cpu)
        if(TARGET ${target})
            set_target_properties(${target} PROPERTIES INSTALL_RPATH "${MLLAMA_RPATH_ORIGIN}")
        endif()
    endforeach()
    set(MLLAMA_GGML_FROM_SOURCE ON)
    message(STATUS "mllama: building ggml from ${MLLAMA_GGML_SOURCE_DIR}")
else()
    # libggml-python installs its libraries (and CMake config) under lib64 on x86_64 Linux.
    set_property(GLOBAL PROPERTY FIND_LIBRARY_USE_LIB64_PATHS ON)
    find_package(ggml ${MLLAMA_GGML_VERSION} EXACT CONFIG QUIET)
    if(NOT ggml_FOUND)
        message(FATAL_ERROR
            "mllama: ggml ${MLLAMA_GGML_VERSION} not found. Install it with "
            "'pip install libggml-python==0.20.2.post1' (pip does this for you when building "
            "with build isolation), or pass -DMLLAMA_GGML_SOURCE_DIR=/path/to/ggml.")
    endif()
    set(MLLAMA_GGML_TARGETS ggml::ggml ggml::ggml-base)
    # The exported targets' rpath names a `lib` folder that does not exist; the installed package
    # sits beside `libggml/` in site-packages, so point at both candidate folders.
    set(MLLAMA_GGML_RPATH "${MLLAMA_RPATH_ORIGIN}/../libggml/lib64;${MLLAMA_RPATH_ORIGIN}/../libggml/lib")
    set(MLLAMA_GGML_FROM_SOURCE OFF)
    message(STATUS "mllama: using ggml ${ggml_VERSION} from ${ggml_DIR}")
endif()
