#!/bin/sh
# Managed by synapse-fabric: install, switch and roll back Element Web releases.
# Run by cron and by `inv element-update`; safe to run by hand.
#
#   element-update [--site HOSTNAME] [--version V] [--check] [--rollback] [--unattended]
#
# Installed unchanged as <proxy_dir>/bin/element-update (fabfile/render.py). Its
# settings are data the deploy writes beside the sites, <proxy_dir>/element/sites.json
# (ELEMENT_UPDATE_CONFIG=/path/sites.json: another one, and the sites beside it):
#
#   {"lock_file": "/run/synapse-fabric/element.lock", "unpacked_max_bytes": 1000000000,
#    "sites": [{"hostname": "chat.example.org", "version": "latest", "keep": 3,
#               "feed": "https://api.github.com/repos/element-hq/element-web/releases"}]}
#
# One jq run reads it; every value is checked before use, always quoted, never eval'd.
#
# Layout of one site, <proxy_dir>/element/<hostname>/ (served read-only by nginx
# as /srv/element/<hostname>/):
#   config.json        rendered by the deploy, served beside the release
#   releases/<v>/      unpacked releases
#   current            relative symlink -> releases/<v>: the served release
#   history            versions made current, oldest first (rollback, pruning)
#   carried/<v>        bundle directories hard-linked into releases/<v> from
#                      the release served before it (not carried any further)
#   hold               a version rolled back from; unattended runs skip it
#   signing-key.gpg    optional binary OpenPGP keyring: releases must be signed
#   feed-ca.pem        optional CA bundle for the feed and the downloads
#
# Exit status: 0 done (or nothing to do), 1 a site failed, 64 bad usage,
# 75 another element-update holds the lock, 78 sites.json is missing or wrong.

set -u
umask 022
LC_ALL=C
export LC_ALL
PATH=${PATH:-/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin}

# Upper bounds for what the network may hand us (sites.json caps the unpacked size).
FEED_MAX_BYTES=20000000
ASSET_MAX_BYTES=500000000
NL='
'

# -- output -------------------------------------------------------------------

SITE=element-update

log() {
  printf '%s %s: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$SITE" "$*"
}

err() {
  log "ERROR: $*" >&2
}

# die MESSAGE: fail the current site (each site runs in its own subshell).
die() {
  err "$*"
  exit 1
}

usage() {
  cat <<'EOF'
usage: element-update [--site HOSTNAME] [--version V] [--check] [--rollback]

  --site HOSTNAME  only this Element site (default: every site of this host)
  --version V      install V (e.g. 1.11.85, or latest) instead of hosts.yaml's
  --check          print the installed and the newest version; change nothing
  --rollback       switch back to the previous version still on disk
  --unattended     as cron runs it: sites pinned to a version in hosts.yaml are left alone
EOF
}

# -- small checks ---------------------------------------------------------------

# valid_version V: 1.11.85, 1.11, 1.11.85-rc.1 (the shapes hosts.yaml accepts).
valid_version() {
  case $1 in '' | *[!0-9A-Za-z.-]*) return 1 ;; esac
  printf '%s\n' "$1" | grep -Eqx '[0-9]+(\.[0-9]+){1,3}(-rc\.?[0-9]+)?'
}

# valid_hostname NAME: a DNS name in lower case (as hosts.yaml accepts it).
valid_hostname() {
  case $1 in '' | *[!a-z0-9.-]*) return 1 ;; esac
  printf '%s\n' "$1" | grep -Eqx '([a-z0-9]([a-z0-9-]*[a-z0-9])?\.)+[a-z0-9]([a-z0-9-]*[a-z0-9])?'
}

# valid_count N: a whole number above 0.
valid_count() {
  case $1 in '' | 0* | *[!0-9]*) return 1 ;; esac
}

# valid_sha256 HEX: 64 lower-case hexadecimal digits.
valid_sha256() {
  case $1 in *[!0-9a-f]*) return 1 ;; esac
  [ "${#1}" -eq 64 ]
}

# valid_url URL: https only, one line, no spaces.
valid_url() {
  case $1 in
    *"$NL"* | *' '*) return 1 ;;
    https://?*) return 0 ;;
    *) return 1 ;;
  esac
}

# version_newer A B: A is a later version than B (1.11.10 > 1.11.9 > 1.11.9-rc.2
# > 1.11.9-rc.1); missing components count as 0. Both are valid_version.
version_newer() {
  awk -v a="$1" -v b="$2" '
    # key(v, k): k[1..4] the numbers, k[5] 1 for a release and 0 for an rc
    # (an rc comes before its release), k[6] the rc number.
    function key(v, k,    p, n, i) {
      k[5] = 1; k[6] = 0
      if (match(v, /-rc\.?/)) { k[5] = 0; k[6] = substr(v, RSTART + RLENGTH) + 0; v = substr(v, 1, RSTART - 1) }
      n = split(v, p, ".")
      for (i = 1; i <= 4; i++) k[i] = i <= n ? p[i] + 0 : 0
    }
    BEGIN {
      key(a, x); key(b, y)
      for (i = 1; i <= 6; i++) if (x[i] != y[i]) exit !(x[i] > y[i])
      exit 1
    }'
}

need() {
  for _tool in "$@"; do
    command -v "$_tool" >/dev/null 2>&1 || die "$_tool is missing (bootstrap installs curl, jq, gpgv)"
  done
}

# -- settings: sites.json ------------------------------------------------------------

# bad_config MESSAGE: sites.json cannot be used; nothing is done.
bad_config() {
  err "$CONFIG: $*"
  exit 78
}

# load_config: read sites.json (one jq run) and check every value; sets LOCK_FILE,
# UNPACKED_MAX_BYTES, NAMES (the hostnames) and SITES: a line
# "hostname version keep feed" a site (checked values hold no space nor newline).
load_config() {
  [ -f "$CONFIG" ] || bad_config "missing (the deploy writes it: run inv deploy)"
  # one value a line: strings without a control character, anything else as JSON
  _values=$(jq -r 'def line: if type == "string" then . else tojson end;
    if type == "object" and (.sites | type == "array") and ([.sites[].hostname] | length == (unique | length))
      and all(.. | strings | explode[]; . >= 32 and . != 127)
    then (.sites | length), (.lock_file, .unpacked_max_bytes, (.sites[] | .hostname, .version, .keep, .feed) | line)
    else error("bad") end' "$CONFIG" 2>/dev/null) ||
    bad_config "not a JSON object with a list of sites (each hostname once, no control characters)"
  NAMES='' SITES=''
  {
    IFS= read -r _n
    IFS= read -r LOCK_FILE
    IFS= read -r UNPACKED_MAX_BYTES
    while [ "$_n" -gt 0 ]; do
      IFS= read -r _host; IFS= read -r _version; IFS= read -r _keep; IFS= read -r _feed
      valid_hostname "$_host" || bad_config "hostname '$_host' is not a DNS name"
      [ "$_version" = latest ] || valid_version "$_version" ||
        bad_config "$_host: version '$_version' is not like 1.11.85 or latest"
      valid_count "$_keep" || bad_config "$_host: keep '$_keep' is not a whole number above 0"
      valid_url "$_feed" || bad_config "$_host: feed '$_feed' is not an https:// URL; refusing it"
      NAMES=${NAMES:+$NAMES }$_host
      SITES=${SITES:+$SITES$NL}"$_host $_version $_keep $_feed"
      _n=$((_n - 1))
    done
  } <<EOF
$_values
EOF
  case $LOCK_FILE in /?*) ;; *) bad_config "lock_file '$LOCK_FILE' is not an absolute path" ;; esac
  valid_count "$UNPACKED_MAX_BYTES" ||
    bad_config "unpacked_max_bytes '$UNPACKED_MAX_BYTES' is not a whole number above 0"
}

# -- site state ----------------------------------------------------------------

# installed_version: the version "current" points at; empty when none.
installed_version() {
  if [ -L "$SDIR/current" ]; then
    _link=$(readlink "$SDIR/current") || die "cannot read $SDIR/current"
    _v=${_link#releases/}
    if [ "$_v" = "$_link" ] || ! valid_version "$_v"; then
      die "$SDIR/current points at '$_link', not at releases/<version>"
    fi
    printf '%s\n' "$_v"
  elif [ -e "$SDIR/current" ]; then
    die "$SDIR/current exists but is not a symlink; move it away"
  fi
}

# history_lines: the valid versions of the history file, oldest first.
history_lines() {
  [ -f "$SDIR/history" ] || return 0
  grep -Ex '[0-9]+(\.[0-9]+){1,3}(-rc\.?[0-9]+)?' "$SDIR/history"
  return 0
}

# complete_release V: releases/V is an unpacked release.
complete_release() {
  [ -d "$SDIR/releases/$1" ] && [ ! -L "$SDIR/releases/$1" ] && [ -f "$SDIR/releases/$1/index.html" ]
}

# write_file PATH: stdin -> PATH, atomically (rename beside it).
write_file() {
  { cat >"$1.new" && mv -f "$1.new" "$1"; } || { rm -f "$1.new"; return 1; }
}

# swap_to V: point "current" at releases/V in one rename (nginx needs no reload;
# the link is relative, so it resolves in the nginx container too).
swap_to() {
  rm -f "$SDIR/current.new"
  CLEAN_LINK=$SDIR/current.new
  ln -s "releases/$1" "$SDIR/current.new" || die "cannot create $SDIR/current.new"
  mv -T "$SDIR/current.new" "$SDIR/current" || die "cannot switch $SDIR/current to releases/$1"
  CLEAN_LINK=
  log "now serving $1 (current -> releases/$1)"
}

# record V: append V to the history (keeping its last 100 entries).
record() {
  { history_lines; printf '%s\n' "$1"; } | tail -n 100 | write_file "$SDIR/history" ||
    die "switched to $1 but could not write $SDIR/history"
}

# prune: keep the last $KEEP distinct versions of the history that are on disk
# (the newest is the current one, the next the rollback target), delete the rest.
prune() {
  _cur=$(installed_version) || exit 1
  _keep=$(history_lines | awk '{ line[NR] = $0 } END { for (i = NR; i > 0; i--) print line[i] }' |
    awk '!seen[$0]++' | while IFS= read -r _v; do
      complete_release "$_v" && printf '%s\n' "$_v"
    done | head -n "$KEEP")
  _keep="$NL$_cur$NL$_keep$NL"
  for _dir in "$SDIR"/releases/*; do
    [ -d "$_dir" ] || continue
    _v=${_dir##*/}
    valid_version "$_v" || continue
    case $_keep in *"$NL$_v$NL"*) continue ;; esac
    log "removing old release $_v (keep $KEEP)"
    rm -rf -- "$_dir" || die "cannot remove $_dir"
    rm -f "$SDIR/carried/$_v"
  done
}

# -- network --------------------------------------------------------------------

# http_get URL OUTPUT MAX_BYTES MAX_SECONDS: curl with limits, https only (also
# every redirect); OUTPUT may be "-".
http_get() {
  _url=$1 _out=$2 _max=$3 _secs=$4
  set -- -fsSL --proto =https --proto-redir =https \
    --connect-timeout 15 --max-time "$_secs" --max-filesize "$_max" \
    --retry 2 --retry-delay 3 -A synapse-fabric-element-update
  if [ -n "$FEED_CA" ]; then
    set -- "$@" --cacert "$FEED_CA"
  fi
  curl "$@" -o "$_out" --url "$_url" && return 0
  _rc=$?
  # 1 is an unsupported protocol: $_url is https, so a redirect was not
  [ "$_rc" -eq 1 ] && err "refused a redirect of $_url to a URL that is not https"
  return "$_rc"
}

# fetch_release WANT: sets $REL (the release's JSON) and $VER (its version).
# WANT is "latest" (the feed's first release that is neither a draft nor a
# prerelease) or a version (the release tagged v<version>). $FEED is valid_url.
fetch_release() {
  _feed=$(http_get "$FEED" - "$FEED_MAX_BYTES" 60) || die "cannot read the release feed $FEED"
  printf '%s\n' "$_feed" | jq -e 'type == "array"' >/dev/null 2>&1 ||
    die "the feed $FEED is not a JSON list of releases"
  if [ "$1" = latest ]; then
    REL=$(printf '%s\n' "$_feed" |
      jq -ce '[.[] | select(.draft != true and .prerelease != true)][0] // empty' 2>/dev/null) ||
      die "the feed lists no published release"
  else
    REL=$(printf '%s\n' "$_feed" |
      jq -ce --arg tag "v$1" '[.[] | select(.tag_name == $tag and .draft != true)][0] // empty' 2>/dev/null)
    if [ -z "$REL" ]; then
      # A GitHub API feed lists only recent releases; ask for the tag itself.
      case $FEED in
        */releases)
          log "v$1 is not among the feed's releases; asking $FEED/tags/v$1"
          _one=$(http_get "$FEED/tags/v$1" - "$FEED_MAX_BYTES" 60) || die "release v$1 not found"
          REL=$(printf '%s\n' "$_one" |
            jq -ce --arg tag "v$1" 'select(type == "object" and .tag_name == $tag and .draft != true)' 2>/dev/null)
          ;;
      esac
      [ -n "$REL" ] || die "release v$1 not found in the feed $FEED"
    fi
  fi
  _tag=$(printf '%s\n' "$REL" | jq -r '.tag_name | strings') || die "the release has no tag_name"
  VER=${_tag#v}
  if [ "$VER" = "$_tag" ] || ! valid_version "$VER"; then
    die "the release's tag '$_tag' is not v<version>"
  fi
}

# asset_field NAME FIELD: a field of the release's asset called NAME, or nothing.
asset_field() {
  printf '%s\n' "$REL" |
    jq -r --arg n "$1" --arg f "$2" '[.assets[]? | select(.name == $n)][0][$f] // empty | strings'
}

# download NAME: the asset NAME into $TMP/NAME; 1 when the release has no such asset.
download() {
  _url=$(asset_field "$1" browser_download_url) || die "cannot read the assets of v$VER"
  [ -n "$_url" ] || return 1
  valid_url "$_url" || die "asset $1: its download URL is not an https:// URL; refusing it"
  log "downloading $1"
  http_get "$_url" "$TMP/$1" "$ASSET_MAX_BYTES" 900 || die "download of $1 failed"
}

# -- the archive ------------------------------------------------------------------

# unpack ARCHIVE TOP: extract ARCHIVE into $TMP/unpacked (private, on the site's
# file system), then look at what landed; refused (nothing served changes, the
# trap deletes $TMP) unless it is the directory TOP alone, with an index.html,
# holding nothing but files, directories and symlinks that stay inside it.
# The unpacked size is checked before anything is written. GNU tar keeps the
# extraction itself inside $TMP/unpacked: it strips a leading "/" (and warns),
# skips members with ".." (and fails), resolves hard links there, and creates a
# symlink that is absolute or holds ".." only at its end, so nothing is written
# through one that leaves; files are ours, with our umask (no setuid). Any error
# or warning of tar refuses the archive (time stamps in the future aside).
unpack() {
  _q=$TMP/unpacked _top=$TMP/unpacked/$2 _refuse="refusing ${1##*/}:"
  tar --version 2>/dev/null | grep -q 'GNU tar' || die "GNU tar is required"
  # the real size of the tar stream (headers may lie), read no further than the cap
  _size=$(gzip -dc -- "$1" 2>/dev/null | head -c "$((UNPACKED_MAX_BYTES + 1))" | wc -c | tr -d ' ')
  [ "$_size" -le "$UNPACKED_MAX_BYTES" ] || die "$_refuse it unpacks to more than $UNPACKED_MAX_BYTES bytes"
  mkdir "$_q" || die "cannot create $_q"
  tar -xzf "$1" -C "$_q" --no-same-owner --no-same-permissions --warning=no-timestamp 2>"$TMP/tar.err"
  _rc=$?
  # ours to look into and remove (root may lack CAP_DAC_OVERRIDE), nginx's to read
  chmod -R u+rwX,go+rX -- "$_q" || die "cannot set the modes in $_q"
  if [ "$_rc" -ne 0 ] || [ -s "$TMP/tar.err" ]; then
    sed 's/^/  /' "$TMP/tar.err" >&2
    die "$_refuse tar failed or warned (above): not a clean, readable .tar.gz"
  fi
  _extra=$(find "$_q" -mindepth 1 -maxdepth 1 ! -name "$2" -printf '%f ')
  [ -z "$_extra" ] || die "$_refuse members outside $2/: $_extra"
  if [ -L "$_top" ] || [ ! -d "$_top" ]; then die "$_refuse $2/ is missing or not a directory"; fi
  _odd=$(find "$_top" ! -type f ! -type d ! -type l -print -quit) || die "cannot look into $_top"
  [ -z "$_odd" ] || die "$_refuse special file (device, fifo, socket): ${_odd#"$_top"/}"
  _root=$(realpath -e -- "$_top") || die "cannot resolve $_top"
  # shellcheck disable=SC2016 # the inner script's own variables
  find "$_top" -type l -exec sh -c 'top=$1 root=$2; shift 2
    for l; do
      t=$(readlink -- "$l")
      case $t in /*) ;; *) case $(realpath -m -- "$l") in "$root" | "$root"/*) continue ;; esac ;; esac
      printf "%s -> %s\n" "${l#"$top"/}" "$t"
      exit 1
    done' sh "$_top" "$_root" {} + >"$TMP/links" ||
    die "$_refuse symlink leaving the release: $(head -n 1 "$TMP/links")"
  if [ ! -f "$_top/index.html" ] || [ -L "$_top/index.html" ]; then
    die "${1##*/} has no index.html at its top"
  fi
}

# -- per-site actions -----------------------------------------------------------------

# cleanup: on any exit of a site, remove what this run left half-done.
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
  if [ -n "$CLEAN_LINK" ]; then rm -f "$CLEAN_LINK"; fi
  if [ -n "$TMP" ]; then rm -rf "$TMP"; fi
}

# install_release: download, verify, unpack v$VER into releases/$VER (not yet served).
install_release() {
  _name=element-v$VER.tar.gz
  TMP=$(mktemp -d "$SDIR/.tmp-XXXXXX") || die "cannot create a temporary directory in $SDIR"
  download "$_name" || die "release v$VER has no asset $_name"

  # A checksum is always required: GitHub's digest field, else a .sha256 asset.
  _sum=$(asset_field "$_name" digest) || die "cannot read the assets of v$VER"
  case $_sum in
    sha256:*) _sum=${_sum#sha256:}; _from="the feed's digest" ;;
    *) _sum= ;;
  esac
  if [ -z "$_sum" ]; then
    download "$_name.sha256" || die "release v$VER has no checksum (no sha256 digest, no $_name.sha256)"
    _sum=$(awk 'NF { print $1; exit }' "$TMP/$_name.sha256")
    _from=$_name.sha256
  fi
  _sum=$(printf '%s' "$_sum" | tr A-F a-f)
  valid_sha256 "$_sum" || die "$_from is not a sha256 checksum"
  _got=$(sha256sum "$TMP/$_name" | awk '{ print $1 }')
  [ "$_got" = "$_sum" ] || die "checksum mismatch for $_name: expected $_sum ($_from), got $_got"
  log "sha256 of $_name matches $_from"

  # A signing key makes a valid detached signature mandatory.
  if [ -n "$SIGNING_KEY" ]; then
    download "$_name.asc" || die "release v$VER has no signature $_name.asc, and $SIGNING_KEY requires one"
    mkdir -m 700 "$TMP/gnupg" || die "cannot prepare gpgv"
    cp "$SIGNING_KEY" "$TMP/gnupg/trusted.gpg" || die "cannot read $SIGNING_KEY"
    if _out=$(gpgv --homedir "$TMP/gnupg" --keyring "$TMP/gnupg/trusted.gpg" \
      "$TMP/$_name.asc" "$TMP/$_name" 2>&1); then
      log "signature of $_name is good (key in $SIGNING_KEY)"
    else
      printf '%s\n' "$_out" | sed 's/^/  /' >&2
      die "bad or unknown signature on $_name"
    fi
  fi

  unpack "$TMP/$_name" "element-v$VER"
  rm -rf "$SDIR/releases/$VER"
  rm -f "$SDIR/carried/$VER" # a fresh release carries nothing yet
  mv -T "$TMP/unpacked/element-v$VER" "$SDIR/releases/$VER" || die "cannot move the release into releases/$VER"
  log "unpacked $VER into releases/$VER"
}

do_check() {
  _cur=$(installed_version) || exit 1
  fetch_release latest
  _newest=$VER
  _want=$WANT
  [ "$_want" = latest ] && _want=$_newest
  _state="up to date"
  if [ "$_cur" != "$_want" ]; then
    _state="would install $_want"
    if [ "$WANT" = latest ] && [ -n "$_cur" ] && ! version_newer "$_want" "$_cur"; then
      _state="would skip $_want: not newer than $_cur"
    elif [ -z "$OVERRIDE" ] && [ "$(cat "$SDIR/hold" 2>/dev/null)" = "$_want" ]; then
      _state="held: $_want was rolled back"
    fi
  fi
  log "installed ${_cur:-none}, newest $_newest, wanted $WANT: $_state"
}

do_rollback() {
  _cur=$(installed_version) || exit 1
  [ -n "$_cur" ] || die "nothing is installed, nothing to roll back"
  # the last history entry that is not the current version and is still on disk
  _n=0 _target='' _line=''
  for _v in $(history_lines); do
    _n=$((_n + 1))
    if [ "$_v" != "$_cur" ] && complete_release "$_v"; then
      _target=$_v _line=$_n
    fi
  done
  [ -n "$_target" ] || die "no previous version on disk to roll back to (history: $(history_lines | tr '\n' ' '))"
  carry_bundles "$_cur" "$_target"
  swap_to "$_target"
  # the history goes back to where the target was made current
  history_lines | head -n "$_line" | write_file "$SDIR/history" ||
    die "rolled back to $_target but could not write $SDIR/history"
  # unattended runs must not reinstall what was just rolled back from
  printf '%s\n' "$_cur" | write_file "$SDIR/hold" || die "cannot write $SDIR/hold"
  log "rolled back from $_cur to $_target; $_cur is held (install it again with --version $_cur)"
}

# carry_bundles FROM TO: a page loaded from FROM just before the swap asks for
# FROM's scripts afterwards; FROM's own bundles are hard-linked into TO (no
# copy), so no request fails across a swap. Those FROM got from its predecessor
# (carried/FROM) go no further: bundles do not pile up release after release.
carry_bundles() {
  [ -n "$1" ] && [ -d "$SDIR/releases/$1/bundles" ] || return 0
  _old=$NL$(cat "$SDIR/carried/$1" 2>/dev/null)$NL
  for _b in "$SDIR/releases/$1/bundles"/*; do
    if [ ! -d "$_b" ] || [ -L "$_b" ]; then continue; fi
    _n=${_b##*/}
    case $_old in *"$NL$_n$NL"*) continue ;; esac
    [ -e "$SDIR/releases/$2/bundles/$_n" ] && continue
    mkdir -p "$SDIR/carried" "$SDIR/releases/$2/bundles" || die "cannot carry $1's bundles into releases/$2"
    # recorded first: a run killed here leaves a name too many, never one too few
    printf '%s\n' "$_n" >>"$SDIR/carried/$2" || die "cannot write $SDIR/carried/$2"
    cp -al "$_b" "$SDIR/releases/$2/bundles/$_n" || die "cannot carry $1's bundles into releases/$2"
  done
}

do_update() {
  _cur=$(installed_version) || exit 1
  if [ -n "$UNATTENDED" ] && [ "$PINNED" != latest ] && [ -n "$_cur" ]; then
    log "pinned to $PINNED in hosts.yaml: unattended runs leave it (serving $_cur)"
    return 0
  fi
  if [ "$WANT" != latest ] && [ "$_cur" = "$WANT" ]; then
    log "already at $WANT, nothing to do"
    return 0
  fi
  fetch_release "$WANT"
  if [ "$_cur" = "$VER" ]; then
    log "already at $VER, nothing to do"
    return 0
  fi
  # latest only moves forward: an older newest is a rolled-back or forged feed
  # (--version V and --rollback may go back: the operator asks for it)
  if [ "$WANT" = latest ] && [ -n "$_cur" ] && ! version_newer "$VER" "$_cur"; then
    log "the feed's newest release $VER is not newer than $_cur: skipped, still serving $_cur (install it with --version $VER)"
    return 0
  fi
  if [ -z "$OVERRIDE" ] && [ "$(cat "$SDIR/hold" 2>/dev/null)" = "$VER" ]; then
    log "$VER was rolled back; staying on ${_cur:-none} (install it with --version $VER)"
    return 0
  fi
  log "updating from ${_cur:-none} to $VER"
  if complete_release "$VER"; then
    log "releases/$VER is already unpacked"
  else
    install_release
  fi
  if [ -n "$_cur" ] && [ ! -f "$SDIR/history" ]; then
    record "$_cur" # a release installed before there was a history
  fi
  carry_bundles "$_cur" "$VER"
  swap_to "$VER"
  record "$VER"
  rm -f "$SDIR/hold"
  prune
}

# run_site HOSTNAME VERSION KEEP FEED: one site (its checked settings), in a subshell,
# so that die ends only this site and the trap cleans up after it.
run_site() (
  SITE=$1 PINNED=$2 KEEP=$3 FEED=$4
  TMP='' CLEAN_LINK=''
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  trap 'exit 129' HUP

  SDIR=$ELEMENT_DIR/$SITE
  WANT=${OVERRIDE:-$PINNED}
  SIGNING_KEY='' FEED_CA=''
  [ -f "$SDIR/signing-key.gpg" ] && SIGNING_KEY=$SDIR/signing-key.gpg
  [ -f "$SDIR/feed-ca.pem" ] && FEED_CA=$SDIR/feed-ca.pem
  need curl sha256sum tar gzip awk find realpath mktemp
  [ -n "$SIGNING_KEY" ] && need gpgv

  if [ "$MODE" = check ]; then
    do_check
    exit 0
  fi

  mkdir -p "$SDIR/releases" || die "cannot create $SDIR/releases"
  # leftovers of a run that was killed (we hold the lock: nobody else is working);
  # releases/.<v>.partial: of an earlier element-update
  for _stale in "$SDIR"/.tmp-* "$SDIR"/releases/.*.partial "$SDIR/current.new"; do
    if [ -e "$_stale" ] || [ -L "$_stale" ]; then
      log "removing leftover $_stale"
      rm -rf -- "$_stale"
    fi
  done
  if [ "$MODE" = rollback ]; then
    do_rollback
  else
    do_update
  fi
)

# -- main -----------------------------------------------------------------------------

ONLY='' OVERRIDE='' MODE=update UNATTENDED=
while [ $# -gt 0 ]; do
  case $1 in
    --site) [ $# -ge 2 ] || { usage >&2; exit 64; }; ONLY=$2; shift 2 ;;
    --site=*) ONLY=${1#*=}; shift ;;
    --version) [ $# -ge 2 ] || { usage >&2; exit 64; }; OVERRIDE=$2; shift 2 ;;
    --version=*) OVERRIDE=${1#*=}; shift ;;
    --unattended) UNATTENDED=1; shift ;;
    --check) [ "$MODE" = rollback ] && { err "--check and --rollback exclude each other"; exit 64; }; MODE=check; shift ;;
    --rollback) [ "$MODE" = check ] && { err "--check and --rollback exclude each other"; exit 64; }; MODE=rollback; shift ;;
    -h | --help) usage; exit 0 ;;
    *) err "unknown argument: $1"; usage >&2; exit 64 ;;
  esac
done
OVERRIDE=${OVERRIDE#v}
if [ -n "$OVERRIDE" ]; then
  [ "$MODE" = rollback ] && { err "--version and --rollback exclude each other"; exit 64; }
  [ "$OVERRIDE" = latest ] || valid_version "$OVERRIDE" || { err "'$OVERRIDE' is not a version like 1.11.85 or latest"; exit 64; }
fi

# <proxy_dir>/element/sites.json, where this program is <proxy_dir>/bin/element-update
CONFIG=${ELEMENT_UPDATE_CONFIG:-}
if [ -z "$CONFIG" ]; then
  _self=$(readlink -f -- "$0") || { err "cannot tell where $0 is installed"; exit 78; }
  CONFIG=${_self%/*/*}/element/sites.json
fi
ELEMENT_DIR=$(dirname -- "$CONFIG")
need jq
load_config
if [ -n "$ONLY" ]; then
  case " $NAMES " in
    *" $ONLY "*) valid_hostname "$ONLY" ;; # one of them, not two
    *) false ;;
  esac || { err "no Element site '$ONLY' on this host (sites: $NAMES)"; exit 64; }
elif [ -z "$SITES" ]; then
  log "no Element site on this host"
  exit 0
fi

# One run at a time, host-wide; --check only reads, so it does not wait for it.
if [ "$MODE" != check ]; then
  [ -d "$(dirname "$LOCK_FILE")" ] || mkdir -m 0700 "$(dirname "$LOCK_FILE")"
  exec 9>>"$LOCK_FILE" || { err "cannot open $LOCK_FILE"; exit 1; }
  flock -n 9 || { log "another element-update is running"; exit 75; }
fi

status=0
while read -r _host _version _keep _feed; do
  if [ -z "$ONLY" ] || [ "$ONLY" = "$_host" ]; then
    run_site "$_host" "$_version" "$_keep" "$_feed" </dev/null || status=1
  fi
done <<EOF
$SITES
EOF
exit "$status"
