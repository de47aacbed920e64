"""ProfileSettings is the API's parameters, run.json's settings, the resume key and the CLI's flags at once."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import fields

import pytest

from internal_policy.cli import main
from internal_policy.errors import InputError
from internal_policy.profile import profile
from internal_policy.settings import ProfileSettings, describe_change, records_digest, weights_digest

CHANGED = {"components": ("layer",), "stats": ("nll",), "renyi_alpha": (0.5,), "topk": 2, "final_norm": True,
           "token_sample": 0.5, "seed": 1, "truncate": True, "keep_tokens": False, "chat": {"enable_thinking": False},
           "group_by": "correct", "batch_size": 3, "hidden_budget_mb": 5.0, "linear": False}
"""A non-default value for every field (the test below fails when a field is added without one)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="x", exit_on_error=False)
    ProfileSettings.add_arguments(parser)
    return parser


def test_every_field_is_a_flag_with_its_default_and_maps_back_one_to_one():
    assert set(CHANGED) == {f.name for f in fields(ProfileSettings)}
    parser = _parser()
    help_text = " ".join(parser.format_help().split())
    assert ProfileSettings.from_args(parser.parse_args([])) == ProfileSettings()
    for f in fields(ProfileSettings):
        if not f.metadata["cli"]:
            continue
        flag = ProfileSettings.flag(f.name)
        assert flag in help_text
        value = CHANGED[f.name]
        if isinstance(value, bool):
            argv = [flag]
        else:
            argv = [flag, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
        got = ProfileSettings.from_args(parser.parse_args(argv))
        assert got == ProfileSettings(**{f.name: value}), f.name
        assert got != ProfileSettings(), f.name
    assert "(default: entropy)" in help_text and "(default: 8)" in help_text and "--no-tokens" in help_text
    with pytest.raises(InputError, match="hidden_budget_mb must be positive"):
        ProfileSettings(hidden_budget_mb=0)


def test_canonical_form_and_resume_key():
    s = ProfileSettings(components=["ffn", "layer"], stats=["rank", "renyi2"], renyi_alpha=[math.inf], topk=3)
    assert s.components == ("layer", "ffn")
    assert s.stats == ("entropy", "renyi2", "renyiinf", "rank", "topk") and s.topk == 3 and s.renyi_alpha == ()
    assert ProfileSettings(stats=["renyiinf"], renyi_alpha=[2]) == ProfileSettings(stats=["renyi2", "renyiinf"])
    assert [st.name for st in s.statistics()] == ["entropy", "renyi2", "renyiinf", "rank", "topk"]
    assert json.loads(json.dumps(s.to_json()))["stats"] == list(s.stats)
    base = ProfileSettings().resume_key()
    for name, value in CHANGED.items():  # the key has exactly the fields that change the numbers
        changed = ProfileSettings(**{name: value}).resume_key() != base
        assert changed == fields(ProfileSettings)[[f.name for f in fields(ProfileSettings)].index(name)].metadata["key"]
    assert {"batch_size", "hidden_budget_mb", "linear", "group_by"}.isdisjoint(base)
    for bad, message in (({"components": ["mlp"]}, "unknown component"), ({"token_sample": 2.0}, "fraction"),
                         ({"batch_size": 0}, "at least 1"), ({"stats": ["perplexity"]}, "unknown statistic"),
                         ({"topk": 21}, "between 1 and 20"), ({"renyi_alpha": [1.0]}, "Shannon"),
                         ({"topk": 2, "keep_tokens": False}, "drop --no-tokens or --topk")):
        with pytest.raises(InputError, match=message):
            ProfileSettings(**bad)


def test_resume_errors_name_the_flag_and_values():
    assert describe_change("keep_tokens", True, False) == "--no-tokens (off -> on)"
    assert describe_change("seed", 0, 3) == "--seed (0 -> 3)"
    assert describe_change("weights_sha256", "a" * 64, "b" * 64) == "the model's weights"
    assert describe_change("chat", {}, {"enable_thinking": False}).startswith("--thinking/--chat-option")


def test_api_keywords_and_settings_object_are_the_same(stories):
    model, tok = stories
    records = [{"text": "A cat sat on the mat."}]
    by_kwargs = profile(model, tok, records, components=["layer"], stats=["nll"], progress=False)
    by_object = profile(model, tok, records, ProfileSettings(components=("layer",), stats=("nll",)), progress=False)
    assert by_kwargs.summary.equals(by_object.summary)
    assert by_kwargs.meta["stats"] == ["entropy", "nll"] and by_kwargs.meta["components"] == ["layer"]
    with pytest.raises(TypeError, match="bogus"):
        profile(model, tok, records, bogus=1, progress=False)


def test_fingerprints_follow_content(stories, tiny):
    from internal_policy.data import tokenize_records

    model, tok = stories
    a = tokenize_records([{"id": "x", "text": "A cat."}], tok)
    b = tokenize_records([{"id": "x", "text": "A dog."}], tok)
    assert records_digest(a) == records_digest(tokenize_records([{"id": "x", "text": "A cat."}], tok))
    assert records_digest(a) != records_digest(b)
    digest = weights_digest(model)
    assert digest == weights_digest(model) and digest != weights_digest(tiny("llama")[0])


@pytest.mark.parametrize("args, message", [
    (["--stats", "entropy,perplexity"], "unknown statistic 'perplexity'"),
    (["--renyi-alpha", "1"], "Shannon entropy"),
    (["--topk", "21"], "between 1 and 20"),
    (["--components", ""], "comma-separated list"),
])
def test_bad_statistics_options_give_one_clear_line(tmp_path, capsys, args, message):
    code = main(["profile", "--out", str(tmp_path / "run"), "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("internal-policy profile: error: ") and err.count("\n") == 1, err
    assert message in err
