#!/usr/bin/env python3
"""Two small image tools for ferry's Linux guests, with the standard library only.

extract-vmlinux BZIMAGE OUT   the ELF kernel inside a bzImage (xz or gzip payload)
initramfs BUSYBOX INIT OUT    a gzip'd newc cpio with busybox as /bin/busybox and /init
"""
import gzip
import lzma
import sys
import zlib

ELF_MAGIC = b"\x7fELF"


def extract_vmlinux(src, dst):
    data = open(src, "rb").read()
    for magic, decompress in (
        (b"\xfd7zXZ\x00", lambda b: lzma.LZMADecompressor().decompress(b)),
        (b"\x1f\x8b\x08", lambda b: zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(b)),
    ):
        start = data.find(magic)
        while start >= 0:
            try:
                out = decompress(data[start:])
            except (lzma.LZMAError, zlib.error):
                out = b""
            if out.startswith(ELF_MAGIC):
                open(dst, "wb").write(out)
                return
            start = data.find(magic, start + 1)
    sys.exit(f"{src}: no xz or gzip compressed ELF kernel found")


def cpio_entry(name, mode, data=b"", ino=1):
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
    header = b"070701" + b"".join(b"%08x" % f for f in fields)
    out = header + name.encode() + b"\0"
    out += b"\0" * (-len(out) % 4)
    out += data + b"\0" * (-len(data) % 4)
    return out


def initramfs(busybox, init, dst):
    entries = [
        ("bin", 0o040755, b""),
        ("dev", 0o040755, b""),
        ("proc", 0o040755, b""),
        ("sys", 0o040755, b""),
        ("bin/busybox", 0o100755, open(busybox, "rb").read()),
        ("init", 0o100755, open(init, "rb").read()),
    ]
    archive = b"".join(cpio_entry(n, m, d, i + 1) for i, (n, m, d) in enumerate(entries))
    archive += cpio_entry("TRAILER!!!", 0, b"", 0)
    with gzip.open(dst, "wb") as f:
        f.write(archive)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "extract-vmlinux":
        extract_vmlinux(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 5 and sys.argv[1] == "initramfs":
        initramfs(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(__doc__)
