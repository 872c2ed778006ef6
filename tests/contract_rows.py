"""contract.h's attribute tables as the library reports them (tfsa_attribute_info,
tfsa_gqa_attribute_info), and the check that a Python mirror in reference.py agrees."""

from __future__ import annotations

import ctypes

import numpy as np

import tfsa_onnx


class AttributeInfo(ctypes.Structure):
    """TfsaAttributeInfo of contract.h."""

    _fields_ = [
        ("name", ctypes.c_char_p),
        ("is_float", ctypes.c_int32),
        ("low_open", ctypes.c_int32),
        ("offset", ctypes.c_size_t),
        ("default_value", ctypes.c_double),
        ("low", ctypes.c_double),
        ("high", ctypes.c_double),
        ("max_count", ctypes.c_int64),
    ]


def library_rows(function: str, library: str | None = None) -> list[AttributeInfo]:
    """Every row of one of the library's attribute tables, in the order its checks run."""
    lib = ctypes.CDLL(library or tfsa_onnx.get_library_path())
    info_of = getattr(lib, function)
    info_of.argtypes = [ctypes.c_int32, ctypes.POINTER(AttributeInfo)]
    info_of.restype = ctypes.c_int32
    rows = []
    for index in range(info_of(0, None)):
        info = AttributeInfo()
        info_of(index, ctypes.byref(info))
        rows.append(info)
    return rows


def check_mirror(rows: list[AttributeInfo], attributes: type, bounds: dict) -> None:
    """The mirror has the struct's fields in the struct's order, their types (float or integer),
    their defaults (as float32 where float) and the table's bounds."""
    assert [i.name.decode() for i in sorted(rows, key=lambda i: i.offset)] == attributes.names()
    defaults = attributes()
    for info in rows:
        name = info.name.decode()
        value = getattr(defaults, name)
        if info.max_count > 0:  # a list of floats (head_thresholds), empty by default
            assert info.is_float and value == (), name
        else:
            assert bool(info.is_float) == isinstance(value, float), name
            assert info.default_value == (np.float32(value) if info.is_float else value), name
        assert (info.low, info.high, bool(info.low_open)) == bounds[name], name
    assert set(bounds) == set(attributes.names())
