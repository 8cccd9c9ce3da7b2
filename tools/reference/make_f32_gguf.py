#!/usr/bin/env python3
"""Write an F32 copy of a GGUF file, dequantising every tensor with the `gguf` package.

The F32 file is what the transformers parity test compares against: transformers also
dequantises to f32, so both engines see identical weights. Usage:
    make_f32_gguf.py IN.gguf OUT.gguf
"""
import sys

import numpy as np
from gguf import GGUFReader, GGUFWriter, GGUFValueType, LlamaFileType
from gguf.quants import dequantize


def copy_metadata(reader: GGUFReader, writer: GGUFWriter, overrides: dict) -> None:
    """Copy every key/value of `reader` into `writer`, replacing the values in `overrides`."""
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = overrides.get(key, field.contents())
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, vtype, sub_type=sub)


def main(src: str, dst: str) -> None:
    reader = GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(dst, arch)
    copy_metadata(reader, writer, {"general.file_type": int(LlamaFileType.ALL_F32)})
    for t in reader.tensors:
        data = dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = [int(d) for d in reversed(t.shape)]  # numpy order: outermost first
        writer.add_tensor(t.name, data.reshape(shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
