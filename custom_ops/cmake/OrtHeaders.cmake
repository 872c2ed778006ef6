# Finds the ONNX Runtime C/C++ API headers and sets ORT_INCLUDE_DIR.
# Order: -DORT_INCLUDE_DIR / $ORT_INCLUDE_DIR, then the user cache, then the pinned npm
# package com.github.asus4.onnxruntime@0.4.9 (the official 1.29.0 headers, MIT), checked by
# sha256; only its Headers/ folder is kept, in the cache. Headers are never committed.

set(ORT_HEADERS_VERSION "1.29.0")
set(ORT_NPM_PACKAGE "com.github.asus4.onnxruntime@0.4.9")
set(ORT_NPM_SHA256 "e59788788818fdde1b2e522e766a21ba0f7d8391de55737abf81e32cc801785d")
set(ORT_NPM_HEADERS "package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64/onnxruntime.framework/Headers")

if(NOT ORT_INCLUDE_DIR AND DEFINED ENV{ORT_INCLUDE_DIR})
  set(ORT_INCLUDE_DIR "$ENV{ORT_INCLUDE_DIR}")
endif()

if(ORT_INCLUDE_DIR)
  if(NOT EXISTS "${ORT_INCLUDE_DIR}/onnxruntime_cxx_api.h")
    message(FATAL_ERROR "ORT_INCLUDE_DIR=${ORT_INCLUDE_DIR} has no onnxruntime_cxx_api.h; point it at the "
                        "folder holding the ONNX Runtime C/C++ API headers.")
  endif()
  return()
endif()

if(DEFINED ENV{XDG_CACHE_HOME} AND NOT "$ENV{XDG_CACHE_HOME}" STREQUAL "")
  set(_cache_root "$ENV{XDG_CACHE_HOME}")
else()
  set(_cache_root "$ENV{HOME}/.cache")
endif()
set(_cached "${_cache_root}/tfsa-onnx/ort-headers-${ORT_HEADERS_VERSION}")
if(EXISTS "${_cached}/onnxruntime_cxx_api.h")
  set(ORT_INCLUDE_DIR "${_cached}")
  message(STATUS "ONNX Runtime headers: ${ORT_INCLUDE_DIR} (cache)")
  return()
endif()

find_program(NPM_EXECUTABLE npm)
if(NOT NPM_EXECUTABLE)
  message(FATAL_ERROR "The ONNX Runtime headers are needed and npm was not found to fetch them: install npm, "
                      "or set ORT_INCLUDE_DIR to a folder holding onnxruntime_cxx_api.h.")
endif()
set(_work "${CMAKE_BINARY_DIR}/ort-headers-download")
file(REMOVE_RECURSE "${_work}")
file(MAKE_DIRECTORY "${_work}")
message(STATUS "Fetching the ONNX Runtime ${ORT_HEADERS_VERSION} headers (npm pack ${ORT_NPM_PACKAGE}, ~150 MB)")
execute_process(COMMAND "${NPM_EXECUTABLE}" pack "${ORT_NPM_PACKAGE}" --silent
                WORKING_DIRECTORY "${_work}" RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _err)
file(GLOB _tarball "${_work}/*.tgz")
if(NOT _rc EQUAL 0 OR NOT _tarball)
  message(FATAL_ERROR "Downloading ${ORT_NPM_PACKAGE} with npm failed (${_err}); check network access to the "
                      "npm registry, or set ORT_INCLUDE_DIR to a folder holding onnxruntime_cxx_api.h.")
endif()
file(SHA256 "${_tarball}" _sha)
if(NOT _sha STREQUAL ORT_NPM_SHA256)
  message(FATAL_ERROR "${ORT_NPM_PACKAGE} has sha256 ${_sha}, expected ${ORT_NPM_SHA256}; refusing to use it. "
                      "Set ORT_INCLUDE_DIR to a folder holding the official ONNX Runtime headers.")
endif()
execute_process(COMMAND tar -xzf "${_tarball}" "${ORT_NPM_HEADERS}" WORKING_DIRECTORY "${_work}"
                RESULT_VARIABLE _rc ERROR_VARIABLE _err)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "Extracting the headers from ${_tarball} failed (${_err}); set ORT_INCLUDE_DIR instead.")
endif()
file(GLOB _headers "${_work}/${ORT_NPM_HEADERS}/*.h")
file(MAKE_DIRECTORY "${_cached}.tmp")
file(COPY ${_headers} DESTINATION "${_cached}.tmp")
file(RENAME "${_cached}.tmp" "${_cached}")
file(REMOVE_RECURSE "${_work}")
set(ORT_INCLUDE_DIR "${_cached}")
message(STATUS "ONNX Runtime headers: ${ORT_INCLUDE_DIR}")
