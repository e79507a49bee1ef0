"""A user's broken YAML is one line, `SOURCE:LINE:COL: YAML syntax error: problem`."""

from __future__ import annotations

import pytest

from nodeagent.model.yamlfile import YamlSyntaxError, compose_yaml, load_yaml


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: [1,\n", "f.yaml:2:1: YAML syntax error: did not find expected node content"),
        (
            'a: "abc\n',
            "f.yaml:2:1: YAML syntax error: found unexpected end of stream "
            "(while scanning a quoted scalar started at 1:4)",
        ),
        ("a: b: c\n", "f.yaml:1:5: YAML syntax error: mapping values are not allowed"),
        (
            "ok: 1\nx\x07y: 1\n",
            "f.yaml:2:2: YAML syntax error: character #x0007 is not allowed",
        ),
        ("a: *nowhere\n", "f.yaml:1:4: YAML syntax error: found undefined alias"),
        (
            "a: !!python/object:os.system x\n",
            "f.yaml:1:4: YAML syntax error: could not determine a constructor",
        ),
    ],
)
def test_broken_yaml_is_one_line_naming_where(text: str, expected: str) -> None:
    with pytest.raises(YamlSyntaxError) as err:
        load_yaml(text, "f.yaml")
    message = str(err.value)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_good_yaml_and_empty_text() -> None:
    assert load_yaml("a: [1, 2]\n", "f.yaml") == {"a": [1, 2]}
    assert load_yaml("", "f.yaml") is None and compose_yaml("# nothing\n", "f.yaml") is None
    node = compose_yaml("a: 1\nb: 2\n", "f.yaml")
    assert node is not None and node.value[1][0].start_mark.line == 1
    with pytest.raises(YamlSyntaxError, match=r"^f\.yaml:1:5: "):
        compose_yaml("a: b: c\n", "f.yaml")
