"""What a dry-run's diffs may show: masking by the file's policy, not by guesses."""

from __future__ import annotations

import yaml

from fabfile.inventory import parse
from fabfile.render import HIDDEN, SETTINGS, render_host
from fabfile.report import masked_diff

SETTINGS_OLD = {
    "sentry": {"dsn": "https://abc123@sentry.example.org/4"},
    "email": {"smtp_host": "mail.example.org", "smtp_pass": "hunter2", "notif_from": "Chat <x@example.org>"},
    "app_service_config_files": ["/data/bridge.yaml"],
    "modules": [{"module": "x.Y", "config": {"credentials": "c-r-e-d-s", "webhook": "https://hooks.example/T0/B0/s3cr3t"}}],
    "long_secret_folded": "a " * 60,  # dumped over several lines by yaml
    "max_upload_size": "50M",
    "rc_message": {"per_second": 1, "burst_count": 10},
}
SECRET_VALUES = ["abc123", "hunter2", "mail.example.org", "c-r-e-d-s", "s3cr3t", "a a a", "x.Y", "bridge.yaml"]


def dump(settings: dict) -> bytes:
    return yaml.safe_dump(settings, sort_keys=True, default_flow_style=False, width=40).encode()


def test_every_synapse_setting_is_masked_unless_known_plain():
    diff = masked_diff("/s/90-operator.yaml", None, dump(SETTINGS_OLD), SETTINGS)
    for value in SECRET_VALUES:
        assert value not in diff, value
    # known-plain settings are shown, so an operator sees what changes
    assert "max_upload_size: 50M" in diff and "burst_count: 10" in diff
    assert "dsn: '***'" in diff


def test_a_changed_secret_is_marked_without_showing_either_value():
    new = dict(SETTINGS_OLD, email=dict(SETTINGS_OLD["email"], smtp_pass="correct horse"), max_upload_size="100M")
    diff = masked_diff("/s/90-operator.yaml", dump(SETTINGS_OLD), dump(new), SETTINGS)
    assert "hunter2" not in diff and "correct horse" not in diff
    assert "+  smtp_pass: '*** (changed)'" in diff
    assert "-max_upload_size: 50M" in diff and "+max_upload_size: 100M" in diff
    # untouched secrets stay out of the diff's changed lines
    assert not [line for line in diff.splitlines() if line.startswith(("+", "-")) and "dsn" in line]


def test_settings_that_do_not_parse_are_not_shown():
    diff = masked_diff("/s/90-operator.yaml", None, b"smtp_pass: [unclosed\n", SETTINGS)
    assert "unclosed" not in diff and "not shown" in diff


def test_hidden_files_and_private_keys_are_never_shown():
    assert "abc" not in masked_diff("/x", None, b"abc\n", HIDDEN)
    diff = masked_diff("/k.pem", None, b"-----BEGIN PRIVATE KEY-----\nxx\n")
    assert "xx" not in diff and "not shown" in diff


def test_lines_that_look_secret_are_masked_in_other_files_too():
    body = b"sentry_dsn: https://k@s/1\nmy_credentials: c\nslack_webhook_url: https://h/s\nplain: shown\n"
    diff = masked_diff("/x.yaml", None, body)
    assert "k@s" not in diff and ": c" not in diff and "h/s" not in diff and "plain: shown" in diff


def test_render_marks_the_operator_settings_file():
    inv = parse(
        "hosts: {web: {address: 192.0.2.1}}\n"
        "homeservers: {one.example: {host: web, synapse_settings: {email: {smtp_pass: x}}}}\n"
    )
    state = render_host(inv, "web")
    assert state.file("/opt/matrix/synapse/one.example/conf.d/90-operator.yaml").secret == SETTINGS
