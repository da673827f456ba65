"""The codes and constants shared by Python, C++ and Triton are one set of numbers: csrc/common/codes.h
(parsed here) and the Triton constexprs (found by importing every kdops.backends.triton module)
equal kdops/_codes.py."""
from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pytest
import torch

from kdops import _codes

CODES_H = Path(__file__).resolve().parent.parent / "csrc" / "common" / "codes.h"


def _snake(name: str) -> str:
    """kSkewForwardKL -> skew_forward_kl, kRKDDistance -> rkd_distance, kNormEps2 -> norm_eps2."""
    name = name[1:]
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name)
    return name.lower()


def parse_codes_h(text: str) -> tuple[dict[str, dict[str, int]], dict[str, float]]:
    """({enum name: {member: value}}, {constexpr name: value}) of codes.h."""
    text = re.sub(r"//[^\n]*", "", text)
    enums = {}
    for name, body in re.findall(r"enum\s+(\w+)\s*:\s*int\s*\{([^}]*)\}", text):
        members = {}
        for member, value in re.findall(r"(k\w+)\s*=\s*(-?\d+)\s*,?", body):
            members[member] = int(value)
        enums[name] = members
    constants = {m: float(v) for m, v in re.findall(r"constexpr\s+double\s+(k\w+)\s*=\s*([-+0-9.eE]+)\s*;", text)}
    return enums, constants


ENUMS, CONSTANTS = parse_codes_h(CODES_H.read_text())

# What each C++ enum must equal: {snake-cased member: code} from kdops/_codes.py.
EXPECTED_ENUMS = {
    "DType": {str(dt).removeprefix("torch.").replace("bfloat16", "b_float16"): code
              for dt, code in _codes.DTYPE_CODES.items()},
    "Divergence": {name: i for i, name in enumerate(_codes.KD_DIVERGENCES)},
    "AffinityKind": {name: i for i, name in enumerate(_codes.AFFINITY_KINDS)},
    "RelationLoss": {"sp": _codes.SP, "rkd_distance": _codes.RKD_DISTANCE, "rkd_angle": _codes.RKD_ANGLE},
}
EXPECTED_CONSTANTS = {
    name.lower(): getattr(_codes, name) for name in ("NORM_EPS", "NORM_EPS2", "DIST_EPS2", "CLOSE_PAIR_RATIO")
}


def test_parser_reads_the_header():
    enums, constants = parse_codes_h("enum Foo : int {\n  kOneTwo = 1,  // c\n  kRKDThree = 3,\n};\n"
                                     "constexpr double kSomeEps2 = 1e-24;  // x\n")
    assert enums == {"Foo": {"kOneTwo": 1, "kRKDThree": 3}} and constants == {"kSomeEps2": 1e-24}
    assert [_snake(n) for n in ("kOneTwo", "kRKDThree", "kSomeEps2", "kJSD")] == ["one_two", "rkd_three",
                                                                                 "some_eps2", "jsd"]


@pytest.mark.parametrize("enum", sorted(EXPECTED_ENUMS))
def test_header_enums_equal_python(enum):
    assert enum in ENUMS, f"csrc/common/codes.h has no `enum {enum} : int`"
    assert {_snake(m): v for m, v in ENUMS[enum].items()} == EXPECTED_ENUMS[enum]


def test_dtype_codes_cover_the_float_dtypes():
    assert set(_codes.DTYPE_CODES) == {torch.float32, torch.float16, torch.bfloat16, torch.float64}


def test_header_constants_equal_python():
    assert {_snake(m): v for m, v in CONSTANTS.items()} == EXPECTED_CONSTANTS
    assert _codes.CLOSE_PAIR_RATIO == 2.0**-10 and _codes.NORM_EPS2 == _codes.NORM_EPS**2


def _triton_constexprs() -> dict[str, dict[str, object]]:
    """{name: {module: value}} of every module-level tl.constexpr in kdops.backends.triton."""
    tl = pytest.importorskip("triton.language")
    import kdops.backends.triton as package

    found: dict[str, dict[str, object]] = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, tl.constexpr) and name.isupper():
                found.setdefault(name, {})[module.__name__] = value.value
    return found


def test_triton_constexprs_equal_python():
    found = _triton_constexprs()
    expected = {name.upper(): code for name, code in EXPECTED_ENUMS["Divergence"].items()}
    expected.update({name.upper(): code for name, code in EXPECTED_ENUMS["AffinityKind"].items()})
    expected.update({name.upper(): code for name, code in EXPECTED_ENUMS["RelationLoss"].items()})
    expected.update({name.upper(): value for name, value in EXPECTED_CONSTANTS.items()})
    missing = sorted(set(expected) - set(found))
    assert not missing, f"no Triton constexpr for {missing}"
    for name, value in expected.items():
        assert found[name] == {module: value for module in found[name]}, name
    # internal affinity kinds (e.g. EXACT_SQUARED) must not reuse a public kind's code
    kinds = set(EXPECTED_ENUMS["AffinityKind"].values())
    for name, where in found.items():
        if name == "EXACT_SQUARED":
            assert not set(where.values()) & kinds
