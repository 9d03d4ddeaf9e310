#!/opt/venv/bin/python
"""A Synapse upgrade that fails half-way (tests only): the schema moves forward
(version 9999, a new table), then the process exits before serving."""
import glob
import sys

import psycopg2
import yaml

config = {}
for path in ["/data/homeserver.yaml", *sorted(glob.glob("/conf.d/*.yaml"))]:
    with open(path) as f:
        config.update(yaml.safe_load(f) or {})
args = {k: v for k, v in config["database"]["args"].items() if not k.startswith("cp_")}
with psycopg2.connect(**args) as conn, conn.cursor() as cur:
    cur.execute("UPDATE schema_version SET version = 9999")
    cur.execute("CREATE TABLE IF NOT EXISTS broken_upgrade_was_here (at timestamptz DEFAULT now())")
print("synapse-broken: schema moved to 9999, failing on purpose", file=sys.stderr, flush=True)
sys.exit(1)
