"""What a pickle-based weights file holds, read from its opcodes without running them.

`describe_pickle(path)` names the file's format (torch zip, torch legacy, safetensors) and the
Python objects its pickle would create (the GLOBALs it names), so a command can say what a file
is and why loading it needs trust before anything is unpickled. Nothing here imports torch.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

# The globals of a plain state dict: containers and torch's tensor rebuilders (weights_only allows them).
_TENSOR_GLOBALS = ("collections.OrderedDict", "torch._utils.", "torch.", "builtins.set", "__builtin__.set")
_STRING_OPS = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "SHORT_BINSTRING", "BINSTRING"}
)
_LEGACY_PICKLES = 4  # a legacy torch file: magic number, protocol, system info, then the object


@dataclass
class PickleInfo:
    """A weights file as read without unpickling it."""

    path: Path
    format: str  # "torch zip" | "torch legacy" | "safetensors" | "unknown"
    size: int  # bytes
    globals: list[str] = field(default_factory=list)  # module.name of every GLOBAL, in order, unique

    @property
    def objects(self) -> list[str]:
        """The globals that are more than tensors and containers: the classes unpickling would build."""
        return [g for g in self.globals if not g.startswith(_TENSOR_GLOBALS) or g.startswith("torch.nn.")]

    def text(self) -> str:
        """One phrase: 'a torch zip file (32.1 MB) holding a pickled torchxrayvision.models.DenseNet ...'."""
        size = f"{self.size / 1e6:.1f} MB"
        if self.format in ("safetensors", "unknown"):
            return f"a {self.format} file ({size})"
        if not self.objects:
            return f"a {self.format} file ({size}) holding tensors only"
        main = next((g for g in self.objects if not g.startswith("torch.")), self.objects[0])
        more = ", ".join(self.objects[:8]) + (", ..." if len(self.objects) > 8 else "")
        return f"a {self.format} file ({size}) holding a pickled {main} (Python objects: {more})"


def _globals(data: bytes, pickles: int) -> list[str]:
    """module.name of the GLOBAL / STACK_GLOBAL opcodes of the first `pickles` pickles in `data`."""
    found: list[str] = []
    stream = io.BytesIO(data)
    for _ in range(pickles):
        if stream.tell() >= len(data):
            break
        strings: list[str] = []
        try:
            for op, arg, _pos in pickletools.genops(stream):
                if op.name in _STRING_OPS:
                    strings.append(str(arg))
                elif op.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(".".join(strings[-2:]))
                if op.name == "STOP":
                    break
        except (ValueError, EOFError):  # not a pickle (further): what was read stands
            break
    return list(dict.fromkeys(found))


def describe_pickle(path: Path) -> PickleInfo:
    """Format and named globals of a weights file (torch zip / legacy, safetensors), never executing it."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("data.pkl")]
            data = archive.read(names[0]) if names else b""
        return PickleInfo(path, "torch zip", size, _globals(data, 1))
    if head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        return PickleInfo(path, "safetensors", size)
    if head[:1] == b"\x80":  # pickle protocol 2+: torch's legacy format starts with a pickled magic number
        return PickleInfo(path, "torch legacy", size, _globals(path.read_bytes(), _LEGACY_PICKLES))
    return PickleInfo(path, "unknown", size)
