"""Policy filters: compiling, evaluating and validating ``threatbus.policy.Filter``."""

from datetime import datetime, timedelta, timezone

import pytest

from threatbus.config import validate
from threatbus.data import SnapshotEnvelope, SnapshotRequest, SnapshotType
from threatbus.errors import ConfigError
from threatbus.lifecycle import as_removal
from threatbus.policy import REASONS, Filter, FilterError, validators
from threatbus.stix import timestamp
from threatbus.testing import TLP1, TLP2, indicator, intel_mix, settings_from, sighting


def passing(spec, mix=None):
    mix = mix or intel_mix()
    compiled = Filter(spec)
    return {name for name, item in mix.items() if compiled.check(item) is None}


ALL = set(intel_mix())


def test_an_empty_filter_passes_everything_and_is_falsy():
    assert passing({}) == ALL
    assert not Filter({})
    assert not Filter(None)
    assert Filter({"tlp": "red"})


@pytest.mark.parametrize(
    "tlp, expected",
    [
        ("clear", {"clear", "white", "unmarked", "unmarked_noconf"}),
        ("white", {"clear", "white", "unmarked", "unmarked_noconf"}),
        ("green", {"green", "clear", "white", "unmarked", "unmarked_noconf"}),
        ("amber", {"amber", "green", "clear", "white", "unmarked", "unmarked_noconf"}),
        ("amber+strict", ALL - {"red", "red2"}),
        ("RED", ALL),
    ],
)
def test_tlp_is_the_highest_level_delivered_for_tlp_1_and_2(tlp, expected):
    assert passing({"tlp": tlp}) == expected


def test_unmarked_deny_holds_back_objects_without_a_tlp_marking():
    assert passing({"unmarked": "deny"}) == ALL - {"unmarked", "unmarked_noconf"}
    assert Filter({"unmarked": "deny"}).check(intel_mix()["unmarked"]) == "unmarked"
    # Non-TLP markings do not count as a TLP marking.
    other = indicator(object_marking_refs=["marking-definition--00000000-0000-4000-8000-000000000000"])
    assert Filter({"unmarked": "deny"}).check(other) == "unmarked"
    assert Filter({"tlp": "clear"}).check(other) is None


def test_the_most_restrictive_of_several_tlp_markings_counts():
    both = indicator(object_marking_refs=[TLP2["clear"], "marking-definition--x", TLP1["red"], TLP1["green"]])
    assert Filter({"tlp": "amber+strict"}).check(both) == "tlp"
    assert Filter({"tlp": "red"}).check(both) is None


def test_min_confidence_passes_objects_without_a_confidence():
    assert passing({"min_confidence": 50}) == ALL - {"green", "unmarked"}
    assert Filter({"min_confidence": 50}).check(intel_mix()["green"]) == "confidence"


def test_detection_only_reads_the_opencti_and_misp_flags():
    assert passing({"detection_only": True}) == ALL - {"clear", "unmarked_noconf"}
    assert Filter({"detection_only": True}).check(indicator(x_opencti_detection=False)) == "detection"
    assert Filter({"detection_only": True}).check(indicator(x_misp_to_ids="true")) == "detection"  # not a boolean
    assert passing({"detection_only": False}) == ALL


def test_pattern_types_labels_and_created_by():
    sigma = indicator(pattern="title: x", pattern_type="sigma")
    assert Filter({"pattern_types": ["stix"]}).check(sigma) == "pattern_type"
    assert Filter({"pattern_types": ["stix", "sigma"]}).check(sigma) is None
    tagged = indicator(labels=["malicious-activity", "c2"])
    assert Filter({"labels": {"include": ["c2"]}}).check(tagged) is None
    assert Filter({"labels": {"include": ["phishing"]}}).check(tagged) == "labels"
    assert Filter({"labels": {"include": ["phishing"]}}).check(indicator()) == "labels"
    assert Filter({"labels": {"exclude": ["c2"]}}).check(tagged) == "labels"
    assert Filter({"labels": {"exclude": ["c2"]}}).check(indicator()) is None
    ours = indicator(created_by_ref="identity--a")
    assert Filter({"created_by": {"include": ["identity--a"]}}).check(ours) is None
    assert Filter({"created_by": {"include": ["identity--b"]}}).check(ours) == "created_by"
    assert Filter({"created_by": {"include": ["identity--b"]}}).check(indicator()) == "created_by"
    assert Filter({"created_by": {"exclude": ["identity--a"]}}).check(ours) == "created_by"
    assert Filter({"created_by": {"exclude": ["identity--a"]}}).check(indicator()) is None


def test_max_age_counts_days_since_modified():
    now = datetime.now(timezone.utc)
    fresh = indicator(modified=timestamp(now - timedelta(days=2)))
    old = indicator(modified=timestamp(now - timedelta(days=40)))
    assert Filter({"max_age": 30}).check(fresh) is None
    assert Filter({"max_age": 30}).check(old) == "age"
    assert Filter({"max_age": 0}).check(old) is None
    assert Filter({"max_age": 1.5}).check(fresh) == "age"


def test_the_first_failing_key_is_the_reason_and_every_reason_is_known():
    red_low = indicator(object_marking_refs=[TLP1["red"]], confidence=1)
    assert Filter({"tlp": "amber", "min_confidence": 50}).check(red_low) == "tlp"
    mix = intel_mix()
    specs = [{"tlp": "clear", "unmarked": "deny"}, {"min_confidence": 99}, {"detection_only": True}]
    reasons = {Filter(spec).check(item) for spec in specs for item in mix.values()}
    assert reasons - {None} <= set(REASONS)


def test_sightings_pass_the_filter_of_their_embedded_indicator():
    mix = intel_mix()
    amber_only = Filter({"tlp": "amber", "min_confidence": 50})
    assert amber_only.check(sighting(of=mix["red"])) == "tlp"
    assert amber_only.check(sighting(of=mix["green"])) == "confidence"
    assert amber_only.check(sighting(of=mix["amber"])) is None
    # The sighting's own TLP marking counts too.
    marked = sighting(of=mix["amber"])
    marked.payload["object_marking_refs"] = [TLP1["red"]]
    assert amber_only.check(marked) == "tlp"
    # Without the embedded indicator the sighting is judged on its own; indicator-only keys do not apply.
    bare = sighting(of=mix["red"])
    del bare.payload["x_threatbus_indicator"]
    assert amber_only.check(bare) is None
    assert Filter({"detection_only": True, "pattern_types": ["sigma"]}).check(bare) is None
    assert Filter({"unmarked": "deny"}).check(bare) == "unmarked"


def test_removals_pass_when_the_indicator_they_remove_passed():
    mix = intel_mix()
    strict = Filter({"tlp": "amber", "min_confidence": 50, "detection_only": True, "max_age": 1})
    # The MISP app turns to_ids off into a removal: it no longer carries the detection flag, yet must pass.
    amber = mix["amber"]
    removal = as_removal({**amber.payload, "x_opencti_detection": False, "confidence": 0})
    assert strict.check(type(amber)(removal)) is None
    revoked = type(amber)({**amber.payload, "revoked": True, "modified": "2000-01-01T00:00:00Z"})
    assert strict.check(revoked) is None
    # A removal of a RED indicator stays behind a TLP boundary.
    assert strict.check(type(amber)(as_removal(mix["red"].payload))) == "tlp"


def test_snapshot_envelopes_are_judged_by_their_body_and_requests_pass():
    mix = intel_mix()
    request = SnapshotRequest.create(SnapshotType.INDICATOR, timedelta(days=1))
    compiled = Filter({"tlp": "green"})
    assert compiled.check(request) is None
    assert compiled.check(SnapshotEnvelope.wrap(request, mix["red"])) == "tlp"
    assert compiled.check(SnapshotEnvelope.wrap(request, mix["green"])) is None


def test_explain_names_the_values_that_decided():
    mix = intel_mix()
    assert Filter({"tlp": "amber"}).explain(mix["red2"].payload) == "tlp: TLP:RED is above TLP:AMBER"
    assert Filter({"min_confidence": 50}).explain(mix["green"].payload) == "confidence: 30 is below 50"
    assert Filter({"tlp": "amber"}).explain(mix["green"].payload) is None


@pytest.mark.parametrize(
    "spec, key",
    [
        ("amber", "filter"),
        ({"tlp": "purple"}, "filter.tlp"),
        ({"tlp": 3}, "filter.tlp"),
        ({"unmarked": "maybe"}, "filter.unmarked"),
        ({"min_confidence": 101}, "filter.min_confidence"),
        ({"min_confidence": "50"}, "filter.min_confidence"),
        ({"min_confidence": True}, "filter.min_confidence"),
        ({"detection_only": "yes"}, "filter.detection_only"),
        ({"pattern_types": "stix"}, "filter.pattern_types"),
        ({"pattern_types": ["stix", 3]}, "filter.pattern_types"),
        ({"labels": ["a"]}, "filter.labels"),
        ({"labels": {"include": "a"}}, "filter.labels.include"),
        ({"labels": {"only": ["a"]}}, "filter.labels.only"),
        ({"created_by": {"exclude": [""]}}, "filter.created_by.exclude"),
        ({"max_age": -1}, "filter.max_age"),
        ({"max_age": "30d"}, "filter.max_age"),
        ({"tpl": "amber"}, "filter.tpl"),
    ],
)
def test_garbage_filters_are_refused_naming_the_key(spec, key):
    with pytest.raises(FilterError) as err:
        Filter(spec)
    assert str(err.value).startswith(key + " ")


def test_config_validators_name_the_full_key():
    settings = settings_from({"plugins": {"apps": {"zmq": {"filter": {"min_confidence": 500}}}}})
    with pytest.raises(ConfigError, match=r"plugins\.apps\.zmq\.filter\.min_confidence must be an integer"):
        validate(settings, validators("plugins.apps.zmq"))
    good = settings_from({"plugins": {"apps": {"zmq": {"filter": {"tlp": "amber", "labels": {"exclude": ["x"]}}}}}})
    validate(good, validators("plugins.apps.zmq"))
    # The original MISP app's own `filter` is a list: apps may keep it, backbones may not.
    misp = settings_from({"plugins": {"apps": {"misp": {"filter": [{"orgs": ["1"]}]}}}})
    validate(misp, validators("plugins.apps.misp", allow_list=True))
    misp = settings_from({"plugins": {"backbones": {"inmem": {"export": {"filter": [{"orgs": ["1"]}]}}}}})
    with pytest.raises(ConfigError, match=r"plugins\.backbones\.inmem\.export\.filter must be a mapping"):
        validate(misp, validators("plugins.backbones.inmem.export"))
