"""docs/doctor.md, generated from the rule registry (``python -m gradwise.doctor.docs > docs/doctor.md``)."""

from __future__ import annotations

from gradwise.doctor import RULES

INTRO = """# The doctor's rules

Generated from the rule registry by `python -m gradwise.doctor.docs`; do not edit by hand.

Every rule has a stable code that never changes meaning. Show one rule with
`gradwise explain GW302`; switch rules off with `Doctor(..., ignore=["GW307"])` or the recipe's
`doctor.ignore: [GW307]`.

| code | name | severity | stage | what it means |
| --- | --- | --- | --- | --- |
"""


def render() -> str:
    rules = [RULES[code] for code in sorted(RULES)]
    table = "".join(
        f"| {r.code} | {r.name} | {r.severity} | {r.stage} | {r.summary} |\n" for r in rules
    )
    return INTRO + table + "\n" + "\n".join(r.page() for r in rules)


if __name__ == "__main__":
    print(render(), end="")
