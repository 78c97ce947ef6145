"""The secret filter `pipeline.tracking.redact`: what reaches W&B and every manifest's config and metrics."""

from __future__ import annotations

import copy
import json

import pytest

from pipeline.tracking import REDACTED, redact

SECRET = "s3cr3t-value"


@pytest.mark.parametrize(
    "key",
    [
        "api_key",
        "API_KEY",
        "apiKey",
        "x-api-key",
        "password",
        "DB_PASSWORD",
        "passwd",
        "token",
        "hf_token",
        "access_token",
        "secret",
        "client_secret",
        "Authorization",
        "access_key",
        "AWS_SECRET_ACCESS_KEY",
        "private_key",
        "credentials",
    ],
)
def test_a_secret_key_is_redacted_at_any_depth(key):
    config = {"stage": {"outputs": [{"name": "x", key: SECRET}]}, key: SECRET}
    redacted = redact(config)
    assert redacted == {"stage": {"outputs": [{"name": "x", key: REDACTED}]}, key: REDACTED}
    assert SECRET not in json.dumps(redacted)


def test_a_secret_key_hides_a_whole_nested_value():
    redacted = redact(
        {"auth": {"user": "me", "pass": SECRET}, "headers": [{"Authorization": f"Bearer {SECRET}"}]}
    )
    assert redacted == {"auth": REDACTED, "headers": [{"Authorization": REDACTED}]}


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"redis://:{SECRET}@127.0.0.1:6379/0", f"redis://{REDACTED}@127.0.0.1:6379/0"),
        (f"https://user:{SECRET}@host.example/path", f"https://{REDACTED}@host.example/path"),
        (f"https://{SECRET}@github.com/org/repo.git", f"https://{REDACTED}@github.com/org/repo.git"),
        # a raw `@` in the password: the whole user:password part still goes
        (f"postgresql://user:p@{SECRET}@db:5432/x", f"postgresql://{REDACTED}@db:5432/x"),
        (f"https://host/v1?api_key={SECRET}&n=3", f"https://host/v1?api_key={REDACTED}&n=3"),
        (f"https://host/?model=m&token={SECRET}#top", f"https://host/?model=m&token={REDACTED}#top"),
    ],
)
def test_credentials_in_a_url_are_redacted(url, expected):
    assert redact(url) == expected
    assert redact({"server": {"url": url}}) == {"server": {"url": expected}}
    assert redact([f"could not connect to {url}: refused"]) == [f"could not connect to {expected}: refused"]


@pytest.mark.parametrize(
    "value",
    [
        "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
        "http://127.0.0.1:6900/api?page=2&limit=50",
        "https://host/?max_new_tokens=64",
        "someone@example.com",
        "artifacts/sft-policy/v3",
        "a plain sentence with @ and ://",
    ],
)
def test_a_string_without_credentials_is_untouched(value):
    assert redact(value) == value


def test_non_secret_values_are_untouched():
    config = {
        "max_new_tokens": 64,
        "min_new_tokens": 1,
        "pad_token": "eos",
        "stop_token_ids": [2, 3],
        "policy_tokenizer": "artifacts/base",
        "tokens_per_second": 123.5,
        "learning_rate": 1e-4,
        "flags": (True, None, "x"),
        "target_modules": ["q_proj", "v_proj"],
    }
    assert redact(config) == config


def test_the_input_is_not_mutated():
    config = {
        "api_key": SECRET,
        "nested": {"password": SECRET, "url": f"redis://:{SECRET}@host"},
        "items": [{"token": SECRET}, f"https://u:{SECRET}@h"],
    }
    before = copy.deepcopy(config)
    redacted = redact(config)
    assert config == before
    assert SECRET not in json.dumps(redacted)
