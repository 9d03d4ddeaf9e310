"""Where everything lives on a host: the one place that builds a host path
(README, "On a host"). Render, facts, plan, the steps, the migration and the user
tasks all ask a Layout; none of them joins a host path of its own."""

from __future__ import annotations

from dataclasses import dataclass

# Outside base_dir: the host-wide places synapse-fabric writes.
SYSTEMD_DIR = "/etc/systemd/system"
CRON_DIR = "/etc/cron.d"
# The base_dir a host was deployed with: a deploy with another one is refused while
# the old one holds homeservers (fabfile/guard.py).
BASE_RECORD = "/etc/synapse-fabric/base-dir"
# restic's settings on a host (fabfile/backup.py): its repository password (made
# on the host, 0600) and the credentials of a remote repository (the operator's).
BACKUP_ETC = "/etc/synapse-fabric/backup"
BACKUP_PASSWORD = f"{BACKUP_ETC}/restic-password"
BACKUP_ENV = f"{BACKUP_ETC}/env"
# The host firewall (fabfile/firewall.py): its rules and the program that loads them.
FIREWALL_DIR = "/etc/synapse-fabric/firewall"
# Root-only (/run/lock is writable by every user, who could hold a lock there).
LOCK_DIR = "/run/synapse-fabric"
# Held by every run of renew-certificates (the timer's or cron's, or a deploy's).
CERTIFICATES_LOCK = f"{LOCK_DIR}/certificates.lock"

ROOT = "0:0"
SYNAPSE_UID = "991:991"
POSTGRES_UID = "999:999"


@dataclass(frozen=True)
class Layout:
    """The paths of one host, from its base_dir."""

    base: str

    # -- the reverse proxy ----------------------------------------------------
    @property
    def proxy(self) -> str:
        return f"{self.base}/reverse_proxy"

    @property
    def nginx_conf_d(self) -> str:
        return f"{self.proxy}/nginx/conf.d"

    def vhost(self, name: str) -> str:
        """The nginx file of one public name (or `<sn>-forward` after a migration)."""
        return f"{self.nginx_conf_d}/{name}.conf"

    def upstream_ca(self, server_name: str) -> str:
        return f"{self.proxy}/nginx/upstream-ca/{server_name}.pem"

    def bin(self, program: str) -> str:
        """A host-side program (renew-certificates, element-update)."""
        return f"{self.proxy}/bin/{program}"

    def certs(self, cert_name: str) -> str:
        """The certificate nginx serves for a homeserver (fullchain.pem, privkey.pem)."""
        return f"{self.proxy}/certs/{cert_name}"

    @property
    def acme(self) -> str:
        return f"{self.proxy}/acme"

    def acme_live(self, server_name: str) -> str:
        """certbot's current certificate of a homeserver (absent: never issued)."""
        return f"{self.acme}/letsencrypt/live/{server_name}/fullchain.pem"

    @staticmethod
    def acme_paths(server_name: str) -> list[str]:
        """Relative to base: what certbot holds for a homeserver (a migration moves it)."""
        le = "reverse_proxy/acme/letsencrypt"
        return [f"reverse_proxy/certs/{server_name}", f"{le}/live/{server_name}", f"{le}/archive/{server_name}",
                f"{le}/renewal/{server_name}.conf", f"{le}/accounts"]

    def well_known(self, server_name: str) -> str:
        return f"{self.proxy}/well-known/{server_name}"

    def element_site(self, hostname: str) -> str:
        return f"{self.proxy}/element/{hostname}"

    @property
    def admin_ui(self) -> str:
        """The admin UIs' config.json files: every file in it is synapse-fabric's."""
        return f"{self.proxy}/admin-ui"

    def admin_ui_config(self, hostname: str) -> str:
        """An admin UI's config.json, which nginx serves in place of the image's."""
        return f"{self.admin_ui}/{hostname}.json"

    @property
    def turn(self) -> str:
        """coturn's config and the shared secret it and Synapse read (fabfile/turn.py)."""
        return f"{self.proxy}/coturn"

    @property
    def turn_secret(self) -> str:
        """Made once on the host (0440 root:991): coturn's static-auth-secret and every
        Synapse's turn_shared_secret_path on this host."""
        return f"{self.turn}/shared-secret"

    @property
    def element_settings(self) -> str:
        """What element-update (fabfile/scripts/element-update.sh) knows of hosts.yaml."""
        return f"{self.proxy}/element/sites.json"

    # -- one homeserver ----------------------------------------------------------
    def synapse(self, server_name: str) -> str:
        return f"{self.base}/synapse/{server_name}"

    def db_ca(self, server_name: str) -> str:
        """The CA an external database's certificate is checked against."""
        return f"{self.synapse(server_name)}/db-ca.pem"

    def data(self, server_name: str) -> str:
        """What Synapse's `generate` wrote (owned 991:991)."""
        return f"{self.synapse(server_name)}/data"

    def generated(self, server_name: str) -> list[str]:
        """The files `generate` writes once and nothing overwrites."""
        return [f"{self.data(server_name)}/homeserver.yaml", self.signing_key(server_name)]

    def signing_key(self, server_name: str) -> str:
        return f"{self.data(server_name)}/{server_name}.signing.key"

    def conf_d(self, server_name: str) -> str:
        """The settings synapse-fabric manages, loaded after homeserver.yaml."""
        return f"{self.synapse(server_name)}/conf.d"

    def workers(self, server_name: str) -> str:
        """Each Synapse worker's own settings (outside conf.d, which every process loads)."""
        return f"{self.synapse(server_name)}/workers"

    def guest(self, server_name: str) -> str:
        """Workers of another host's homeserver that this host runs (workers.hosts):
        their stack, settings and copies of the homeserver's keys and secrets."""
        return f"{self.base}/synapse-workers/{server_name}"

    def postgres(self, server_name: str) -> str:
        return f"{self.synapse(server_name)}/postgres"

    def database(self, server_name: str) -> str:
        """The database of another host's homeserver that this host runs
        (postgres.host): its stack, data (postgres/) and password (secrets/)."""
        return f"{self.base}/synapse-db/{server_name}"

    def database_secret(self, server_name: str) -> str:
        return f"{self.database(server_name)}/secrets/postgres_password"

    def database_data(self, server_name: str) -> str:
        return f"{self.database(server_name)}/postgres"

    def passfile_for(self, server_name: str) -> str:
        """On the homeserver's host: which database host its passfile is for."""
        return f"{self.secrets(server_name)}/pgpass.for"

    def pg_version(self, server_name: str) -> str:
        return f"{self.postgres(server_name)}/PG_VERSION"

    def secrets(self, server_name: str) -> str:
        return f"{self.synapse(server_name)}/secrets"

    def secret(self, server_name: str, name: str) -> str:
        return f"{self.secrets(server_name)}/{name}"

    def migration_state(self, server_name: str) -> str:
        """A migration in progress, on the host it leaves (fabfile/migrate.py)."""
        return f"{self.synapse(server_name)}/.migration"

    # -- what the host records -----------------------------------------------------
    @property
    def pending(self) -> str:
        """Service actions owed by files already written: a run appends them before it
        writes and removes the file when every action is done, so a run killed in
        between leaves them for the next run to finish."""
        return f"{self.base}/.synapse-fabric-pending"

    @property
    def handed_over_dir(self) -> str:
        """Records of the homeservers this host handed over (fabfile/guard.py)."""
        return f"{self.base}/.synapse-fabric/handed-over"

    def handed_over(self, server_name: str) -> str:
        return f"{self.handed_over_dir}/{server_name}"

    @property
    def uninstalled_dir(self) -> str:
        """Records of the homeservers `inv uninstall` removed from this host (fabfile/guard.py)."""
        return f"{self.base}/.synapse-fabric/uninstalled"

    def uninstalled(self, server_name: str) -> str:
        return f"{self.uninstalled_dir}/{server_name}"

    def backup_staging(self, server_name: str) -> str:
        """Where a backup puts the database dump it snapshots (beside the data: the
        same filesystem), removed after."""
        return f"{self.base}/.synapse-fabric/backup/{server_name}"

    def backup_paths(self, server_name: str) -> list[str]:
        """What a homeserver's snapshot holds besides its dump: Synapse's data (config,
        signing key, media), the managed settings and stack, its secrets, its
        certificate and certbot's account and renewal state. Not the live database
        files: the dump stands for them."""
        root = self.synapse(server_name)
        return ([f"{root}/{name}" for name in ("data", "conf.d", "secrets", "ca", "docker-compose.yml", ".env")]
                + [f"{self.base}/{p}" for p in self.acme_paths(server_name)])
