"""The contract: settings read once from the environment, their checks, and the variables plugins require."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import env

import main


def test_railway_public_domain_is_the_default_public_url() -> None:
    settings = main.load_settings({"RAILWAY_PUBLIC_DOMAIN": "sb-production.up.railway.app"})
    assert settings.public_url == "https://sb-production.up.railway.app"
    assert main.load_settings({"RAILWAY_PUBLIC_DOMAIN": "x.app", "PUBLIC_URL": "https://mine.example"}).public_url == "https://mine.example"


def test_bad_values_name_the_variable() -> None:
    with pytest.raises(main.ConfigError, match="MIN_CONFIDENCE='lots' is not valid"):
        main.load_settings({"MIN_CONFIDENCE": "lots"})
    with pytest.raises(main.ConfigError, match="MIN_CONFIDENCE=2.0 must be between 0 and 1"):
        main.load_settings({"MIN_CONFIDENCE": "2"})
    with pytest.raises(main.ConfigError, match="^MODE='webhook' is not valid: use one of gather, relay, media$"):
        main.create_app(env(MODE="webhook"))  # checked against main.modes, where a new mode is one entry


def test_settings_are_read_once_and_never_print_secrets() -> None:
    settings = main.load_settings({"TWILIO_AUTH_TOKEN": "sekrit-token", "LLM_PROVIDER": "anthropic, openai",
                                   "OPENAI_API_KEY": "sk-sekrit", "MAX_TURNS": "4", "REDIS_URL": "redis://r:6379"})
    assert (settings.llm_provider, settings.max_turns, settings.valkey_url) == (("anthropic", "openai"), 4, "redis://r:6379")
    assert settings.get("OPENAI_API_KEY") == "sk-sekrit"
    assert "sekrit" not in repr(settings) and "sekrit" not in str(settings)


def test_a_missing_vendor_key_names_the_variable_to_set() -> None:
    class NeedsKey:
        @main.hookimpl
        def register_llm_providers(self, register: Any) -> None:
            register("keyed", lambda settings: settings.require("KEYED_API_KEY", "LLM_PROVIDER=keyed"))

    with pytest.raises(main.ConfigError, match="KEYED_API_KEY is not set; LLM_PROVIDER=keyed needs it"):
        main.create_app(env(LLM_PROVIDER="keyed"), plugins=[NeedsKey()])
