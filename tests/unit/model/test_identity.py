import pytest

from nodeagent.model.identity import Identity, IdentityError


def test_round_trip():
    uri = "spiffe://cluster.local/ns/default/sa/sleep"
    ident = Identity.parse(uri)
    assert ident == Identity("cluster.local", "default", "sleep")
    assert str(ident) == uri
    assert ident.principal == "cluster.local/ns/default/sa/sleep"


def test_workload_defaults():
    assert Identity.for_workload("", "ns1", "") == Identity("cluster.local", "ns1", "default")


@pytest.mark.parametrize(
    "bad",
    [
        "cluster.local/ns/a/sa/b",
        "spiffe://td/ns/a/sa",
        "spiffe://td/ns/a/sa/b/extra",
        "spiffe://td/namespace/a/sa/b",
        "spiffe://td/ns//sa/b",
    ],
)
def test_rejects_malformed(bad):
    with pytest.raises(IdentityError):
        Identity.parse(bad)
