"""What a torch.export `.pt2` archive would make `torch.export.load` execute, found before loading it.

`torch.export.load` unpickles with `weights_only=False`: weights and constants marked for pickling,
"opaque" and custom-class constants, legacy weight files, and the sample inputs when they do not load
as plain tensors. It also dlopens AOTInductor libraries packaged in the archive. Any of these can run
code the file carries, so the archive is read record by record (the reader torch itself uses, which
unpickles nothing) and those parts are listed; the adapter refuses the file unless `--trust-pickle`.
The load itself then runs with `TORCH_FORCE_WEIGHTS_ONLY_LOAD`, so a part this check missed still
cannot unpickle code.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.export.pt2_archive import constants as pt2


def unsafe_parts(path: Path) -> list[str]:
    """The parts of the archive that loading would unpickle or run, each in a few words; [] when none.
    Raises ValueError when the file is not a current torch.export archive."""
    from torch.export.pt2_archive._package import PT2ArchiveReader

    try:
        reader = PT2ArchiveReader(str(path))
        version = reader.read_string(pt2.ARCHIVE_VERSION_PATH)
    except Exception as exc:  # noqa: BLE001 - anything the reader refuses is "not an archive"
        raise ValueError(f"not a torch.export archive ({type(exc).__name__})") from None
    if version != pt2.ARCHIVE_VERSION_VALUE:
        raise ValueError(f"archive version {version!r}; this torch reads {pt2.ARCHIVE_VERSION_VALUE!r}")
    names = reader.get_file_names()
    found: list[str] = []
    for prefix, what in ((pt2.AOTINDUCTOR_DIR, "compiled AOTInductor code"), (pt2.EXECUTORCH_DIR, "ExecuTorch code"),
                         (pt2.MTIA_DIR, "MTIA code")):
        if any(n.startswith(prefix) for n in names):
            found.append(f"{what} under {prefix}")
    models = [n[len("models/"):-len(".json")] for n in names if n.startswith(pt2.MODELS_DIR) and n.endswith(".json")]
    for model in models:
        found += _payload_parts(reader, names, model, pt2.WEIGHTS_CONFIG_FILENAME_FORMAT, pt2.WEIGHTS_DIR, "weight")
        found += _payload_parts(reader, names, model, pt2.CONSTANTS_CONFIG_FILENAME_FORMAT, pt2.CONSTANTS_DIR, "constant")
        inputs = pt2.SAMPLE_INPUTS_FILENAME_FORMAT.format(model)
        if inputs in names and not _loads_as_tensors(reader.read_bytes(inputs)):
            found.append(f"sample inputs {inputs} hold pickled objects, not only tensors")
    return found


def _payload_parts(reader: Any, names: list[str], model: str, config_format: str, folder: str, kind: str) -> list[str]:
    legacy = f"{folder}{model}.pt"
    if legacy in names:
        return [] if _loads_as_tensors(reader.read_bytes(legacy)) else [f"legacy {kind} file {legacy} holds pickled objects"]
    config_name = config_format.format(model)
    if config_name not in names:
        return []
    try:
        config = json.loads(reader.read_string(config_name)).get("config", {})
    except (ValueError, AttributeError):
        return [f"{config_name} is not valid JSON"]
    found = []
    for fqn, meta in config.items():
        meta = meta if isinstance(meta, dict) else {}
        file_name = str(meta.get("path_name", ""))
        if meta.get("use_pickle"):
            found.append(f"{kind} {fqn!r} is pickled")
        elif file_name.startswith((pt2.OPAQUE_OBJ_FILENAME_PREFIX, pt2.CUSTOM_OBJ_FILENAME_PREFIX)):
            found.append(f"{kind} {fqn!r} is a pickled object ({file_name})")
    return found


def _loads_as_tensors(data: bytes) -> bool:
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - whatever the restricted unpickler refuses is a pickled object
        return False
    return True


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every torch.load inside runs with weights_only=True, whatever its caller asked for."""
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
