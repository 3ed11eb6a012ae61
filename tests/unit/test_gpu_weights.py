"""Packing the classifier's weights in fp16 for a GPU host, and unpacking them in fp32 there."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from benchmarks import gpu_weights


def test_a_packed_model_unpacks_to_its_weights_rounded_to_fp16_in_fp32(weights, tmp_path):
    src = weights / "encoder"
    gpu_weights.pack_model(src, tmp_path / "packed" / "model")
    original = load_file(str(src / "model.safetensors"))
    assert all(t.dtype == torch.float16 for t in load_file(str(tmp_path / "packed" / "model" / "model.safetensors")).values()
               if t.is_floating_point())
    (tmp_path / "packed" / gpu_weights.PACKED).write_text(json.dumps({"dtype": "float16"}))
    package = gpu_weights.unpack(tmp_path / "packed", tmp_path / "site")
    assert package == tmp_path / "site" / gpu_weights.PACKAGE and (package / "__init__.py").is_file()
    back = load_file(str(package / "model" / "model.safetensors"))
    assert back.keys() == original.keys()
    for k, t in original.items():
        assert back[k].dtype == t.dtype
        assert torch.equal(back[k], t.half().to(t.dtype) if t.is_floating_point() else t)
    assert {p.name for p in (package / "model").iterdir()} == {p.name for p in src.iterdir()}
    # found where the registry looks for the package, ahead of any installed copy
    found = subprocess.run([sys.executable, "-c", f"import importlib.util as u; "
                            f"print(u.find_spec({gpu_weights.PACKAGE!r}).submodule_search_locations[0])"],
                           env={"PYTHONPATH": str(tmp_path / "site")}, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == str(package)


def test_unpack_refuses_a_folder_pack_did_not_write(tmp_path):
    with pytest.raises(SystemExit, match="no PACKED.json"):
        gpu_weights.unpack(tmp_path, tmp_path / "site")
