"""vipd.log's key=value fields: a value is quoted when it is empty or holds a space, a quote, an
equals sign, a newline or a tab (quote, backslash and newline escaped inside); None is left out."""

from __future__ import annotations

import ipaddress

from vipd.log import fields


def test_values_are_quoted_exactly_when_a_reader_could_misparse_them() -> None:
    assert fields(a="plain", b=3, c=ipaddress.ip_interface("10.0.0.1/32"), d=None) == "a=plain b=3 c=10.0.0.1/32"
    assert fields(a="", b="x y", c='q"', d="k=v") == 'a="" b="x y" c="q\\"" d="k=v"'
    assert fields(a="n\nl", b="t\tt", c="back\\slash here") == 'a="n\\nl" b="t\tt" c="back\\\\slash here"'
    assert fields(a="back\\slash") == "a=back\\slash"  # nothing to misparse: left as it is
