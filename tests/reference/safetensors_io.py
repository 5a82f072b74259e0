#!/usr/bin/env python3
"""Minimal safetensors reader/writer on top of numpy (standard library + numpy only).
A tensor given to the writer as a tuple (dtype tag, array) is stored as that array's raw bytes under
that tag (e.g. ("F8_E4M3", uint8 codes), ("BF16", uint16 bits)).

File layout: an 8-byte little-endian unsigned header length N, then N bytes of JSON header
(name -> {"dtype", "shape", "data_offsets": [begin, end]} plus an optional "__metadata__" map of
strings), then the tensor bytes, row-major and little-endian; offsets are relative to the end of the
header. The writer pads the header with spaces so the data starts at an 8-byte boundary and lays the
tensors out back to back in the order given.

read_safetensors(path)            -> dict name -> numpy array (F32/F64/F16 native, BF16 upcast to float32)
write_safetensors(path, tensors)  -> writes F32 (default) or, with keep_f64=True, float64 arrays as F64
"""
import json
import struct

import numpy as np

_NP_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "U8": np.dtype("u1"),
}
_ITEMSIZE = {"BF16": 2, **{k: v.itemsize for k, v in _NP_DTYPES.items()}}


def _bf16_to_f32(raw: bytes) -> np.ndarray:
    """bfloat16 is the top half of an IEEE float32: shift the 16 bits up and reinterpret."""
    halves = np.frombuffer(raw, dtype="<u2").astype(np.uint32)
    return (halves << np.uint32(16)).view(np.float32)


def read_header(path):
    """Returns (header dict without __metadata__, metadata dict or {}, byte offset of the data)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        raw = f.read(n)
        if len(raw) != n:
            raise ValueError(f"{path}: header length {n} runs past the end of the file")
    header = json.loads(raw.decode("utf-8"))
    meta = header.pop("__metadata__", {}) or {}
    return header, meta, 8 + n


def read_safetensors(path, with_metadata=False):
    header, meta, data_start = read_header(path)
    with open(path, "rb") as f:
        f.seek(data_start)
        data = f.read()
    out = {}
    for name, info in header.items():
        dtype = info["dtype"]
        shape = tuple(int(s) for s in info["shape"])
        begin, end = (int(v) for v in info["data_offsets"])
        if dtype not in _ITEMSIZE:
            raise ValueError(f"{path}: tensor {name}: unsupported dtype {dtype}")
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if end - begin != count * _ITEMSIZE[dtype] or end > len(data) or begin < 0:
            raise ValueError(f"{path}: tensor {name}: offsets [{begin}, {end}) do not match "
                             f"{dtype}{list(shape)} or the file size")
        raw = data[begin:end]
        if dtype == "BF16":
            arr = _bf16_to_f32(raw)
        else:
            arr = np.frombuffer(raw, dtype=_NP_DTYPES[dtype]).copy()
        out[name] = arr.reshape(shape)
    return (out, meta) if with_metadata else out


def encode_safetensors(tensors, metadata=None, keep_f64=False) -> bytes:
    """Serialises {name: array} (insertion order). Floats become F32 unless keep_f64 and the array is
    float64. Integer arrays keep their type (I64/I32/U8)."""
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs = []
    offset = 0
    for name, value in tensors.items():
        if isinstance(value, tuple):  # (dtype tag, array of its raw storage): e.g. ("F8_E4M3", uint8 codes)
            tag, raw = value
            arr = np.ascontiguousarray(raw)
            blob = arr.tobytes()
            header[name] = {"dtype": tag, "shape": list(arr.shape), "data_offsets": [offset, offset + len(blob)]}
            blobs.append(blob)
            offset += len(blob)
            continue
        arr = np.asarray(value)
        if arr.dtype.kind == "f":
            if keep_f64 and arr.dtype == np.float64:
                arr, tag = arr.astype("<f8"), "F64"
            else:
                arr, tag = arr.astype("<f4"), "F32"
        elif arr.dtype == np.int64:
            arr, tag = arr.astype("<i8"), "I64"
        elif arr.dtype == np.int32:
            arr, tag = arr.astype("<i4"), "I32"
        elif arr.dtype == np.uint8:
            tag = "U8"
        else:
            raise TypeError(f"tensor {name}: cannot store dtype {arr.dtype}")
        blob = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": tag, "shape": list(arr.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * ((-len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def write_safetensors(path, tensors, metadata=None, keep_f64=False):
    with open(path, "wb") as f:
        f.write(encode_safetensors(tensors, metadata, keep_f64))


def _self_test():
    import os
    import tempfile
    rng = np.random.default_rng(0)
    t = {"a": rng.standard_normal((3, 5)).astype(np.float32), "b.c": np.arange(7, dtype=np.float32),
         "s": np.float32(2.5).reshape(())}
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "t.safetensors")
        write_safetensors(p, t, metadata={"format": "pt"})
        with open(p, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
        assert n % 8 == 0
        back, meta = read_safetensors(p, with_metadata=True)
        assert meta == {"format": "pt"}
        for k in t:
            assert back[k].dtype == np.float32 and back[k].shape == t[k].shape and np.array_equal(back[k], t[k])
        # BF16: take the top 16 bits of float32 values that are exactly representable in bf16
        vals = np.array([1.0, -2.5, 0.15625, 196608.0], dtype=np.float32)
        bits = (vals.view(np.uint32) >> 16).astype("<u2")
        hdr = json.dumps({"x": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}).encode()
        hdr += b" " * ((-len(hdr)) % 8)
        with open(p, "wb") as f:
            f.write(struct.pack("<Q", len(hdr)) + hdr + bits.tobytes())
        assert np.array_equal(read_safetensors(p)["x"], vals)
    print("safetensors_io self-test: OK")


if __name__ == "__main__":
    _self_test()
