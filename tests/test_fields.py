"""The field registry and the C header cannot drift apart."""
from tracer import fields
from tracer.probes import EVENT_DTYPE, RARE_DTYPE


def test_every_kind_in_the_header_is_described():
    assert set(fields.kinds().values()) == set(fields.EVENTS)


def test_kind_values_are_distinct():
    assert len(set(fields.kinds().values())) == len(fields.kinds())


def test_summary_parts_are_event_kinds():
    for name in fields.MERGED + fields.FAILED:
        assert name in fields.EVENTS


def test_record_layouts_match_the_header():
    """struct oc_event is 32 bytes, struct oc_rare 56 (see bpf/overcommit.h)."""
    assert EVENT_DTYPE.itemsize == 32
    assert RARE_DTYPE.itemsize == 56
