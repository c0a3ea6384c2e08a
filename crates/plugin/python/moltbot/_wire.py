"""The protocol buffers encoding of moltbot.plugin.v1's messages, whose fields are all strings (a field number to
its text), so the plugin host needs no generated code and no `protobuf` package."""


def _varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode(fields):
    """{field number: str} to bytes; empty strings are left out, as proto3 does."""
    out = bytearray()
    for number in sorted(fields):
        data = fields[number].encode("utf-8")
        if data:
            out += _varint(number << 3 | 2) + _varint(len(data)) + data
    return bytes(out)


def decode(data):
    """Bytes to {field number: str}, skipping fields of other wire types."""
    fields, i = {}, 0

    def varint():
        nonlocal i
        shift = value = 0
        while True:
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while i < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 2:
            length = varint()
            fields[number] = bytes(data[i : i + length]).decode("utf-8")
            i += length
        elif wire == 0:
            varint()
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
    return fields
