#!/usr/bin/env bash
# Install oneback on the proxy VM (run as root inside the VM, from a checkout).
#
#   install/install.sh [--root DIR] [--python PY] [--wheels DIR | --deps-from VENV]
#                      [--no-python] [--no-systemd]
#   install/install.sh --uninstall [--purge] [--root DIR] [--no-systemd]
#
# --root DIR         install under DIR instead of / (packaging, tests); users,
#                    ownership and systemctl are left alone there
# --python PY        the interpreter for the virtualenv (default python3, >= 3.11)
# --wheels DIR       offline: take oneback's dependencies from a wheelhouse
#                    (`pip wheel -w DIR .` where there is network)
# --deps-from VENV   offline: use the dependencies already installed in VENV
#                    (a .pth file; the tests do this); oneback itself is still
#                    built and installed from this tree
# --no-python        do not install the program (configuration, unit, filter only)
# --no-systemd       do not run systemctl (daemon-reload, enable, disable)
# --uninstall        remove the program, the wrapper and the unit; keep the
#                    configuration, the state (catalog, repository) and the user
# --purge            with --uninstall: also remove /etc/oneback, /var/lib/oneback
#                    (a repository there goes with it), the LVM filter if it is
#                    ours, and the oneback user
#
# Installs: /opt/oneback/venv (the program), /usr/local/bin/oneback (a wrapper
# that, run as root, drops to the oneback user), /opt/oneback/share (README,
# hooks/ and register-hooks.sh for the front-end), /etc/oneback (config,
# credentials, hook secret: 0600, never overwritten), /var/lib/oneback (0700),
# the systemd unit (+ a drop-in with ReadWritePaths for a repository or
# catalog outside /var/lib/oneback), /etc/lvm/lvmlocal.conf (the LVM filter),
# and the system user oneback (in group disk). Re-runnable: each line says
# created, updated, unchanged or kept; the last one how many things changed.
set -euo pipefail

root=/
python=python3
wheels=
deps_from=
program=yes
systemd=yes
action=install
purge=no
while [ $# -gt 0 ]; do
    case "$1" in
        --root) root=${2:?--root needs a directory}; shift 2 ;;
        --python) python=${2:?--python needs an interpreter}; shift 2 ;;
        --wheels) wheels=${2:?--wheels needs a directory}; shift 2 ;;
        --deps-from) deps_from=${2:?--deps-from needs a virtualenv}; shift 2 ;;
        --no-python) program=no; shift ;;
        --no-systemd) systemd=no; shift ;;
        --uninstall) action=uninstall; shift ;;
        --purge) purge=yes; shift ;;
        -h|--help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
die() { echo "install.sh: $*" >&2; exit 1; }
[ "$purge" = no ] || [ "$action" = uninstall ] || die "--purge goes with --uninstall"
[ -z "$wheels" ] || [ -z "$deps_from" ] || die "--wheels and --deps-from exclude each other"
[ -d "$root" ] || die "--root $root is not a directory"

src=$(cd "$(dirname "$0")/.." && pwd)
R=$(cd "$root" && pwd)
R=${R%/}                                  # "" for /
prefix=$R/opt/oneback
venv=$prefix/venv
share=$prefix/share
wrapper=$R/usr/local/bin/oneback
etc=$R/etc/oneback
state=$R/var/lib/oneback
unit=$R/etc/systemd/system/oneback.service
dropin_dir=$R/etc/systemd/system/oneback.service.d
dropin=$dropin_dir/paths.conf
lvm=$R/etc/lvm/lvmlocal.conf
user=oneback
real_root=no; [ -z "$R" ] && real_root=yes
has_user=no
if [ "$real_root" = yes ] && getent passwd "$user" >/dev/null; then has_user=yes; fi
use_systemctl=no
if [ "$systemd" = yes ] && [ "$real_root" = yes ] && [ -d /run/systemd/system ]; then
    use_systemctl=yes
fi

changes=0
say() {  # say WHAT THING [DETAIL]
    echo "$1 $2${3:+ ($3)}"
    case "$1" in created|updated|installed|removed) changes=$((changes + 1)) ;; esac
}
umask 022   # the program is readable by all; secrets and state are made private below

# put FILE MODE SOURCE: FILE gets SOURCE's content and MODE; reports the change.
put() {
    local file=$1 mode=$2 from=$3
    if [ ! -e "$file" ]; then
        mkdir -p "$(dirname "$file")"
        install -m "$mode" "$from" "$file"; say created "$file"
    elif ! cmp -s "$from" "$file" || [ "$(stat -c %a "$file")" != "$mode" ]; then
        install -m "$mode" "$from" "$file"; say updated "$file"
    else
        say unchanged "$file"
    fi
}

# keep_or_write FILE MODE < content: written once, never overwritten.
keep_or_write() {
    if [ -e "$1" ]; then
        say kept "$1"; cat >/dev/null
    else
        (umask 077; cat >"$1"); chmod "$2" "$1"; say created "$1"
    fi
}

# own PATH...: the oneback user's (on the real system, once the user exists).
own() {
    [ "$has_user" = yes ] || return 0
    local p
    for p in "$@"; do
        if [ "$(stat -c %U "$p")" != "$user" ]; then
            chown "$user:$user" "$p"; say updated "$p" "owner $user"
        fi
    done
}

remove() {  # remove PATH...
    local p
    for p in "$@"; do
        if [ -e "$p" ] || [ -L "$p" ]; then rm -rf "$p"; say removed "$p"
        else say absent "$p"; fi
    done
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# -- uninstall ---------------------------------------------------------------
if [ "$action" = uninstall ]; then
    if [ "$use_systemctl" = yes ] && systemctl cat oneback.service >/dev/null 2>&1; then
        systemctl disable --now oneback.service && say removed "oneback.service" "stopped, disabled"
    fi
    remove "$unit" "$dropin_dir" "$wrapper" "$prefix"
    [ "$use_systemctl" = yes ] && systemctl daemon-reload
    if [ "$purge" = yes ]; then
        remove "$etc" "$state"
        if [ -e "$lvm.before-oneback" ]; then
            mv "$lvm.before-oneback" "$lvm"; say updated "$lvm" "the original restored"
        elif [ -e "$lvm" ] && cmp -s "$lvm" "$src/install/lvmlocal.conf"; then remove "$lvm"
        elif [ -e "$lvm" ]; then say kept "$lvm" "not the one install.sh wrote"; fi
        if [ "$has_user" = yes ]; then userdel "$user"; say removed "user $user"; fi
    else
        for p in "$etc" "$state" "$lvm"; do [ -e "$p" ] && say kept "$p" "--purge removes it"; done
        [ "$has_user" = yes ] && say kept "user $user" "--purge removes it"
    fi
    echo "install.sh: uninstalled, $changes change(s)"
    exit 0
fi

# -- the user ----------------------------------------------------------------
# A system user without a login; group disk lets it open the block devices of
# the disks attached to this VM (the unit narrows that to virtio/SCSI disks).
if [ "$real_root" = yes ]; then
    if [ "$has_user" = no ]; then
        useradd --system --user-group --groups disk --home-dir /var/lib/oneback \
            --no-create-home --shell /usr/sbin/nologin --comment "oneback backup agent" "$user"
        has_user=yes; say created "user $user" "groups: $user, disk"
    elif ! id -nG "$user" | tr ' ' '\n' | grep -qx disk; then
        usermod -a -G disk "$user"; say updated "user $user" "added to group disk"
    else
        say unchanged "user $user"
    fi
else
    say skipped "user $user" "--root: create it on the target with useradd --system --groups disk $user"
fi

# -- configuration and state ---------------------------------------------------
mkdir -p "$R/etc" "$R/var/lib"
for d in "$etc" "$state"; do
    if [ -d "$d" ]; then
        if [ "$(stat -c %a "$d")" != 700 ]; then chmod 700 "$d"; say updated "$d" "mode 0700"
        else say unchanged "$d"; fi
    else
        mkdir -m 700 "$d"; say created "$d" "mode 0700"
    fi
done
config_text=$tmp/oneback.toml
cp "$src/install/oneback.toml.example" "$config_text"
context=$R/run/one-context/one_env
if [ -r "$context" ]; then   # this VM's id, once: the agent need not read the context
    vmid=$(sed -n 's/^export VMID="\{0,1\}\([0-9]\{1,10\}\)"\{0,1\}$/\1/p' "$context" | head -1)
    if [ -n "$vmid" ]; then
        sed -i "s|^vm_id = \"auto\".*|vm_id = $vmid                                  # this VM (from ${context#"$R"})|" \
            "$config_text"
    fi
fi
keep_or_write "$etc/oneback.toml" 600 <"$config_text"
keep_or_write "$etc/one_auth" 600 <<<"oneadmin:CHANGE-ME"
keep_or_write "$etc/hook_secret" 600 < <(head -c 32 /dev/urandom | base64)
own "$etc" "$etc/oneback.toml" "$etc/one_auth" "$etc/hook_secret" "$state"

# -- the program -----------------------------------------------------------------
if [ "$program" = yes ]; then
    # oneback is built from a copy of the tree (the checkout stays clean)
    mkdir "$tmp/src"
    cp -r "$src/pyproject.toml" "$src/README.md" "$src/agent" "$tmp/src/"
    find "$tmp/src" -name __pycache__ -prune -exec rm -rf {} +
    sum=$( (cd "$tmp/src" && find . -type f | LC_ALL=C sort | xargs sha256sum) \
           | sha256sum | cut -c1-64)
    how=index; [ -n "$wheels" ] && how="wheels $wheels"; [ -n "$deps_from" ] && how="deps from $deps_from"
    if [ -x "$venv/bin/oneback" ] && [ "$(cat "$venv/.oneback-source" 2>/dev/null)" = "$sum" ]; then
        say unchanged "$venv"
    else
        verb=installed; [ -e "$venv" ] && verb=updated
        "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
            || die "$python is older than Python 3.11 (use --python)"
        pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
        if [ -n "$deps_from" ]; then
            # no pip of its own (ensurepip is the slow part): VENV's pip installs into it
            [ -x "$deps_from/bin/python" ] || die "--deps-from $deps_from is not a virtualenv"
            [ -x "$venv/bin/python" ] || "$python" -m venv --without-pip "$venv"
            pip=("$deps_from/bin/python" -m pip --python "$venv/bin/python" install -q
                 --disable-pip-version-check)
            site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
            "$deps_from/bin/python" -c 'import sysconfig; p = sysconfig.get_paths()
print(p["purelib"]); print(p["platlib"]) if p["platlib"] != p["purelib"] else None' \
                >"$site/oneback-deps-from.pth"
            "${pip[@]}" --no-deps "$tmp/src"
        elif [ -n "$wheels" ]; then
            [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
            "${pip[@]}" --no-index --find-links "$wheels" "$tmp/src"
        else
            [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
            "${pip[@]}" "$tmp/src"
        fi
        "$venv/bin/oneback" --version >/dev/null || die "$venv/bin/oneback does not run"
        echo "$sum" >"$venv/.oneback-source"
        say "$verb" "$venv" "oneback $("$venv/bin/oneback" --version | awk '{print $NF}'), $how"
    fi
    chmod -R go-w "$prefix"; chmod 755 "$prefix" "$venv"

    # The command operators type. Run as root, it becomes the oneback user, so
    # that the files a command writes in the repository and catalog stay the
    # agent's (a chunk left 0600 root would be unreadable to the service).
    cat >"$tmp/wrapper" <<WRAP
#!/bin/sh
# oneback, installed by install/install.sh: as root, run as the $user user
# (the agent's), with its groups; as anyone else, run as is. Root's mount and
# umount stay root: a FUSE file (no allow_other) is readable by the user who
# mounted it alone, and root's losetup reads it.
cmd=; skip=
for a in "\$@"; do
    if [ -n "\$skip" ]; then skip=; continue; fi
    case "\$a" in --config) skip=1 ;; -*) ;; *) cmd=\$a; break ;; esac
done
if [ "\$(id -u)" = 0 ] && [ -z "\${ONEBACK_AS_ROOT:-}" ] && [ "\$cmd" != mount ] \\
        && [ "\$cmd" != umount ] && id $user >/dev/null 2>&1; then
    exec setpriv --reuid=$user --regid=$user --init-groups -- "$venv/bin/oneback" "\$@"
fi
exec "$venv/bin/oneback" "\$@"
WRAP
    put "$wrapper" 755 "$tmp/wrapper"
    for f in "$src/README.md" "$src"/hooks/* "$src/install/register-hooks.sh" \
             "$src/install/lvmlocal.conf"; do
        f=${f#"$src/"}
        mode=644; [ -x "$src/$f" ] && mode=755
        put "$share/$f" "$mode" "$src/$f"
    done
    chmod 755 "$share" "$share/hooks" "$share/install"
fi

# -- systemd ---------------------------------------------------------------------
unit_changed=no
unit_sum() { { cat "$unit" "$dropin" 2>/dev/null || true; } | sha256sum; }
before=$(unit_sum)
put "$unit" 644 "$src/install/oneback.service"
# ReadWritePaths for a repository or a catalog outside /var/lib/oneback
# (ProtectSystem=strict makes everything else read-only for the agent).
paths=$("$python" - "$etc/oneback.toml" <<'PY' || true
import sys, tomllib, os.path
try:
    with open(sys.argv[1], "rb") as f:
        storage = tomllib.load(f).get("storage", {})
except (OSError, ValueError):
    sys.exit(0)
out = []
for key, where in (("repository", "{}"), ("catalog", "dir")):
    value = storage.get(key)
    if isinstance(value, str) and value.startswith("/"):
        path = os.path.dirname(value) if where == "dir" else value
        if path != "/var/lib/oneback" and not path.startswith("/var/lib/oneback/"):
            path = path.replace("%", "%%")       # % starts a systemd specifier
            if any(c.isspace() for c in path):   # the list is split at whitespace
                path = f'"{path}"'
            out.append(path)
print(" ".join(dict.fromkeys(out)))
PY
)
if [ -n "$paths" ]; then
    # RequiresMountsFor: the agent starts after those filesystems are mounted
    # (an NFS repository), never writing to the empty mountpoint
    printf '# written by install/install.sh from %s\n[Unit]\nRequiresMountsFor=%s\n[Service]\nReadWritePaths=%s\n' \
        /etc/oneback/oneback.toml "$paths" "$paths" >"$tmp/paths.conf"
    put "$dropin" 644 "$tmp/paths.conf"
elif [ -e "$dropin_dir" ]; then
    remove "$dropin_dir"
fi
[ "$(unit_sum)" = "$before" ] || unit_changed=yes

# -- the LVM filter ----------------------------------------------------------------
# Debian and others ship an lvmlocal.conf of comments (a `local {}` section):
# then ours is appended (the original kept as lvmlocal.conf.before-oneback).
# A file that already sets a devices section is the operator's: kept, said so.
mkdir -p "$(dirname "$lvm")"
filter_line=$(grep -m1 'global_filter' "$src/install/lvmlocal.conf")
if [ ! -e "$lvm" ]; then
    install -m 644 "$src/install/lvmlocal.conf" "$lvm"; say created "$lvm"
elif grep -qxF -- "$filter_line" "$lvm"; then
    say unchanged "$lvm"
elif grep -qE '^[[:space:]]*(devices[[:space:]]*\{|devices[[:space:]]*$|global_filter)' "$lvm"; then
    say kept "$lvm" "it has a devices section of its own: make its global_filter reject all but this VM's disk, see $share/install/lvmlocal.conf"
else
    cp -p "$lvm" "$lvm.before-oneback"
    { echo; cat "$src/install/lvmlocal.conf"; } >>"$lvm"
    say updated "$lvm" "filter appended; the original is $lvm.before-oneback"
fi

if [ "$use_systemctl" = yes ]; then
    [ "$unit_changed" = yes ] && systemctl daemon-reload
    if systemctl is-enabled --quiet oneback.service; then say unchanged "oneback.service" enabled
    else systemctl enable --quiet oneback.service; say updated "oneback.service" enabled; fi
elif [ "$systemd" = yes ] && [ "$real_root" = yes ]; then
    say skipped "systemctl" "systemd is not running here"
fi

if [ "$changes" = 0 ]; then echo "install.sh: nothing changed"
else echo "install.sh: $changes change(s)"; fi
if [ "$real_root" = yes ]; then cat <<MSG
next: edit $etc/oneback.toml and $etc/one_auth, run \`oneback init\`, then
\`systemctl start oneback\`; on the OpenNebula front-end run
$share/install/register-hooks.sh with the same secret ($etc/hook_secret).
MSG
fi
