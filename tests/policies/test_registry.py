"""Every config-group YAML names a registered policy and lists exactly its constructor's parameters."""
import inspect
import re
from pathlib import Path

import pytest
import yaml

from flexkv_runtime.policies import available, make_policy, policy_class
from flexkv_runtime.policies.base import policy_name

CONF = Path(__file__).resolve().parents[2] / "conf"
KINDS = ("eviction", "admission", "prefetch")
SUPPLIED_BY_MANAGER = {"self", "capacity_blocks"}


def group_files():
    return [(kind, path) for kind in KINDS for path in sorted((CONF / kind).glob("*.yaml"))]


@pytest.mark.parametrize(("kind", "path"), group_files(), ids=lambda x: getattr(x, "name", x))
def test_yaml_names_a_policy_and_lists_every_parameter_with_its_default(kind, path):
    spec = yaml.safe_load(path.read_text())
    assert path.stem == spec["name"]
    cls = policy_class(kind, spec["name"])
    defaults = {
        name: param.default
        for name, param in inspect.signature(cls.__init__).parameters.items()
        if name not in SUPPLIED_BY_MANAGER
    }
    assert {k: v for k, v in spec.items() if k != "name"} == defaults
    fixed = {"capacity_blocks": 16} if kind == "eviction" else {}
    assert make_policy(kind, spec, **fixed).name == spec["name"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_registered_policy_has_a_yaml(kind):
    assert sorted(path.stem for path in (CONF / kind).glob("*.yaml")) == available(kind)


def test_unknown_name_lists_the_valid_choices():
    with pytest.raises(ValueError) as err:
        make_policy("eviction", {"name": "nope"}, capacity_blocks=4)
    message = str(err.value)
    assert "'nope'" in message
    assert all(name in message for name in available("eviction"))


@pytest.mark.parametrize("spec, message", [
    (None, "a policy config is a name or a mapping with a 'name', got None"),
    ({"small_fraction": 0.1}, "a policy config is a name or a mapping with a 'name'"),
])
def test_a_spec_without_a_name_says_so(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        policy_name(spec)


def test_a_user_policy_whose_module_is_missing_names_the_setting():
    with pytest.raises(ValueError, match="eviction policy 'mypkg.mod:Cls': cannot import 'mypkg.mod'"):
        make_policy("eviction", "mypkg.mod:Cls", capacity_blocks=4)


def test_unknown_parameter_fails_with_the_valid_ones():
    with pytest.raises(ValueError) as err:
        make_policy("eviction", {"name": "s3fifo", "small_ratio": 0.2}, capacity_blocks=4)
    assert "'small_ratio'" in str(err.value) and "valid parameters: ['small_fraction', " in str(err.value)
