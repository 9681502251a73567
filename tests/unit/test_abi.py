"""The ctypes mirrors against the C compiler's layout of bpf/sockwatch.h: every field's
offset and every struct's size (the agent repeats the size check against bcc at load)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import tempfile

import pytest

from sockwatch.kernel import abi
from sockwatch.kernel.bpfload import BPF_DIR

STRUCTS = {"sw_sock": abi.SwSock, "sw_event": abi.SwEvent, "sw_pending": abi.SwPending}


def compiled_layout() -> dict[str, int]:
    lines = []
    for cname, py in STRUCTS.items():
        lines.append(f'printf("{cname} %zu\\n", sizeof(struct {cname}));')
        for fname, *_ in py._fields_:
            lines.append(f'printf("{cname}.{fname} %zu\\n", offsetof(struct {cname}, {fname}));')
    src = (
        "#include <stdio.h>\n#include <stddef.h>\n#include <linux/types.h>\n"
        f'#include "{BPF_DIR}/sockwatch.h"\nint main(void) {{\n' + "\n".join(lines) + "\nreturn 0; }\n"
    )
    with tempfile.TemporaryDirectory() as d:
        c, exe = os.path.join(d, "layout.c"), os.path.join(d, "layout")
        with open(c, "w") as f:
            f.write(src)
        subprocess.run(["gcc", "-o", exe, c], check=True)
        out = subprocess.run([exe], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def test_every_field_and_size_matches_the_header():
    layout = compiled_layout()
    for cname, py in STRUCTS.items():
        assert ctypes.sizeof(py) == layout[cname], cname
        for fname, *_ in py._fields_:
            assert getattr(py, fname).offset == layout[f"{cname}.{fname}"], f"{cname}.{fname}"


def test_size_mismatch_is_reported_with_a_remedy():
    with pytest.raises(abi.AbiMismatch, match="update the ctypes mirror"):
        abi.check_sizes({"sw_sock": ctypes.sizeof(abi.SwSock) + 8})


def test_header_and_mirror_agree_on_event_and_counter_numbers():
    text = (BPF_DIR / "sockwatch.h").read_text()
    defines = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "#define" and parts[1].startswith(("SW_EV_", "SW_C_", "SW_F_")):
            defines[parts[1]] = int(parts[2], 0)
    for name, value in defines.items():
        assert getattr(abi, name) == value, name
