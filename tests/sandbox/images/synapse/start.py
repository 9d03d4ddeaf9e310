#!/opt/venv/bin/python
"""Entrypoint of the sandbox's stand-in for matrixdotorg/synapse.

Modes (first argument, default `run`):
  generate  write homeserver.yaml, a console log config and a signing key into
            SYNAPSE_CONFIG_DIR (default /data); needs SYNAPSE_SERVER_NAME and
            SYNAPSE_REPORT_STATS. An existing homeserver.yaml is kept: only missing
            files are created.
  run       start Synapse; further arguments go to python (`-m synapse.app.homeserver`
            and `--config-path <SYNAPSE_CONFIG_PATH or /data/homeserver.yaml>` are
            added unless given).
When started as root (or with UID/GID set) the process drops to 991:991 (or UID:GID).
"""
import os
import platform
import subprocess
import sys

LOG_CONFIG = """\
# Written by the container's `generate` mode: everything goes to the console so
# that `docker logs` shows it.
version: 1

formatters:
  precise:
    format: '%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s'

handlers:
  console:
    class: logging.StreamHandler
    formatter: precise
    stream: ext://sys.stdout

loggers:
  synapse.storage.SQL:
    # DEBUG here would log access tokens and other secrets.
    level: {sql_level}

root:
  level: {level}
  handlers: [console]

disable_existing_loggers: false
"""


def fail(message: str) -> "None":
    print(message, file=sys.stderr, flush=True)
    sys.exit(2)


def target_user(env) -> "str | None":
    """uid:gid to run Synapse as, or None to stay as we are."""
    if "UID" in env:
        return f"{int(env['UID'])}:{int(env.get('GID', '991'))}"
    if os.getuid() == 0:
        return "991:991"
    return None


def config_locations(env):
    config_dir = env.get("SYNAPSE_CONFIG_DIR", "/data")
    config_path = env.get("SYNAPSE_CONFIG_PATH", os.path.join(config_dir, "homeserver.yaml"))
    data_dir = env.get("SYNAPSE_DATA_DIR", "/data")
    return config_dir, config_path, data_dir


def generate(env, user) -> None:
    missing = [v for v in ("SYNAPSE_SERVER_NAME", "SYNAPSE_REPORT_STATS") if v not in env]
    if missing:
        fail(f"Environment variable {missing[0]!r} is mandatory in `generate` mode.")
    server_name = env["SYNAPSE_SERVER_NAME"]
    config_dir, config_path, data_dir = config_locations(env)
    os.makedirs(config_dir, exist_ok=True)
    os.makedirs(data_dir, exist_ok=True)

    # Synapse's own --generate-config points log_config at this file and only
    # writes it when absent; writing it first makes the logs go to the console.
    log_config = os.path.join(config_dir, f"{server_name}.log.config")
    if not os.path.exists(log_config):
        print(f"Creating log config {log_config}", flush=True)
        sensitive = env.get("SYNAPSE_LOG_SENSITIVE", "").lower() in ("1", "true", "yes", "on")
        with open(log_config, "w") as f:
            f.write(LOG_CONFIG.format(level=env.get("SYNAPSE_LOG_LEVEL") or "INFO",
                                      sql_level="DEBUG" if sensitive else "INFO"))

    argv = [sys.executable, "-m", "synapse.app.homeserver",
            "--server-name", server_name,
            "--report-stats", env["SYNAPSE_REPORT_STATS"],
            "--config-path", config_path,
            "--config-directory", config_dir,
            "--data-directory", data_dir,
            "--generate-config", "--open-private-ports"]
    if user is not None:
        # As upstream: only the data directory itself is given to Synapse's user
        # (not recursively); the log config written above stays root's.
        print(f"Setting ownership on {data_dir} to {user}", flush=True)
        subprocess.run(["chown", user, data_dir], check=True)
        argv = ["gosu", user] + argv
    sys.exit(subprocess.run(argv).returncode)


def run(args, env, user) -> None:
    if "-m" not in args:
        args = ["-m", env.get("SYNAPSE_WORKER", "synapse.app.homeserver")] + args

    jemalloc = f"/usr/lib/{platform.machine()}-linux-gnu/libjemalloc.so.2"
    if os.path.isfile(jemalloc):
        env["LD_PRELOAD"] = jemalloc

    if not any(a.startswith(("--config-path", "-c")) for a in args):
        _, config_path, _ = config_locations(env)
        if not os.path.exists(config_path):
            fail(f"Config file {config_path!r} does not exist. Create one with the "
                 "`generate` mode (then edit it), or point SYNAPSE_CONFIG_PATH at "
                 "an existing config file.")
        args = args + ["--config-path", config_path]

    print("Starting synapse with args " + " ".join(args), flush=True)
    argv = [sys.executable] + args
    if user is not None:
        os.execvpe("gosu", ["gosu", user] + argv, env)
    os.execve(sys.executable, argv, env)


def main(argv) -> None:
    env = dict(os.environ)
    mode = argv[1] if len(argv) > 1 else "run"
    user = target_user(env)
    if mode == "generate":
        generate(env, user)
    elif mode == "run":
        run(list(argv[2:]), env, user)
    elif mode == "migrate_config":
        fail("`migrate_config` is not supported by this stand-in image; use `generate`.")
    else:
        fail(f"Unknown execution mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv)
