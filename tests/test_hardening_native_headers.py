"""The pack's own (native) adapter files carry JSON in their safetensors header; every hostile value there
is one :class:`WeightError` (issue 21, class 2): nesting bombs, integers over Python's digit limit,
over-long fields, plain garbage, in each JSON field the reader parses."""

from __future__ import annotations

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

import weight_fixtures as wf
from conftest import pack

native = pack("adapters.formats.native_format")
formats = pack("adapters.formats.weight_formats")
WeightError = pack("adapters.weights.weight_errors").WeightError

VALUES = {
    "nesting bomb": "[" * 100_000 + "]" * 100_000,
    "dict nesting bomb": '{"a":' * 50_000 + "1" + "}" * 50_000,
    "huge integer": "9" * 5000,
    "over-long string": '"' + "x" * (2 * 1024**2) + '"',
    "garbage": "{not json",
}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("native") / "faceid.safetensors"
    native.write_native(formats.convert(wf.ip_family_state("faceid", "sd15", seed=5, lora_rank=4)[0]), str(path))
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


@pytest.mark.parametrize("field", ["projector", "extras", "metadata"])
@pytest.mark.parametrize("case", sorted(VALUES))
def test_hostile_json_in_a_header_field_is_one_weight_error(tmp_path, good, field, case):
    tensors, header = good
    path = tmp_path / "hostile.safetensors"
    save_file(tensors, str(path), metadata=dict(header, **{field: VALUES[case]}))
    with pytest.raises(WeightError) as info:
        native.read_native(str(path))
    assert field in str(info.value)
