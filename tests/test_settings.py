"""Settings: one declaration per setting, typed parsing, secrets.toml fails loudly, TLS cannot be switched off."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from assistant import settings as s
from assistant.llm import LlmConfigError, LlmSettings
from guidelines.settings import GuidelineSettings

REPO = Path(__file__).resolve().parent.parent
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def test_every_nva_variable_named_in_the_code_is_declared():
    named: dict[str, str] = {}
    for folder in ("assistant", "connectors", "guidelines", "dashboard", "bench"):
        for path in (REPO / folder).rglob("*.py"):
            for m in re.finditer(r"\bNVA_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()):
                named.setdefault(m.group(0), str(path.relative_to(REPO)))
    undeclared = {name: where for name, where in named.items() if name not in s.BY_NAME}
    assert not undeclared, f"declare these in assistant/settings.py: {undeclared}"


def test_docs_table_lists_every_declaration():
    doc = (REPO / "docs" / "SETTINGS.md").read_text()
    assert s.settings_markdown() in doc
    assert all(f"`{d.name}`" in doc for d in s.SETTINGS)


def test_declared_defaults_resolve_the_old_conflicts():
    assert s.default("NVA_LLM_BACKEND") == "none"
    assert s.default("NVA_LLM_MAX_TOKENS") == 320
    llm = LlmSettings()
    assert (llm.backend, llm.max_tokens, llm.timeout) == ("none", 320, 60.0)
    assert LlmSettings.from_env({}).max_tokens == s.default("NVA_LLM_MAX_TOKENS")
    assert LlmSettings.from_env({"NVA_LLM_MAX_TOKENS": "99"}).max_tokens == 99


def test_typed_parse_names_the_setting():
    assert s.parse("NVA_FHIR_RETRIES", " 7 ") == 7
    assert s.parse("NVA_LLM_ALLOW_REMOTE", "YES") is True
    assert s.parse("NVA_FHIR_EVERYTHING", "Always") == "always"
    assert s.parse("NVA_LLM_CA_BUNDLE", "") is None
    for name, raw in [
        ("NVA_FHIR_RETRIES", "four"),
        ("NVA_LLM_DEIDENTIFY", "maybe"),
        ("NVA_FHIR_AUTH", "kerberos"),
    ]:
        with pytest.raises(s.SettingsError, match=name):
            s.parse(name, raw)
    with pytest.raises(s.SettingsError, match="declare it"):
        s.parse("NVA_NOT_A_SETTING", "1")
    with pytest.raises(LlmConfigError, match="NVA_LLM_TORCH_THREADS"):
        LlmSettings.from_env({"NVA_LLM_TORCH_THREADS": "lots"})


def test_secrets_file_precedence_and_bool_values(tmp_path):
    secrets = tmp_path / "secrets.toml"
    secrets.write_text('NVA_CHROMA_PORT = 9001\nNVA_LLM_ALLOW_REMOTE = true\nNVA_SOURCE = "from-file"\n')
    values = s.load_settings({"NVA_SOURCE": "from-env"}, secrets)
    assert values["NVA_SOURCE"] == "from-env"
    assert s.get(values, "NVA_CHROMA_PORT") == 9001
    assert s.get(values, "NVA_LLM_ALLOW_REMOTE") is True
    g = GuidelineSettings.from_env({**values, "NVA_DATA_DIR": str(tmp_path)})
    assert g.chroma_port == 9001 and g.data_dir == tmp_path / "guidelines"
    assert GuidelineSettings.from_env({}).data_dir == s.REPO_ROOT / "var" / "guidelines"


@pytest.mark.parametrize("content", ['[auth\nclient_id = "x"\n', 'NVA_SOURCE = "unterminated\n'])
def test_invalid_secrets_file_is_an_error_not_defaults(tmp_path, content):
    secrets = tmp_path / "secrets.toml"
    secrets.write_text(content)
    with pytest.raises(s.SettingsError, match="not valid TOML"):
        s.load_settings({}, secrets)


def test_unreadable_secrets_file_is_an_error(tmp_path):
    secrets = tmp_path / "secrets.toml"
    secrets.mkdir()  # a directory cannot be read as a file, whoever runs the test (root ignores chmod)
    with pytest.raises(s.SettingsError, match="cannot be read"):
        s.read_secrets(secrets)
    assert s.read_secrets(tmp_path / "absent.toml") == {}


@pytest.mark.parametrize("raw", ["false", "0", "no", "True"])
def test_ca_bundle_cannot_switch_tls_off(raw):
    with pytest.raises(s.SettingsError, match="cannot be switched off"):
        s.tls_verify({"NVA_FHIR_CA_BUNDLE": raw}, "NVA_FHIR_CA_BUNDLE")


def test_ca_bundle_must_be_a_pem_file(tmp_path):
    assert s.tls_verify({}, "NVA_FHIR_CA_BUNDLE") is True
    with pytest.raises(s.SettingsError, match="is not a file"):
        s.tls_verify({"NVA_FHIR_CA_BUNDLE": str(tmp_path / "nope.pem")}, "NVA_FHIR_CA_BUNDLE")
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    with pytest.raises(s.SettingsError, match="no PEM certificate"):
        s.tls_verify({"NVA_FHIR_CA_BUNDLE": str(junk)}, "NVA_FHIR_CA_BUNDLE")
    good = tmp_path / "ca.pem"
    good.write_text(PEM)
    assert s.tls_verify({"NVA_FHIR_CA_BUNDLE": str(good)}, "NVA_FHIR_CA_BUNDLE") == str(good)


def test_redacted_hides_declared_secrets_only():
    shown = s.redacted({"NVA_LLM_API_KEY": "sk-1", "NVA_LLM_MODEL": "m", "NVA_FHIR_TOKEN": ""})
    assert shown == {"NVA_LLM_API_KEY": "***", "NVA_LLM_MODEL": "m", "NVA_FHIR_TOKEN": ""}


@pytest.mark.parametrize("bundle", ["false", "/nonexistent/ca.pem"])
def test_bad_fhir_ca_bundle_is_a_typed_error_in_the_cli(monkeypatch, capsys, bundle):
    from assistant.cli import main
    from connectors.errors import FhirFatalError
    from connectors.rest import RestFhirSource

    with pytest.raises(FhirFatalError, match="NVA_FHIR_CA_BUNDLE"):
        RestFhirSource.from_settings("https://127.0.0.1:9/fhir", {"NVA_FHIR_CA_BUNDLE": bundle})
    monkeypatch.setenv("NVA_FHIR_CA_BUNDLE", bundle)
    monkeypatch.setenv("NVA_SECRETS_FILE", "/nonexistent/secrets.toml")
    assert main(["patients", "https://127.0.0.1:9/fhir"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("nva: error: NVA_FHIR_CA_BUNDLE=") and "Traceback" not in err and "OSError" not in err
    )


def test_rest_settings_use_the_declared_defaults():
    from connectors.rest import RestFhirSource

    src = RestFhirSource.from_settings("https://127.0.0.1:9/fhir", {})
    assert src.options.concurrency == s.default("NVA_FHIR_CONCURRENCY")
    assert src.options.read_timeout == s.default("NVA_FHIR_READ_TIMEOUT") and src.options.verify is True
    with pytest.raises(Exception, match="NVA_FHIR_RETRIES must be an integer"):
        RestFhirSource.from_settings("https://127.0.0.1:9/fhir", {"NVA_FHIR_RETRIES": "many"})


def test_invalid_secrets_file_stops_the_cli_with_a_message(monkeypatch, capsys, tmp_path):
    from assistant.cli import main

    secrets = tmp_path / "secrets.toml"
    secrets.write_text("[auth\n")
    monkeypatch.setenv("NVA_SECRETS_FILE", str(secrets))
    assert main(["patients", "https://127.0.0.1:9/fhir"]) == 2
    err = capsys.readouterr().err
    assert "not valid TOML" in err and str(secrets) in err and "Traceback" not in err


def test_unknown_nva_key_in_secrets_is_warned_about_without_its_value(tmp_path, caplog):
    secrets = tmp_path / "secrets.toml"
    secrets.write_text('NVA_LLM_BACKEN = "sk-typo-secret"\nOTHER = 1\n')
    with caplog.at_level("WARNING", logger="assistant.settings"):
        values = s.load_settings({}, secrets)
    assert values["NVA_LLM_BACKEND"] == "none"
    assert "NVA_LLM_BACKEN is not an NVA setting" in caplog.text and "sk-typo-secret" not in caplog.text
    assert "OTHER" not in caplog.text
