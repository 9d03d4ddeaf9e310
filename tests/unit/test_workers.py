"""Synapse workers: the inventory's vocabulary, the processes, their settings and
nginx's routes (fabfile/workers.py, rendered by fabfile/render.py)."""

import re
import textwrap

import pytest
import yaml

from fabfile.inventory import InventoryError, parse
from fabfile.render import render_host
from fabfile.workers import expand, split

BASE = "/opt/matrix/synapse/w.example"
INV = """
hosts:
  web: {address: 203.0.113.10}
homeservers:
  w.example:
    host: web
    workers: %s
  plain.example: {host: web}
"""


def state(workers: str):
    return render_host(parse(textwrap.dedent(INV % workers)), "web")


def files(st):
    return {f.path: f for f in st.files}


def test_presets_and_counts_expand_to_named_processes():
    inv = parse(textwrap.dedent(INV % "{preset: federation-helper, sync: 2, federation_sender: 0}"))
    names = [w.name for w in expand(inv.homeservers["w.example"].workers)]
    assert names == ["sync-1", "sync-2", "federation-reader-1"]
    assert expand(inv.homeservers["plain.example"].workers) == []


@pytest.mark.parametrize("bad, words", [
    ("{preset: huge}", "preset"),
    ("{sync: -1}", "sync"),
    ("{background: 2}", "background"),
    ("{syncs: 1}", "syncs"),
])
def test_bad_worker_settings_are_named(bad, words):
    with pytest.raises(InventoryError) as exc:
        parse(textwrap.dedent(INV % bad))
    assert "workers" in str(exc.value) and words in str(exc.value)


def test_a_homeserver_without_workers_renders_as_before():
    st = state("{preset: none}")
    f = files(st)
    assert f"{BASE}/conf.d/60-workers.yaml" not in f
    assert not [p for p in f if "/workers/" in p]
    stack = yaml.safe_load(f["/opt/matrix/synapse/plain.example/docker-compose.yml"].content)
    assert set(stack["services"]) == {"synapse", "postgres"}
    assert "valkey/valkey:9.1.1-alpine" not in st.images


def test_balanced_preset_shares_one_redis_instance_map_and_writers():
    st = state("{preset: balanced}")
    f = files(st)
    shared = yaml.safe_load(f[f"{BASE}/conf.d/60-workers.yaml"].content)
    assert shared["instance_map"] == {"main": {"host": "synapse", "port": 9093},
                                      "event-persister-1": {"host": "event-persister-1", "port": 9093},
                                      "media-1": {"host": "media-1", "port": 9093}}
    assert shared["stream_writers"] == {"events": ["event-persister-1"], "quarantined_media_changes": ["media-1"]}
    assert shared["federation_sender_instances"] == ["federation-sender-1"]
    assert shared["pusher_instances"] == ["pusher-1"]
    assert shared["run_background_tasks_on"] == "background-1"
    assert shared["enable_media_repo"] is False
    assert shared["redis"]["password_path"] == "/run/secrets/redis_password"
    assert shared["worker_replication_secret_path"] == "/run/secrets/replication_secret"
    # a change to what every process shares restarts them all; a worker's own file, its stack entry
    assert f[f"{BASE}/conf.d/60-workers.yaml"].trigger == "synapse:w.example:restart"
    assert f[f"{BASE}/workers/sync-1.yaml"].trigger == "synapse:w.example:stack"
    main = yaml.safe_load(f[f"{BASE}/conf.d/50-synapse-fabric.yaml"].content)
    assert [lst["port"] for lst in main["listeners"]] == [8008, 9093]
    assert main["listeners"][1]["resources"] == [{"names": ["replication"]}]
    assert st.synapse_processes(st.homeservers[1])[0] == "synapse"


def test_worker_files_and_compose_services():
    f = files(state("{preset: balanced}"))
    sync = yaml.safe_load(f[f"{BASE}/workers/sync-1.yaml"].content)
    assert sync["worker_app"] == "synapse.app.generic_worker" and sync["worker_name"] == "sync-1"
    assert sync["worker_listeners"][0]["tag"] == "sync-1"
    assert sync["worker_listeners"][0]["resources"][0]["names"] == ["client"]
    pusher = yaml.safe_load(f[f"{BASE}/workers/pusher-1.yaml"].content)
    assert pusher["worker_listeners"][0]["resources"][0]["names"] == ["health"]
    media = yaml.safe_load(f[f"{BASE}/workers/media-1.yaml"].content)
    assert media["enable_media_repo"] is True and [lst["port"] for lst in media["worker_listeners"]] == [8008, 9093]
    stack = yaml.safe_load(f[f"{BASE}/docker-compose.yml"].content)
    svc = stack["services"]
    assert {"redis", "sync-1", "media-1", "pusher-1"} <= set(svc)
    assert svc["sync-1"]["command"][:3] == ["run", "-m", "synapse.app.generic_worker"]
    assert "--config-path=/workers/sync-1.yaml" in svc["sync-1"]["command"]
    assert svc["sync-1"]["depends_on"]["synapse"]["condition"] == "service_healthy"
    assert "./data:/data:ro" in svc["sync-1"]["volumes"] and "./data:/data" in svc["media-1"]["volumes"]
    # only workers that answer requests are on nginx's network; Redis never; nothing published
    assert "synapse-fabric-w-example" in svc["sync-1"]["networks"]
    assert set(svc["pusher-1"]["networks"]) == {"db", "egress"} and set(svc["redis"]["networks"]) == {"db"}
    assert stack["networks"]["db"]["internal"] is True and "internal" not in stack["networks"]["egress"]
    assert not any("ports" in s for s in svc.values())
    # no secret in an argument list: Redis reads its password from the file
    assert "cat /run/secrets/redis_password" in svc["redis"]["command"][0]
    assert svc["redis"]["user"] == "999:999"


def test_a_changed_worker_file_changes_its_compose_entry_only():
    a = yaml.safe_load(files(state("{sync: 1, client: 1}"))[f"{BASE}/docker-compose.yml"].content)
    b = yaml.safe_load(files(state("{sync: 2, client: 1}"))[f"{BASE}/docker-compose.yml"].content)
    assert a["services"]["sync-1"] == b["services"]["sync-1"]
    assert a["services"]["client-1"] == b["services"]["client-1"]
    assert "sync-2" in b["services"]
    # adding a sync worker changes nothing every process shares: nothing else restarts
    fa, fb = files(state("{sync: 1, client: 1}")), files(state("{sync: 2, client: 1}"))
    assert fa[f"{BASE}/conf.d/60-workers.yaml"].content == fb[f"{BASE}/conf.d/60-workers.yaml"].content


def test_nginx_routes_each_kind_to_its_workers_with_main_as_fallback():
    conf = files(state("{preset: balanced, sync: 2}"))["/opt/matrix/reverse_proxy/nginx/conf.d/matrix.w.example.conf"]
    text = conf.content.decode()
    assert re.search(r"split_clients \"\$\{sfab_w_example_user\}\" \$sfab_w_example_sync \{\s*"
                     r"50\.00% synapse-w-example-sync-1:8008;\s*\* synapse-w-example-sync-2:8008;", text)
    assert 'split_clients "${sfab_w_example_origin}" $sfab_w_example_federation_reader' in text
    sync = text.index("location ~ ^/_matrix/client/(r0|v3)/sync$")
    media = text.index("location ~ ^/_matrix/federation/v1/media/")
    fed = text.index("location ~ ^/_matrix/federation/(v1|v2)/ {")
    generic = text.index("location ~ ^(/_matrix/client|/_matrix/media|/_synapse/client)")
    assert media < fed < generic and sync < generic
    assert "proxy_pass http://$sfab_w_example_sync;" in text
    assert text.count("error_page 502 504 = @synapse_main;") == text.count("proxy_pass http://$sfab_")
    assert "location @synapse_main" in text


def test_split_buckets():
    assert split(["a"]) == [("*", "a")]
    assert split(["a", "b", "c"]) == [("33.33%", "a"), ("33.33%", "b"), ("*", "c")]


def test_a_stream_writer_writes_the_single_writer_streams_and_serves_their_paths_first():
    st = state("{stream_writer: 1, client: 1, media: 2}")
    f = files(st)
    shared = yaml.safe_load(f[f"{BASE}/conf.d/60-workers.yaml"].content)
    assert shared["stream_writers"]["typing"] == ["stream-writer-1"]
    assert set(shared["stream_writers"]) >= {"to_device", "account_data", "receipts", "presence", "push_rules"}
    assert "device_lists" not in shared["stream_writers"]
    assert shared["instance_map"]["stream-writer-1"] == {"host": "stream-writer-1", "port": 9093}
    # two media workers on the one host: the first runs the media background jobs
    assert shared["media_instance_running_background_jobs"] == "media-1" and "media-2" in shared["instance_map"]
    text = f["/opt/matrix/reverse_proxy/nginx/conf.d/matrix.w.example.conf"].content.decode()
    typing = text.index("location ~ ^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/typing")
    tags = text.index("location ~ ^/_matrix/client/(r0|v3|unstable)/.*/account_data")
    client_filter = text.index("location ~ ^/_matrix/client/(r0|v3|unstable)/user/.*/filter(/|$)")
    assert typing < client_filter and tags < client_filter  # /user/<id>/account_data is the writer's


def test_more_than_one_stream_writer_or_five_media_workers_are_refused():
    for bad, word in (("{stream_writer: 2}", "stream_writer"), ("{media: 5}", "media")):
        with pytest.raises(InventoryError) as exc:
            parse(textwrap.dedent(INV % bad))
        assert word in str(exc.value)


def test_a_new_writer_restarts_the_processes_that_ran_before_not_itself():
    from fabfile.facts import Container
    from fabfile.plan import make
    from tests.unit.test_plan import LOCAL, converged

    before = state("{event_persister: 1, sync: 1}")
    facts = converged(before)
    for service in ("redis", "sync-1", "event-persister-1"):
        facts.containers.append(Container("synapse-w-example", service, "running", "Up", service))
    plan = make(state("{event_persister: 2, sync: 1}"), facts, LOCAL(before), push=True)
    assert plan.synapse_up == ["w.example"] and plan.synapse_restart == ["w.example"]
    restart = next(a for a in plan.actions if a.what.startswith("restart Synapse"))
    assert plan.restart_processes["w.example"] == ["synapse", "sync-1", "event-persister-1"], restart.what
    assert "its 2 workers" in restart.what  # event-persister-2 starts with the new settings: no restart
